//! The map epoch on every answer: each client-facing service is wrapped in
//! [`WithMapEpoch`], which adds `x-portrait-map-epoch` (the epoch of the
//! shard map this node knows) to every response, errors included. A client
//! whose cached map is older refreshes it (docs/api.md, "Routing").

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http::{HeaderValue, Request, Response};
use tonic::codegen::Service;
use tonic::server::NamedService;

use crate::node::Node;

/// Response header carrying the answering node's map epoch.
pub const MAP_EPOCH_KEY: &str = "x-portrait-map-epoch";

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
            response.headers_mut().insert(MAP_EPOCH_KEY, HeaderValue::from(node.map_epoch()));
            Ok(response)
        })
    }
}

impl<S: NamedService> NamedService for WithMapEpoch<S> {
    const NAME: &'static str = S::NAME;
}
