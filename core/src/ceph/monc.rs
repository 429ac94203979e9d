//! Monitor commands over one librados session.
//!
//! Ceph's own tools (`ceph`, ceph-volume) open a session per command. A session here is
//! one run of a small Python program on Debian's `python3-rados` (the library the `ceph`
//! command itself uses): it connects once, sends every command it was given at once (a
//! thread each, so the monitor sees them together), and prints each answer. A batch is one
//! session with many commands; a lone command is a session of its own, as with `ceph`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::conf::CephConf;
use super::error::{CephError, Result};

/// The Python interpreter that has Debian's `rados` module.
pub const PYTHON: &str = "/usr/bin/python3";

const SCRIPT: &str = r#"
import json, sys, threading, time, rados
req = json.load(sys.stdin)
t0 = time.monotonic()
r = rados.Rados(conffile=req["conf"], name=req["name"], conf={"keyring": req["keyring"]})
r.connect(timeout=req["timeout"])
connect_ms = (time.monotonic() - t0) * 1e3
out = [None] * len(req["commands"])
def run(i, c):
    t = time.monotonic()
    ret, buf, err = r.mon_command(json.dumps(c["cmd"]), c["input"].encode(), timeout=req["timeout"])
    out[i] = {"ret": ret, "out": buf.decode(errors="replace"), "err": err, "ms": (time.monotonic() - t) * 1e3}
ts = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(req["commands"])]
for t in ts: t.start()
for t in ts: t.join()
r.shutdown()
json.dump({"connect_ms": connect_ms, "answers": out}, sys.stdout)
"#;

/// One monitor command: its JSON (`{"prefix": "osd new", ...}`) and its input (`-i`).
#[derive(Debug, Clone, Serialize)]
pub struct MonCommand {
    pub cmd: Value,
    pub input: String,
}

impl MonCommand {
    pub fn new(cmd: Value) -> MonCommand {
        MonCommand {
            cmd,
            input: String::new(),
        }
    }
    fn prefix(&self) -> String {
        self.cmd["prefix"].as_str().unwrap_or("?").to_string()
    }
}

/// The monitor's answer to one command.
#[derive(Debug, Clone, Deserialize)]
pub struct MonAnswer {
    pub ret: i64,
    pub out: String,
    pub err: String,
    /// From sending the command to its answer, inside the session.
    pub ms: f64,
}

/// What one session did.
#[derive(Debug, Clone, Deserialize)]
pub struct SessionReport {
    pub connect_ms: f64,
    pub answers: Vec<MonAnswer>,
}

/// Who talks to the monitor: an entity and its keyring.
#[derive(Debug, Clone)]
pub struct MonClient {
    conf: PathBuf,
    name: String,
    keyring: PathBuf,
    timeout: Duration,
}

impl MonClient {
    /// The cluster's administrator (`client.admin`).
    pub fn admin(c: &CephConf) -> MonClient {
        MonClient::entity(c, "client.admin")
    }
    /// The entity OSD deployment uses (`client.bootstrap-osd`, as ceph-volume does).
    pub fn bootstrap_osd(c: &CephConf) -> MonClient {
        MonClient::entity(c, "client.bootstrap-osd")
    }
    fn entity(c: &CephConf, name: &str) -> MonClient {
        MonClient {
            conf: c.conf_path(),
            name: name.into(),
            keyring: c.keyring(name),
            timeout: Duration::from_secs(30),
        }
    }

    /// Runs `commands` in one session, all in flight together; each answer in order. A
    /// refused command is an answer (`ret < 0`), not an error.
    pub fn session(&self, commands: &[MonCommand]) -> Result<SessionReport> {
        if !Path::new(PYTHON).exists() {
            return Err(CephError::Missing {
                program: PYTHON,
                package: "python3-rados",
            });
        }
        let req = json!({
            "conf": self.conf,
            "name": self.name,
            "keyring": self.keyring,
            "timeout": self.timeout.as_secs(),
            "commands": commands,
        });
        let what = match commands {
            [one] => format!("monitor command {}", one.prefix()),
            _ => format!("a session of {} monitor commands", commands.len()),
        };
        let mut child = Command::new(PYTHON)
            .args(["-c", SCRIPT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|cause| CephError::Spawn {
                program: PYTHON.into(),
                cause,
            })?;
        // The request is small; the pipe takes it whole before the child reads.
        let body = serde_json::to_vec(&req).expect("a JSON value serialises");
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&body).map_err(|cause| CephError::Spawn {
                program: PYTHON.into(),
                cause,
            })?;
        }
        let out = child.wait_with_output().map_err(|cause| CephError::Spawn {
            program: PYTHON.into(),
            cause,
        })?;
        if !out.status.success() {
            return Err(CephError::Failed {
                what,
                status: out.status,
                stderr: last_line(&out.stderr),
            });
        }
        let rep: SessionReport =
            serde_json::from_slice(&out.stdout).map_err(|_| CephError::Parse {
                what: what.clone(),
                text: String::from_utf8_lossy(&out.stdout).into_owned(),
            })?;
        if rep.answers.len() != commands.len() {
            return Err(CephError::Parse {
                what,
                text: format!("{} answers", rep.answers.len()),
            });
        }
        Ok(rep)
    }

    /// One command in a session of its own; its output, or the monitor's refusal.
    pub fn command(&self, c: MonCommand) -> Result<String> {
        let rep = self.session(std::slice::from_ref(&c))?;
        let a = rep
            .answers
            .into_iter()
            .next()
            .expect("one answer per command");
        a.into_result(&c)
    }
}

impl MonAnswer {
    /// The output, or the monitor's refusal as an error.
    pub fn into_result(self, c: &MonCommand) -> Result<String> {
        if self.ret < 0 {
            return Err(CephError::Command {
                command: c.prefix(),
                code: self.ret,
                message: self.err,
            });
        }
        Ok(self.out)
    }
}

/// The last non-empty line of a program's error output (the reason; the rest is log).
pub(super) fn last_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
        .to_string()
}
