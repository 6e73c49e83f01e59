//! Compiles `portrait/v1/*.proto` with protox (pure Rust, no system `protoc`).

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "portrait/v1/common.proto",
    "portrait/v1/ingest.proto",
    "portrait/v1/profiles.proto",
    "portrait/v1/admin.proto",
    "portrait/v1/raft.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("portrait_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    // Every service and client decodes through `crate::codec::Codec`
    // (prost's, with the server's check of a message's bytes first).
    tonic_prost_build::configure().codec_path("crate::codec::Codec").compile_fds(fds)?;
    Ok(())
}
