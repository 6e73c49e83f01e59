//! gRPC services. Each handler is an adapter: take the request, convert and
//! validate, call one [`Node`] method, map the error (in [`status`]). Every
//! client-facing answer carries the node's map epoch (in [`epoch`]).

pub mod admin;
pub mod auth;
pub mod convert;
pub mod decode_check;
pub mod epoch;
pub mod ingest;
pub mod profiles;
pub mod raft;
pub mod receiving;
pub mod sending;
pub mod status;

use std::future::Future;
use std::sync::Arc;

use portrait_proto::v1::admin_server::AdminServer;
use portrait_proto::v1::ingest_server::IngestServer;
use portrait_proto::v1::profiles_server::ProfilesServer;
use portrait_proto::v1::raft_server::RaftServer;
use tonic::transport::server::TcpIncoming;

use auth::{Gate, WithAuth};
use epoch::WithMapEpoch;
use receiving::{ReceiveBudget, WithReceiveBudget};
use sending::{SendBudget, WithSendHold};

use crate::limits::{
    MAX_ADMIN_REQUEST_BYTES, MAX_MESSAGE_BYTES, MAX_PROFILES_REQUEST_BYTES, MAX_RAFT_MESSAGE_BYTES,
    MAX_RECEIVING_BYTES, MAX_RESPONSE_BYTES, MAX_UNSENT_RESPONSE_BYTES,
};
use crate::node::Node;

/// What guards a node's services: token checks, TLS, the audit log.
pub struct Security {
    pub gate: Gate,
    pub tls: crate::tls::Tls,
    pub audit: Arc<crate::audit::AuditLog>,
}

impl Security {
    /// None of it: no token checks, plaintext, audit lines in the log only
    /// (in-process nodes of tests and benchmarks).
    pub fn none(node_id: u64) -> Security {
        Security {
            gate: Gate::open(),
            tls: crate::tls::Tls::default(),
            audit: Arc::new(crate::audit::AuditLog::log_only(node_id)),
        }
    }
}

/// The two listeners of a node.
pub struct Listeners {
    /// Ingest, Profiles, Admin, health and reflection, for clients.
    pub client: tokio::net::TcpListener,
    /// `portrait.v1.Raft` and health, for the other nodes only.
    pub peer: tokio::net::TcpListener,
}

/// Serves the client services (token-checked by `gate`) on the client
/// listener and the internal ones on the peer listener until `shutdown`
/// completes; the client port does not serve raft at all.
pub async fn serve(
    node: Arc<Node>,
    listeners: Listeners,
    security: Security,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Security { gate, tls, audit } = security;
    portrait_proto::codec::check_before_decoding(decode_check::check);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<IngestServer<ingest::IngestService>>().await;
    health.set_serving::<ProfilesServer<profiles::ProfilesService>>().await;
    health.set_serving::<AdminServer<admin::AdminService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(portrait_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let ingest = IngestServer::new(ingest::IngestService::new(node.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Each service decodes at most what its largest valid request needs: an
    // oversized request fails with OUT_OF_RANGE before it is decoded.
    // One budget for the bytes of every read response not yet taken by
    // its reader.
    let sending = SendBudget::with_connection_limit(
        MAX_UNSENT_RESPONSE_BYTES,
        crate::limits::MAX_UNSENT_RESPONSE_BYTES_PER_CONNECTION,
    );
    let profiles = ProfilesServer::new(profiles::ProfilesService::new(node.clone(), sending))
        .max_decoding_message_size(MAX_PROFILES_REQUEST_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);
    let admin = AdminServer::new(admin::AdminService::new(node.clone(), audit.clone()))
        .max_decoding_message_size(MAX_ADMIN_REQUEST_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);
    let raft = RaftServer::new(raft::RaftService::new(node.clone(), tls.peer.is_some(), audit))
        .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
    let (peer_health, peer_health_service) = tonic_health::server::health_reporter();
    peer_health.set_serving::<RaftServer<raft::RaftService>>().await;
    // With our own listener, nodelay must be set on the incoming stream
    // (the builder's setting only applies to listeners it binds itself).
    let incoming = |listener| TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    // A client that vanished without closing its connection (a host gone,
    // a cable pulled) does not answer the pings: its connection ends, and
    // with it what its calls held (unsent responses, received requests).
    let mut client = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(crate::limits::CLIENT_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(crate::limits::CLIENT_KEEPALIVE_TIMEOUT));
    if let Some(config) = tls.client {
        client = client.tls_config(config)?;
    }
    let mut peer = tonic::transport::Server::builder();
    if let Some(config) = tls.peer {
        peer = peer.tls_config(config.server)?;
    }
    // One budget for the bytes of every client request being received.
    let receiving = ReceiveBudget::new(MAX_RECEIVING_BYTES);
    let ingest = WithReceiveBudget::new(ingest, receiving.clone());
    let profiles = WithReceiveBudget::new(WithSendHold::new(profiles), receiving.clone());
    let admin = WithReceiveBudget::new(admin, receiving);
    let client = client
        .add_service(health_service)
        .add_service(reflection)
        .add_service(WithMapEpoch::new(WithAuth::new(ingest, gate.clone()), node.clone()))
        .add_service(WithMapEpoch::new(WithAuth::new(profiles, gate.clone()), node.clone()))
        .add_service(WithMapEpoch::new(WithAuth::new(admin, gate), node.clone()))
        .serve_with_incoming_shutdown(
            incoming(listeners.client).with_keepalive(Some(crate::limits::CLIENT_KEEPALIVE_INTERVAL)),
            until_stopped(stopped.clone()),
        );
    let peer = peer
        .add_service(peer_health_service)
        .add_service(raft::WithArrival(raft))
        .serve_with_incoming_shutdown(incoming(listeners.peer), until_stopped(stopped));
    let servers = async { tokio::try_join!(client, peer).map(|_| ()) };
    tokio::pin!(servers);
    tokio::select! {
        served = &mut servers => return Ok(served?),
        () = shutdown => {
            let _ = stop.send(true);
        }
    }
    servers.await?;
    Ok(())
}
