//! A private ZooKeeper server for tests and experiments: Debian's `zookeeper` package
//! started in the foreground on a free port with a temporary data directory, killed (with
//! its whole process group) and cleaned up on drop.
//!
//! ```no_run
//! let zk = blocklab::coord::zk_server::ZkServer::start().unwrap();
//! let spec = zk.spec("/test1"); // "zk://127.0.0.1:PORT/test1"
//! ```
//!
//! The script is `/usr/share/zookeeper/bin/zkServer.sh` unless `BLOCKLAB_ZKSERVER` names
//! another. If it is missing, [`ZkServer::start`] fails with a clear
//! [`CoordError::Server`] message.

use super::{CoordError, CoordSpec, Result};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Default location of Debian's start script.
pub const DEFAULT_SCRIPT: &str = "/usr/share/zookeeper/bin/zkServer.sh";

/// Options of a private server.
#[derive(Debug, Clone)]
pub struct ZkServerOptions {
    /// ZooKeeper's tickTime; session timeouts are clamped to [2, 20] ticks.
    pub tick_time_ms: u32,
    /// How long to wait for `ruok` → `imok`.
    pub start_timeout: Duration,
    /// The start script (default: `BLOCKLAB_ZKSERVER` or [`DEFAULT_SCRIPT`]).
    pub script: PathBuf,
}

impl Default for ZkServerOptions {
    fn default() -> Self {
        ZkServerOptions {
            tick_time_ms: 500,
            start_timeout: Duration::from_secs(60),
            script: script_path(),
        }
    }
}

/// A running private ZooKeeper server.
#[derive(Debug)]
#[must_use = "the server is killed when dropped"]
pub struct ZkServer {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    opts: ZkServerOptions,
}

/// The start script: `BLOCKLAB_ZKSERVER`, else [`DEFAULT_SCRIPT`].
pub fn script_path() -> PathBuf {
    std::env::var_os("BLOCKLAB_ZKSERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SCRIPT))
}

fn free_port() -> Result<u16> {
    crate::netutil::free_port().map_err(|e| CoordError::Io {
        path: "127.0.0.1:0".into(),
        cause: e,
    })
}

/// Sends a four-letter word and returns the answer.
pub fn four_letter(port: u16, word: &str) -> std::io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(word.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

impl ZkServer {
    /// Starts a server with default options.
    pub fn start() -> Result<ZkServer> {
        ZkServer::start_with(ZkServerOptions::default())
    }

    /// Starts a server on a free port with a fresh temporary data directory.
    pub fn start_with(opts: ZkServerOptions) -> Result<ZkServer> {
        if !opts.script.exists() {
            return Err(CoordError::Server(format!(
                "ZooKeeper is not installed: {} not found (install Debian's package: apt-get install -y zookeeper, or set BLOCKLAB_ZKSERVER)",
                opts.script.display()
            )));
        }
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "blocklab-zk-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(dir.join("data")).map_err(|e| CoordError::Io {
            path: dir.display().to_string(),
            cause: e,
        })?;
        let mut server = ZkServer {
            dir,
            port: 0,
            child: None,
            opts,
        };
        // A port found free may be taken before Java binds it: retry a few times.
        let mut last = None;
        for _ in 0..3 {
            server.port = free_port()?;
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| CoordError::Server("could not start".into())))
    }

    fn launch(&mut self) -> Result<()> {
        let cfg = self.dir.join("zoo.cfg");
        let text = format!(
            "tickTime={}\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={}\nclientPortAddress=127.0.0.1\nadmin.enableServer=false\n4lw.commands.whitelist=ruok,srvr,stat\nmaxClientCnxns=0\n",
            self.opts.tick_time_ms,
            self.dir.join("data").display(),
            self.port
        );
        let io = |e| CoordError::Io {
            path: cfg.display().to_string(),
            cause: e,
        };
        std::fs::write(&cfg, text).map_err(io)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| CoordError::Io {
                path: self.log_path().display().to_string(),
                cause: e,
            })?;
        let log2 = log.try_clone().map_err(|e| CoordError::Io {
            path: self.log_path().display().to_string(),
            cause: e,
        })?;
        let child = Command::new(&self.opts.script)
            .arg("start-foreground")
            .arg(&cfg)
            .env("ZOO_LOG_DIR", &self.dir)
            .env(
                "JVMFLAGS",
                "-Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1",
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|e| {
                CoordError::Server(format!("cannot run {}: {e}", self.opts.script.display()))
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + self.opts.start_timeout;
        loop {
            if let Ok(a) = four_letter(self.port, "ruok") {
                if a.starts_with("imok") {
                    return Ok(());
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    return Err(CoordError::Server(format!(
                        "ZooKeeper exited ({status}) before answering ruok; log {}: {}",
                        self.log_path().display(),
                        self.log_tail()
                    )));
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(CoordError::Server(format!(
                    "ZooKeeper on port {} did not answer ruok within {:?}; log {}: {}",
                    self.port,
                    self.opts.start_timeout,
                    self.log_path().display(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, for `zkCli.sh -server`.
    pub fn connect_string(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A [`CoordSpec`] for this server with the given chroot (`/` for none).
    pub fn spec(&self, chroot: &str) -> CoordSpec {
        CoordSpec::ZooKeeper {
            servers: self.connect_string(),
            chroot: chroot.to_string(),
        }
    }

    /// Data and log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server (SIGKILL); its data directory stays.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Kills the server and starts it again on the same port with the same data.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let deadline = Instant::now() + self.opts.start_timeout;
        loop {
            match self.launch() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
