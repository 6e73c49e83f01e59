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
    /// What changed: the tokens now, and the names added, removed, and
    /// whose roles changed.
    pub fn reload(&self, path: &Path) -> Result<serde_json::Value, String> {
        let Some(book) = &self.book else { return Err("token checks are off".into()) };
        let new = TokenBook::load(path)?;
        let current = self.current();
        let (before, after) = (current.as_ref().map(|b| b.grants()).unwrap_or_default(), new.grants());
        let names = |f: &dyn Fn(&String) -> bool, from: &std::collections::BTreeMap<String, Vec<&str>>| {
            from.keys().filter(|n| f(n)).cloned().collect::<Vec<_>>()
        };
        let change = serde_json::json!({
            "file": path.display().to_string(),
            "tokens": new.len(),
            "added": names(&|n| !before.contains_key(n), &after),
            "removed": names(&|n| !after.contains_key(n), &before),
            "roles_changed": names(&|n| before.get(n).is_some_and(|r| after.get(n) != Some(r)), &before),
            // Names only, never digests: a token replaced under the same
            // name (its holder lost it, or someone took it over).
            "secret_changed": current.map(|b| b.secrets_changed(&new)).unwrap_or_default(),
        });
        *book.write().expect("token book lock") = Arc::new(new);
        Ok(change)
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
            let started = std::time::Instant::now();
            let reloaded = tokio::task::spawn_blocking(move || (gate.reload(&path), path)).await;
            // Who holds which role changes here: audited like an admin call.
            let who = crate::audit::Who { token: Some("(SIGHUP)".into()), remote: None };
            match reloaded {
                Ok((Ok(change), path)) => {
                    tracing::info!(file = %path.display(), tokens = %change["tokens"], "token file reloaded");
                    audit.record(&who, "SIGHUP/ReloadTokens", change, Ok(()), started.elapsed());
                }
                Ok((Err(e), path)) => {
                    tracing::error!(error = %e, "token file not reloaded; the tokens in use stay");
                    let status =
                        tonic::Status::invalid_argument(format!("not reloaded, the tokens in use stay: {e}"));
                    let args = serde_json::json!({"file": path.display().to_string()});
                    audit.record(&who, "SIGHUP/ReloadTokens", args, Err(&status), started.elapsed());
                }
                Err(e) => tracing::error!(error = %e, "token file not reloaded; the tokens in use stay"),
            }
        }
    });
    Ok(())
}

/// Whether a refused admin call is logged at warn now: at most one a
/// second, so a caller trying tokens cannot flood the log.
fn admin_refusal_due() -> bool {
    // Monotonic: a wall clock stepped back would silence the warnings for
    // as long as the step. 0 stands for "never": the first is logged.
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    static LAST_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64 + 1_000;
    let last = LAST_MS.load(std::sync::atomic::Ordering::Relaxed);
    now.saturating_sub(last) >= 1_000
        && LAST_MS
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
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
                    // A refused admin call may be someone trying tokens:
                    // logged at warn, at most once a second (the others
                    // at debug, as every other refusal).
                    if rpc.starts_with("/portrait.v1.Admin/") && admin_refusal_due() {
                        tracing::warn!(rpc, code = ?status.code(), reason = status.message(), "admin call refused");
                    } else {
                        tracing::debug!(rpc, code = ?status.code(), reason = status.message(), "call refused");
                    }
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
