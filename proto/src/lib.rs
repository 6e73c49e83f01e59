//! Portrait wire protocol: the generated `portrait.v1` messages and gRPC
//! stubs, plus the encoded file descriptor set for server reflection.
//!
//! Layering: this crate depends on nothing else in the workspace; the server
//! and the client both depend on it. Conversions between wire and domain
//! types live in the server (domain types never import tonic).

pub mod codec;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("portrait.v1");
}

/// Encoded `FileDescriptorSet` of every Portrait proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/portrait_descriptor.bin"));

/// Part of every `UNAVAILABLE` message about a change that may have been
/// proposed (and so may yet be applied): a client must not send such a
/// change again blindly (a write is safe to resend when its events carry
/// ids; `ApplySchema`, `DrainNode` and `RemoveNode` are not).
pub const OUTCOME_UNKNOWN: &str = "the outcome is unknown";

/// Whether a call that failed with `status` in transport (not a node's
/// answer) is known never to have reached the node: the connection could
/// not be made (refused, unreachable, a name that does not resolve, a TLS
/// handshake that failed, or its connect timed out). Any other
/// transport failure (a reset, a keep-alive timeout, the deadline) may have
/// come after the node acted on the call: its outcome is unknown. tonic
/// reports both kinds as `UNAVAILABLE` or `UNKNOWN`.
pub fn never_sent(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    use std::io::ErrorKind;
    let mut source = status.source();
    while let Some(e) = source {
        // tonic's wrapper of every connector failure (refused, DNS, TLS
        // handshake, connect timeout).
        if e.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            let refused = matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::AddrNotAvailable
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
            );
            if refused {
                return true;
            }
        }
        // hyper-util's connector: its connect step failed or timed out.
        if e.to_string().starts_with("tcp connect error") {
            return true;
        }
        source = e.source();
    }
    false
}

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

/// Node addresses (`http://host:port`, `https://host:port`) as the server
/// and the client dial them.
pub mod addr {
    /// The URI to dial `addr` with: with TLS always `https://` (whatever
    /// scheme `addr` names, in whatever case, or none), since tonic dials
    /// any other scheme in plaintext even with a TLS config; without TLS
    /// the scheme in lower case.
    pub fn dial_uri(addr: &str, tls: bool) -> String {
        match addr.split_once("://") {
            Some((_, rest)) if tls => format!("https://{rest}"),
            None if tls => format!("https://{addr}"),
            Some((scheme, rest)) => format!("{}://{rest}", scheme.to_ascii_lowercase()),
            None => addr.to_string(),
        }
    }

    /// The scheme of `addr` in lower case when it is `http` or `https`
    /// (in any case), else why not.
    pub fn http_scheme(addr: &str) -> Result<&'static str, String> {
        match addr.split_once("://") {
            Some((s, _)) if s.eq_ignore_ascii_case("http") => Ok("http"),
            Some((s, _)) if s.eq_ignore_ascii_case("https") => Ok("https"),
            Some((s, _)) => Err(format!("scheme {s:?} is neither http nor https")),
            None => Err("no scheme (http:// or https://)".into()),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn with_tls_every_address_is_dialed_as_https() {
            for addr in ["http://n1:8700", "HTTP://n1:8700", "grpc://n1:8700", "n1:8700", "Https://n1:8700"] {
                assert_eq!(dial_uri(addr, true), "https://n1:8700", "{addr}");
            }
            assert_eq!(dial_uri("HTTP://n1:8700", false), "http://n1:8700");
            assert_eq!(dial_uri("n1:8700", false), "n1:8700");
            assert_eq!(http_scheme("HTTPS://n1:1"), Ok("https"));
            assert_eq!(http_scheme("Http://n1:1"), Ok("http"));
            assert!(http_scheme("grpc://n1:1").unwrap_err().contains("\"grpc\""));
            assert!(http_scheme("n1:1").is_err());
        }
    }
}
