//! The control socket (`run --control PATH`): a Unix stream socket speaking JSON lines. Each
//! request is one line, `{"cmd": "status"}`, answered by one line, `{"ok": true, ...}` or
//! `{"ok": false, "error": "..."}`. A malformed request gets an error and the connection stays
//! open. Requests are served by the sandbox's main thread, which owns the control state; the
//! vCPU threads never see them. `assure-vmm ctl PATH COMMAND` is the client.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 << 10;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket cannot be created.
    #[error("cannot listen on control socket {path}: {source}")]
    Listen {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The client cannot reach the sandbox.
    #[error("cannot talk to {path}: {source}")]
    Connect {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The answer is not a control response.
    #[error("bad response from {path}: {detail}")]
    BadResponse {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// The sandbox's state.
    Status,
    /// Take a checkpoint.
    Checkpoint {
        /// Also return a digest of the captured state.
        #[serde(default)]
        digest: bool,
    },
    /// Roll back to a live checkpoint (the newest when no id is given).
    Rollback {
        /// Checkpoint id.
        #[serde(default)]
        id: Option<u64>,
        /// Also return a digest of the restored state, computed before the guest runs.
        #[serde(default)]
        digest: bool,
    },
    /// Release a checkpoint.
    Release {
        /// Checkpoint id.
        id: u64,
    },
    /// Digest of the running sandbox's state.
    Digest,
    /// Rescue points, injections and open windows.
    Rescue,
    /// Add rescue points: a TOML text of `[[rescue]]` entries.
    RescueAdd {
        /// The TOML.
        toml: String,
    },
    /// Enable or disable a rescue point.
    RescueEnable {
        /// Its name.
        name: String,
        /// On or off.
        enabled: bool,
    },
    /// Add a fault injection (`FUNCTION:nth=N:kind=...`).
    Inject {
        /// The spec.
        spec: String,
    },
    /// Recent events.
    Events {
        /// At most this many (default 20).
        #[serde(default)]
        last: Option<usize>,
    },
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Guest process id.
    pub pid: i32,
    /// Guest program.
    pub program: String,
    /// Live thread ids.
    pub threads: Vec<i32>,
    /// Guest memory size, bytes.
    pub memory_bytes: u64,
    /// Guest memory in use (frames allocated, including page tables), bytes.
    pub memory_used_bytes: u64,
    /// Number of mappings.
    pub mappings: usize,
    /// Open guest fds.
    pub fds: usize,
    /// Syscalls so far, if `--stats` counts them.
    pub syscalls: Option<u64>,
    /// Seconds since the sandbox started.
    pub uptime_seconds: f64,
    /// Live checkpoints and the engine's footprint.
    pub checkpoints: crate::checkpoint::CheckpointStatus,
}

/// The listening side, owned by the sandbox's main thread.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Listen on `path` (an existing socket file there is replaced; any other file is not).
    pub fn bind(path: &Path) -> Result<ControlSocket, ControlError> {
        let err = |source| ControlError::Listen {
            path: path.into(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path).map_err(err)?;
            }
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(ControlSocket {
            listener,
            path: path.into(),
        })
    }

    /// The fd to poll for new connections.
    pub fn fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Serve every pending connection: read requests line by line, answer each with
    /// `handle`. A client gets a bounded time to send; a slow or hostile one is dropped,
    /// never the sandbox.
    pub fn serve(&self, handle: &mut dyn FnMut(Request) -> Result<serde_json::Value, String>) {
        while let Ok((stream, _)) = self.listener.accept() {
            if let Err(e) = serve_connection(stream, handle) {
                tracing::debug!(error = %e, "control connection ended");
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        std::fs::remove_file(&self.path).ok();
    }
}

fn serve_connection(
    stream: UnixStream,
    handle: &mut dyn FnMut(Request) -> Result<serde_json::Value, String>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        // A line longer than MAX_REQUEST is cut there and answered as malformed.
        let n = (&mut reader)
            .take(MAX_REQUEST as u64)
            .read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let response = answer(line.trim(), handle);
        writer.write_all(response.as_bytes())?;
        writer.write_all(b"\n")?;
    }
}

/// Parse a request line strictly: a JSON object with a known `cmd` and no other field that
/// command does not take.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
    let obj = value
        .as_object()
        .ok_or("bad request: expected a JSON object")?;
    let allowed: &[&str] = match obj.get("cmd").and_then(|c| c.as_str()) {
        Some("status") | Some("digest") => &["cmd"],
        Some("checkpoint") => &["cmd", "digest"],
        Some("rollback") => &["cmd", "id", "digest"],
        Some("release") => &["cmd", "id"],
        Some("rescue") => &["cmd"],
        Some("rescue-add") => &["cmd", "toml"],
        Some("rescue-enable") => &["cmd", "name", "enabled"],
        Some("inject") => &["cmd", "spec"],
        Some("events") => &["cmd", "last"],
        Some(other) => {
            return Err(format!(
                "bad request: unknown command {other:?} (known: status, checkpoint, rollback, \
                 release, digest, rescue, rescue-add, rescue-enable, inject, events)"
            ))
        }
        None => return Err("bad request: missing \"cmd\"".into()),
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("bad request: unknown field {k:?}"));
    }
    serde_json::from_value(value).map_err(|e| format!("bad request: {e}"))
}

/// The response line for one request line.
pub fn answer(
    line: &str,
    handle: &mut dyn FnMut(Request) -> Result<serde_json::Value, String>,
) -> String {
    let result = parse_request(line).and_then(handle);
    let value = match result {
        Ok(mut v) => {
            if let Some(obj) = v.as_object_mut() {
                obj.insert("ok".into(), true.into());
                v
            } else {
                serde_json::json!({ "ok": true, "result": v })
            }
        }
        Err(error) => serde_json::json!({ "ok": false, "error": error }),
    };
    value.to_string()
}

/// Client side: send one request line, return the response object.
pub fn request(path: &Path, line: &str) -> Result<serde_json::Value, ControlError> {
    let connect = |source| ControlError::Connect {
        path: path.into(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(connect)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(connect)?;
    stream.write_all(line.as_bytes()).map_err(connect)?;
    stream.write_all(b"\n").map_err(connect)?;
    let mut response = String::new();
    BufReader::new(&stream)
        .read_line(&mut response)
        .map_err(connect)?;
    serde_json::from_str(response.trim()).map_err(|e| ControlError::BadResponse {
        path: path.into(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_handler(req: Request) -> Result<serde_json::Value, String> {
        match req {
            Request::Status => Ok(serde_json::json!({ "pid": 7 })),
            other => Err(format!("not in this test: {other:?}")),
        }
    }

    #[test]
    fn requests_are_parsed_strictly() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).ok(),
            Some(Request::Status)
        );
        let r = answer(r#"{"cmd":"status"}"#, &mut status_handler);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&r).ok(),
            Some(serde_json::json!({"ok": true, "pid": 7}))
        );
        for bad in [
            "",
            "status",
            "{}",
            r#"{"cmd":"reboot"}"#,
            r#"{"cmd":"status","x":1}"#,
            "\u{0}",
        ] {
            let r: serde_json::Value =
                serde_json::from_str(&answer(bad, &mut status_handler)).expect("json");
            assert_eq!(r["ok"], false, "{bad:?}");
            assert!(
                r["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("bad request")),
                "{bad:?}: {r}"
            );
        }
    }

    #[test]
    fn checkpoint_commands_parse_with_their_fields_only() {
        assert_eq!(
            parse_request(r#"{"cmd":"checkpoint"}"#),
            Ok(Request::Checkpoint { digest: false })
        );
        assert_eq!(
            parse_request(r#"{"cmd":"rollback","id":3,"digest":true}"#),
            Ok(Request::Rollback {
                id: Some(3),
                digest: true
            })
        );
        assert_eq!(
            parse_request(r#"{"cmd":"rollback"}"#),
            Ok(Request::Rollback {
                id: None,
                digest: false
            })
        );
        assert_eq!(
            parse_request(r#"{"cmd":"release","id":9}"#),
            Ok(Request::Release { id: 9 })
        );
        assert_eq!(parse_request(r#"{"cmd":"digest"}"#), Ok(Request::Digest));
        for bad in [
            r#"{"cmd":"release"}"#,
            r#"{"cmd":"release","id":-1}"#,
            r#"{"cmd":"release","id":"x"}"#,
            r#"{"cmd":"checkpoint","id":1}"#,
            r#"{"cmd":"rollback","id":1.5}"#,
            r#"{"cmd":"checkpoint","digest":"yes"}"#,
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_socket_serves_several_requests_per_connection() {
        let dir = std::env::temp_dir().join(format!("assure-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("ctl.sock");
        let sock = ControlSocket::bind(&path).expect("bind");
        let client = std::thread::spawn({
            let path = path.clone();
            move || {
                let mut s = UnixStream::connect(&path).expect("connect");
                s.write_all(b"{\"cmd\":\"status\"}\nnot json\n")
                    .expect("send");
                s.shutdown(std::net::Shutdown::Write).expect("shutdown");
                let mut out = String::new();
                std::io::Read::read_to_string(&mut s, &mut out).expect("read");
                out
            }
        });
        // Serve until the client's connection has been handled.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !client.is_finished() && std::time::Instant::now() < deadline {
            sock.serve(&mut status_handler);
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = client.join().expect("client");
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0]["ok"], true);
        assert_eq!(lines[1]["ok"], false);
        drop(sock);
        assert!(
            !path.exists(),
            "the socket file is removed with the sandbox"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
