//! The map epoch on every answer: each client-facing service is wrapped in
//! [`WithMapEpoch`], which adds `x-portrait-map-epoch` (the epoch of the
//! shard map this node knows) to every response, errors included. A client
//! whose cached map is older refreshes it (docs/api.md, "Routing").
//!
//! It also turns a redirect's leader address into a client address: inside
//! the cluster a `NOT_LEADER` names the leader's peer address (raft
//! memberships hold those); a client is sent to the client address the map
//! has for `x-portrait-leader-id`, or to none if the map lacks the node.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http::{HeaderValue, Request, Response};
use tonic::codegen::Service;
use tonic::server::NamedService;

use super::status::{LEADER_ID_KEY, LEADER_KEY};
use crate::node::Node;

/// Response header carrying the answering node's map epoch.
pub const MAP_EPOCH_KEY: &str = "x-portrait-map-epoch";
/// Response header carrying the id of the answering node's cluster (16
/// hex digits), within which epochs compare.
pub const CLUSTER_ID_KEY: &str = "x-portrait-cluster-id";

/// A service whose responses carry the node's map epoch.
#[derive(Clone)]
pub struct WithMapEpoch<S> {
    inner: S,
    node: Arc<Node>,
}

impl<S> WithMapEpoch<S> {
    pub fn new(inner: S, node: Arc<Node>) -> Self {
        WithMapEpoch { inner, node }
    }
}

impl<S, B, RB> Service<Request<B>> for WithMapEpoch<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Response<RB>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let answer = self.inner.call(request);
        let node = self.node.clone();
        Box::pin(async move {
            let mut response = answer.await?;
            // Read after the call: a map that changed meanwhile is the one to report.
            let headers = response.headers_mut();
            // One read of the map: the epoch and the cluster it counts in.
            let (epoch, cluster) = node.map_epoch_and_cluster();
            headers.insert(MAP_EPOCH_KEY, HeaderValue::from(epoch));
            if cluster != 0 {
                let id =
                    HeaderValue::try_from(format!("{cluster:016x}")).expect("hex digits are a header value");
                headers.insert(CLUSTER_ID_KEY, id);
            }
            // A leader named by its id alone (its peer address was not at
            // hand) is resolved too.
            if headers.contains_key(LEADER_KEY) || headers.contains_key(LEADER_ID_KEY) {
                let leader = headers.get(LEADER_ID_KEY).and_then(|v| v.to_str().ok()?.parse().ok());
                match leader.and_then(|id| node.client_addr(id)).and_then(|a| HeaderValue::try_from(a).ok()) {
                    Some(addr) => headers.insert(LEADER_KEY, addr),
                    None => headers.remove(LEADER_KEY),
                };
            }
            Ok(response)
        })
    }
}

impl<S: NamedService> NamedService for WithMapEpoch<S> {
    const NAME: &'static str = S::NAME;
}
