//! Portrait wire protocol: the generated `portrait.v1` messages and gRPC
//! stubs, plus the encoded file descriptor set for server reflection.
//!
//! Layering: this crate depends on nothing else in the workspace; the server
//! and the client both depend on it. Conversions between wire and domain
//! types live in the server (domain types never import tonic).

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("portrait.v1");
}

/// Encoded `FileDescriptorSet` of every Portrait proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/portrait_descriptor.bin"));

pub use v1::value::Kind as ValueKind;

impl v1::Value {
    pub fn string(s: impl Into<String>) -> Self {
        Self { kind: Some(ValueKind::StringValue(s.into())) }
    }
    pub fn int(i: i64) -> Self {
        Self { kind: Some(ValueKind::IntValue(i)) }
    }
    pub fn double(d: f64) -> Self {
        Self { kind: Some(ValueKind::DoubleValue(d)) }
    }
    pub fn bool(b: bool) -> Self {
        Self { kind: Some(ValueKind::BoolValue(b)) }
    }
}
