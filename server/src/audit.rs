//! The audit log: one structured line per administrative action — who (the
//! token's name), what (the RPC and its arguments), when, from where, and
//! the result (docs/security.md, "Audit log").
//!
//! Every entry goes to the node's log under the target `audit`; with
//! `--audit-log PATH` it is also appended to that file as one JSON object
//! per line, written and synced before the answer is sent (a call that
//! ends before its action finishes is recorded as `CANCELLED`). A file that cannot be
//! written is logged as an error and does not fail the action (the
//! action's own line still reaches the node's log).
//!
//! Audited: every RPC that changes the cluster or reads it for an operator
//! beyond the reader role — `Admin.ApplySchema` (dry runs too),
//! `AddNode`, `DrainNode`, `RemoveNode`, `TransferLeader`, `ConfirmClock`,
//! `SetClockOffset`, `BackupShard`, `RestoreShard`, `SetPartition`, a
//! node's `Raft.Join`, and token file reloads (`SIGHUP/ReloadTokens`). Calls a
//! token check refused are not audited here (they never reach a service;
//! the node logs them at debug level, refused `Admin` calls at warn).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Who called, as the audit log names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    /// The token's name; `None` on a node without a token file.
    pub token: Option<String>,
    /// The caller's address.
    pub remote: Option<SocketAddr>,
}

/// Where audit entries go besides the node's log.
pub struct AuditLog {
    /// The file, and whether the last write to it failed (see
    /// [`append_line`]).
    file: Option<(PathBuf, Mutex<(std::fs::File, bool)>)>,
    node: u64,
}

impl AuditLog {
    /// Entries of node `node` go to the node's log only.
    pub fn log_only(node: u64) -> AuditLog {
        AuditLog { file: None, node }
    }

    /// Also appends to `path` (created if missing; mode 0600).
    pub fn open(node: u64, path: &Path) -> anyhow::Result<AuditLog> {
        let file = append_to(path)?;
        Ok(AuditLog { file: Some((path.to_path_buf(), Mutex::new((file, false)))), node })
    }

    /// Opens the audit file again by its path (SIGHUP): after a rotation
    /// renamed it, entries go to a new file there. On an error the file in
    /// use stays.
    pub fn reopen(&self) -> anyhow::Result<()> {
        let Some((path, file)) = &self.file else { return Ok(()) };
        let new = append_to(path)?;
        *file.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = (new, false);
        tracing::info!(file = %path.display(), "audit file reopened");
        Ok(())
    }

    /// Records one action: `rpc` with `args`, and its result (`Ok`, or
    /// the status code and message).
    pub fn record(
        &self,
        who: &Who,
        rpc: &str,
        args: Value,
        result: Result<(), &tonic::Status>,
        took: Duration,
    ) {
        let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let entry = entry(self.node, at_ms, who, rpc, args, result, took);
        let line = entry.to_string();
        tracing::info!(target: "audit", "{line}");
        if let Some((path, file)) = &self.file {
            let mut guard = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let (file, torn) = &mut *guard;
            // Synced: admin actions are rare, and an entry must outlive a crash.
            if let Err(e) = append_line(file, torn, &line).and_then(|()| file.sync_data()) {
                tracing::error!(file = %path.display(), error = %e, "cannot write the audit log");
            }
        }
    }
}

/// `path` opened for appending, created if missing; mode 0600 whether it
/// was created or not (entries name callers and their arguments).
fn append_to(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let cannot = |e| anyhow::anyhow!("--audit-log {}: cannot open for appending: {e}", path.display());
    let file =
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(cannot)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(cannot)?;
    Ok(file)
}

/// Appends `line` and a newline. After a failed write (`torn`), a newline
/// first: that write may have left part of a line (a full disk), which
/// would otherwise swallow this entry into one unreadable line. (If it
/// left nothing, the file gets an empty line; readers skip those.)
fn append_line(w: &mut impl Write, torn: &mut bool, line: &str) -> std::io::Result<()> {
    let text = if *torn { format!("\n{line}\n") } else { format!("{line}\n") };
    let result = w.write_all(text.as_bytes());
    *torn = result.is_err();
    result
}

/// An action under way: [`Pending::finish`] records its result; dropped
/// before that (the caller hung up or its deadline passed, which cancels
/// the handler), it records `CANCELLED` — the action may still have taken
/// effect, and the entry says so.
pub struct Pending<'a> {
    log: &'a AuditLog,
    who: Who,
    rpc: &'a str,
    args: Option<Value>,
    started: std::time::Instant,
}

impl<'a> Pending<'a> {
    pub fn new(log: &'a AuditLog, who: Who, rpc: &'a str, args: Value) -> Pending<'a> {
        Pending { log, who, rpc, args: Some(args), started: std::time::Instant::now() }
    }

    pub fn finish(&mut self, result: Result<(), &tonic::Status>) {
        if let Some(args) = self.args.take() {
            self.log.record(&self.who, self.rpc, args, result, self.started.elapsed());
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let cancelled =
            tonic::Status::cancelled("the call ended before the action finished; it may still take effect");
        self.finish(Err(&cancelled));
    }
}

/// Longest status message kept in an entry, and longest string argument
/// (bytes): an entry is synced and logged, and a request's strings are
/// recorded before they are validated (an address of megabytes).
const MAX_MESSAGE_BYTES: usize = 512;

/// `text` cut to at most [`MAX_MESSAGE_BYTES`] (at a character boundary),
/// with `…` where it was cut.
fn clip(text: &mut String) {
    if text.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}

/// Clips every string in `args`, at any depth.
fn clip_strings(args: &mut Value) {
    match args {
        Value::String(text) => clip(text),
        Value::Array(items) => items.iter_mut().for_each(clip_strings),
        Value::Object(fields) => fields.values_mut().for_each(clip_strings),
        _ => {}
    }
}

/// One entry as JSON (keys in a fixed order: serde_json sorts them).
fn entry(
    node: u64,
    at_ms: u64,
    who: &Who,
    rpc: &str,
    mut args: Value,
    result: Result<(), &tonic::Status>,
    took: Duration,
) -> Value {
    clip_strings(&mut args);
    let (ok, code, message) = match result {
        Ok(()) => (true, "OK".to_string(), String::new()),
        Err(status) => {
            let mut message = status.message().to_string();
            clip(&mut message);
            (false, format!("{:?}", status.code()), message)
        }
    };
    json!({
        "at_ms": at_ms,
        "node": node,
        "caller": who.token.as_deref().unwrap_or("(no token file)"),
        "remote": who.remote.map(|a| a.to_string()),
        "rpc": rpc,
        "args": args,
        "ok": ok,
        "code": code,
        "message": message,
        "took_ms": took.as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes `room` bytes, then fails (a disk filling up) until given more.
    struct Disk {
        bytes: Vec<u8>,
        room: usize,
    }

    impl Write for Disk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.room - self.bytes.len());
            if n == 0 {
                return Err(std::io::Error::other("no space left on device"));
            }
            self.bytes.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_torn_write_does_not_swallow_the_next_entry() {
        let (mut disk, mut torn) = (Disk { bytes: Vec::new(), room: 30 }, false);
        append_line(&mut disk, &mut torn, r#"{"rpc":"first"}"#).unwrap();
        assert!(append_line(&mut disk, &mut torn, r#"{"rpc":"second"}"#).is_err(), "the disk is full");
        disk.room = 1000;
        append_line(&mut disk, &mut torn, r#"{"rpc":"third"}"#).unwrap();
        append_line(&mut disk, &mut torn, r#"{"rpc":"fourth"}"#).unwrap();
        let text = String::from_utf8(disk.bytes).unwrap();
        let parsed: Vec<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["rpc"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(parsed, ["first", "third", "fourth"], "{text:?}");
    }

    #[test]
    fn an_entry_names_who_what_when_and_the_result() {
        let who = Who { token: Some("ops".into()), remote: Some("10.0.0.9:5555".parse().unwrap()) };
        let refused = tonic::Status::failed_precondition("node 1 holds the only replica of shard 0");
        let e = entry(
            1,
            1_800_000_000_000,
            &who,
            "Admin/RemoveNode",
            json!({"node_id": 1}),
            Err(&refused),
            Duration::from_millis(3),
        );
        assert_eq!(
            e.to_string(),
            r#"{"args":{"node_id":1},"at_ms":1800000000000,"caller":"ops","code":"FailedPrecondition","message":"node 1 holds the only replica of shard 0","node":1,"ok":false,"remote":"10.0.0.9:5555","rpc":"Admin/RemoveNode","took_ms":3}"#
        );
        let anonymous = Who { token: None, remote: None };
        let e = entry(2, 5, &anonymous, "Admin/ConfirmClock", json!({}), Ok(()), Duration::ZERO);
        assert_eq!(e["caller"], "(no token file)");
        assert_eq!((e["ok"].as_bool(), e["code"].as_str()), (Some(true), Some("OK")));
    }

    #[test]
    fn an_action_dropped_midway_is_recorded_as_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(1, &path).unwrap();
        let who = Who { token: Some("ops".into()), remote: None };
        let mut done = Pending::new(&log, who.clone(), "Admin/AddNode", json!({"node_id": 4}));
        done.finish(Ok(()));
        drop(done);
        drop(Pending::new(&log, who, "Admin/RemoveNode", json!({"node_id": 4})));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!((lines[0]["code"].as_str(), lines[1]["code"].as_str()), (Some("OK"), Some("Cancelled")));
        let long = tonic::Status::invalid_argument("x".repeat(10_000));
        let e = entry(
            1,
            0,
            &Who { token: None, remote: None },
            "Admin/ApplySchema",
            json!({}),
            Err(&long),
            Duration::ZERO,
        );
        assert_eq!(e["message"].as_str().unwrap().len(), MAX_MESSAGE_BYTES + '…'.len_utf8());
    }

    #[test]
    fn a_rotated_file_is_written_anew_once_reopened_and_is_kept_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let log = AuditLog::open(1, &path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600, "an existing file is made private too");
        let who = Who { token: Some("ops".into()), remote: None };
        log.record(&who, "Admin/AddNode", json!({}), Ok(()), Duration::ZERO);
        let rotated = dir.path().join("audit.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen().unwrap();
        log.record(&who, "Admin/RemoveNode", json!({}), Ok(()), Duration::ZERO);
        let rpcs = |p: &Path| -> Vec<String> {
            let text = std::fs::read_to_string(p).unwrap();
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()["rpc"].as_str().unwrap().into())
                .collect()
        };
        assert_eq!(rpcs(&rotated), ["Admin/AddNode"]);
        assert_eq!(rpcs(&path), ["Admin/RemoveNode"]);
        assert_eq!(mode(&path), 0o600);
        AuditLog::log_only(1).reopen().unwrap();
    }

    #[test]
    fn string_arguments_are_clipped_at_any_depth() {
        let huge = "é".repeat(1_000_000);
        let args = json!({"node_id": 4, "addr": huge, "nested": {"list": ["short", huge]}});
        let e = entry(1, 0, &Who { token: None, remote: None }, "Raft/Join", args, Ok(()), Duration::ZERO);
        let clipped = |v: &Value| {
            let text = v.as_str().unwrap();
            assert!(
                text.ends_with('…') && text.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8(),
                "{}",
                text.len()
            );
        };
        clipped(&e["args"]["addr"]);
        clipped(&e["args"]["nested"]["list"][1]);
        assert_eq!(e["args"]["nested"]["list"][0], "short");
        assert_eq!(e["args"]["node_id"], 4);
    }

    #[test]
    fn the_file_gets_one_line_per_action() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(3, &path).unwrap();
        let who = Who { token: Some("ops".into()), remote: None };
        log.record(&who, "Admin/AddNode", json!({"node_id": 4}), Ok(()), Duration::ZERO);
        log.record(&who, "Admin/RemoveNode", json!({"node_id": 4}), Ok(()), Duration::ZERO);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0]["rpc"].as_str(), lines[1]["node"].as_u64()), (Some("Admin/AddNode"), Some(3)));
        let err = AuditLog::open(3, &dir.path().join("no/such/dir/a.log")).err().unwrap().to_string();
        assert!(err.starts_with("--audit-log ") && err.contains("cannot open for appending"), "{err}");
    }
}
