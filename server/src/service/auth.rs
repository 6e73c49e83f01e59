//! Token checks on every client-facing call: each service is wrapped in
//! [`WithAuth`], which looks the RPC up in [`crate::auth::RPCS`] and the
//! caller's bearer token in the node's [`Gate`] before the service sees the
//! request. A refusal is `UNAUTHENTICATED` (no token, or an unknown one) or
//! `PERMISSION_DENIED` (a known token without the role); the service is
//! never called. The token's name rides in the request's extensions
//! ([`Caller`]) for whoever logs the call.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use tonic::codegen::http::{Request, Response};
use tonic::codegen::Service;
use tonic::server::NamedService;

use crate::auth::{Denied, TokenBook};

/// The token that authorized a call (its name, never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub String);

/// What let a call through, kept with the call so that a stream can be
/// checked again as it runs: a token removed from the file (or its role)
/// by a reload ends the streams it opened at their next message.
#[derive(Clone)]
pub struct Grant {
    gate: Gate,
    digest: [u8; 32],
    path: String,
}

impl Grant {
    /// UNAUTHENTICATED once the token no longer allows the call.
    pub fn recheck(grant: Option<&Grant>) -> Result<(), tonic::Status> {
        let Some(g) = grant else { return Ok(()) };
        match g.gate.current() {
            Some(book) if !book.still_allows(&g.digest, &g.path) => Err(tonic::Status::unauthenticated(
                "the token of this stream was removed or lost its role (the token file was reloaded): call again \
                 with a current token",
            )),
            _ => Ok(()),
        }
    }
}

/// The tokens the node accepts, or none: checks off (no `--token-file`).
#[derive(Clone, Default)]
pub struct Gate {
    book: Option<Arc<RwLock<Arc<TokenBook>>>>,
}

impl Gate {
    /// No checks: every call passes (a node started without a token file).
    pub fn open() -> Gate {
        Gate { book: None }
    }

    pub fn new(book: TokenBook) -> Gate {
        Gate { book: Some(Arc::new(RwLock::new(Arc::new(book)))) }
    }

    pub fn is_on(&self) -> bool {
        self.book.is_some()
    }

    /// Reads the token file again; on an error the tokens in use stay.
    pub fn reload(&self, path: &Path) -> Result<usize, String> {
        let Some(book) = &self.book else { return Err("token checks are off".into()) };
        let new = TokenBook::load(path)?;
        let n = new.len();
        *book.write().expect("token book lock") = Arc::new(new);
        Ok(n)
    }

    fn current(&self) -> Option<Arc<TokenBook>> {
        self.book.as_ref().map(|b| b.read().expect("token book lock").clone())
    }
}

/// On every SIGHUP until the process ends: re-reads the token file
/// (`path`, when token checks are on) and reopens the audit file (so that
/// a rotated one is written anew). The token file is read on a blocking
/// thread.
pub fn reload_on_sighup(
    gate: Gate,
    path: Option<PathBuf>,
    audit: Arc<crate::audit::AuditLog>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            if let Err(e) = audit.reopen() {
                tracing::error!(error = %e, "audit file not reopened; entries go to the file in use");
            }
            let Some(path) = path.clone() else {
                tracing::info!("SIGHUP: no --token-file, no tokens to reload");
                continue;
            };
            let gate = gate.clone();
            let reloaded = tokio::task::spawn_blocking(move || (gate.reload(&path), path)).await;
            match reloaded {
                Ok((Ok(n), path)) => {
                    tracing::info!(file = %path.display(), tokens = n, "token file reloaded")
                }
                Ok((Err(e), _)) => {
                    tracing::error!(error = %e, "token file not reloaded; the tokens in use stay")
                }
                Err(e) => tracing::error!(error = %e, "token file not reloaded; the tokens in use stay"),
            }
        }
    });
    Ok(())
}

/// A service whose calls pass the node's token checks first.
#[derive(Clone)]
pub struct WithAuth<S> {
    inner: S,
    gate: Gate,
}

impl<S> WithAuth<S> {
    pub fn new(inner: S, gate: Gate) -> Self {
        WithAuth { inner, gate }
    }
}

impl<S, B, RB> Service<Request<B>> for WithAuth<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = Infallible>,
    S::Future: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = Response<RB>;
    type Error = Infallible;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Response<RB>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let Some(book) = self.gate.current() {
            let header = request.headers().get("authorization").and_then(|v| v.to_str().ok());
            let path = request.uri().path().to_string();
            match book.check(&path, header).map(|t| t.map(|t| (Caller(t.name.clone()), t.digest()))) {
                Ok(Some((caller, digest))) => {
                    request.extensions_mut().insert(caller);
                    request.extensions_mut().insert(Grant { gate: self.gate.clone(), digest, path });
                }
                Ok(None) => {}
                Err(denied) => {
                    let status = match denied {
                        Denied::Unauthenticated(m) => tonic::Status::unauthenticated(m),
                        Denied::Permission(m) => tonic::Status::permission_denied(m),
                    };
                    let rpc = request.uri().path();
                    tracing::debug!(rpc, code = ?status.code(), reason = status.message(), "call refused");
                    return Box::pin(std::future::ready(Ok(status.into_http())));
                }
            }
        }
        Box::pin(self.inner.call(request))
    }
}

impl<S: NamedService> NamedService for WithAuth<S> {
    const NAME: &'static str = S::NAME;
}
