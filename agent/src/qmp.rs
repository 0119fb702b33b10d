//! A QEMU Machine Protocol client over a Unix socket: the greeting, then
//! capabilities negotiation, then one command at a time (each answered by
//! its `return` or `error`), events kept aside for who waits on them.
//! Every wait is bounded.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// How long QEMU may take to answer one command.
const ANSWER: Duration = Duration::from_secs(30);
/// Events kept for a later wait; older ones are dropped.
const KEPT_EVENTS: usize = 256;
/// The longest line QEMU may send (answers to queries are a few KiB).
const MAX_LINE: usize = 4 << 20;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP socket {path}: {what}")]
    Protocol { path: PathBuf, what: String },
    /// QEMU refused the command; its error class and description.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Refused {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP socket {path}: no answer to {what} within {after:?}")]
    Timeout {
        path: PathBuf,
        what: String,
        after: Duration,
    },
}

/// One QMP session.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let io = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).await.map_err(io)?;
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(read),
            writer,
            events: VecDeque::new(),
        };
        let greeting = qmp.message("the greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol(format!("expected a QMP greeting, got {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    fn protocol(&self, what: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            what,
        }
    }

    /// The next message, whatever it is.
    async fn message(&mut self, what: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        let read = tokio::time::timeout(ANSWER, async {
            loop {
                line.clear();
                let n = (&mut self.reader)
                    .take(MAX_LINE as u64)
                    .read_line(&mut line)
                    .await?;
                if n == 0 || !line.trim().is_empty() {
                    return Ok::<usize, std::io::Error>(n);
                }
            }
        })
        .await
        .map_err(|_| QmpError::Timeout {
            path: self.path.clone(),
            what: what.to_string(),
            after: ANSWER,
        })?
        .map_err(|source| QmpError::Io {
            path: self.path.clone(),
            source,
        })?;
        if read == 0 {
            return Err(self.protocol("QEMU closed the connection".into()));
        }
        if !line.ends_with('\n') {
            return Err(self.protocol(format!("a message longer than {MAX_LINE} bytes")));
        }
        serde_json::from_str(&line).map_err(|e| self.protocol(format!("not JSON: {e}")))
    }

    /// Runs `command` with `arguments`; its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let message = self.message(command).await?;
            if message.get("event").is_some() {
                self.keep(message);
                continue;
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(QmpError::Refused {
                    command: command.to_string(),
                    class: error["class"].as_str().unwrap_or_default().to_string(),
                    desc: error["desc"].as_str().unwrap_or_default().to_string(),
                });
            }
            return Err(self.protocol(format!(
                "an answer to {command} of neither return nor error: {message}"
            )));
        }
    }

    fn keep(&mut self, event: Value) {
        if self.events.len() == KEPT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Events received so far (and not taken yet).
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }
}

/// Where the agent reaches a VM's QEMU monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Monitor {
    /// A QMP socket of QEMU's own (`-qmp unix:PATH,server=on,wait=off`).
    Socket(PathBuf),
    /// A libvirt domain, whose monitor libvirt holds: each command goes
    /// through `virsh qemu-monitor-command` (libvirt marks the domain
    /// tainted, custom-monitor).
    Libvirt { uri: String, domain: String },
}

impl std::fmt::Display for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Monitor::Socket(path) => write!(f, "QMP socket {}", path.display()),
            Monitor::Libvirt { uri, domain } => write!(f, "libvirt domain {domain} on {uri}"),
        }
    }
}

impl Monitor {
    /// A session with the monitor: connected (and negotiated) for a
    /// socket; nothing to open for libvirt.
    pub async fn connect(&self) -> Result<Session, QmpError> {
        Ok(match self {
            Monitor::Socket(path) => Session::Socket(Qmp::connect(path).await?),
            Monitor::Libvirt { uri, domain } => Session::Libvirt {
                uri: uri.clone(),
                domain: domain.clone(),
            },
        })
    }
}

/// One session with a VM's monitor.
pub enum Session {
    Socket(Qmp),
    Libvirt { uri: String, domain: String },
}

impl Session {
    /// Runs `command` with `arguments`; its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let (uri, domain) = match self {
            Session::Socket(qmp) => return qmp.execute(command, arguments).await,
            Session::Libvirt { uri, domain } => (uri.clone(), domain.clone()),
        };
        let mut request = json!({ "execute": command });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            request["arguments"] = arguments;
        }
        let path = PathBuf::from(format!("virsh -c {uri} qemu-monitor-command {domain}"));
        let out = tokio::time::timeout(
            ANSWER,
            tokio::process::Command::new("virsh")
                .args(["-q", "-c", &uri, "qemu-monitor-command", &domain])
                .arg(request.to_string())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| QmpError::Timeout {
            path: path.clone(),
            what: command.to_string(),
            after: ANSWER,
        })?
        .map_err(|source| QmpError::Io {
            path: path.clone(),
            source,
        })?;
        if !out.status.success() {
            return Err(QmpError::Protocol {
                path,
                what: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let reply: Value = serde_json::from_slice(&out.stdout).map_err(|e| QmpError::Protocol {
            path: path.clone(),
            what: format!("not JSON: {e}"),
        })?;
        if let Some(value) = reply.get("return") {
            return Ok(value.clone());
        }
        match reply.get("error") {
            Some(error) => Err(QmpError::Refused {
                command: command.to_string(),
                class: error["class"].as_str().unwrap_or_default().to_string(),
                desc: error["desc"].as_str().unwrap_or_default().to_string(),
            }),
            None => Err(QmpError::Protocol {
                path,
                what: format!("an answer to {command} of neither return nor error: {reply}"),
            }),
        }
    }

    /// Events received so far (none through libvirt, which keeps them).
    pub fn take_events(&mut self) -> Vec<Value> {
        match self {
            Session::Socket(qmp) => qmp.take_events(),
            Session::Libvirt { .. } => Vec::new(),
        }
    }
}

/// Whether QEMU refused a command because what it names is not there.
pub fn is_not_found(e: &QmpError) -> bool {
    matches!(e, QmpError::Refused { class, desc, .. }
        if class == "DeviceNotFound" || desc.contains("not found") || desc.contains("No active block job")
            || desc.contains("Cannot find device") || desc.contains("Failed to find node"))
}
