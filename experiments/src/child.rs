//! Child processes that announce their address: every server subcommand of `blocklab`
//! prints `listening on ADDR` once it serves (`repl serve`, `proxy`, `node serve`...).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process that printed `listening on ADDR`; SIGKILLed when dropped.
#[derive(Debug)]
pub struct Announced {
    child: Child,
    pub addr: SocketAddr,
    what: String,
    stderr: PathBuf,
}

impl Announced {
    /// Spawns `cmd` (stderr to `stderr`) and waits up to `timeout` for its
    /// `listening on ADDR` line; a child that exits or stays silent is an error showing
    /// the end of its stderr.
    pub fn spawn(
        cmd: &mut Command,
        what: &str,
        stderr: &Path,
        timeout: Duration,
    ) -> anyhow::Result<Announced> {
        let err = std::fs::File::create(stderr)
            .with_context(|| format!("creating {}", stderr.display()))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let out = child.stdout.take().context("child stdout")?;
        let (tx, rx) = mpsc::channel();
        // Reads the announcement, then drains stdout so the child never blocks on it.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                // `listening on ADDR`, or a longer line ending so (`node N listening on ADDR`).
                if let Some((_, a)) = line.split_once("listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(a.trim().to_string());
                    }
                }
            }
        });
        let mut me = Announced {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            what: what.to_string(),
            stderr: stderr.to_path_buf(),
        };
        match rx.recv_timeout(timeout) {
            Ok(a) => {
                me.addr = a
                    .parse()
                    .with_context(|| format!("{what} announced {a:?}, not an address"))?;
                Ok(me)
            }
            Err(_) => {
                me.kill();
                bail!(
                    "{what} did not announce its address within {timeout:?}; its stderr ends: {}",
                    me.stderr_tail()
                )
            }
        }
    }

    /// The last lines of the child's stderr.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait up to `timeout` for a clean exit (then SIGKILL); an unclean exit
    /// is an error.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<()> {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    bail!("{} exited with {st}: {}", self.what, self.stderr_tail());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("{} did not stop within {timeout:?} of SIGTERM", self.what);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the child has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Announced {
    fn drop(&mut self) {
        self.kill();
    }
}
