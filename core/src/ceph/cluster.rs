//! A private cluster's life: created by the manual deployment steps (keyrings with
//! `ceph-authtool`, a monitor map with `monmaptool`, `ceph-mon --mkfs`), its monitor
//! started, and everything torn down again.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::json;

use super::asok;
use super::conf::{CephConf, CLUSTER_NAME};
use super::error::{CephError, Result};
use super::monc::last_line;

/// Ceph's programs and the Debian packages that have them.
pub const PROGRAMS: [(&str, &str); 5] = [
    ("ceph-mon", "ceph-mon"),
    ("ceph-osd", "ceph-osd"),
    ("ceph-authtool", "ceph-common"),
    ("monmaptool", "ceph-base"),
    ("ceph", "ceph-common"),
];

/// What is missing for a private cluster, if anything: the first of [`PROGRAMS`] not on
/// `PATH` (or in /usr/sbin), or Debian's Python without its `rados` module; as (what,
/// Debian package).
pub fn missing() -> Option<(&'static str, &'static str)> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<std::path::PathBuf> = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .collect();
    if let Some(&(p, pkg)) = PROGRAMS
        .iter()
        .find(|(p, _)| !dirs.iter().any(|d| d.join(p).exists()))
    {
        return Some((p, pkg));
    }
    let rados = Command::new(super::monc::PYTHON)
        .args(["-c", "import rados"])
        .output()
        .is_ok_and(|o| o.status.success());
    (!rados).then_some(("python3 with the rados module", "python3-rados"))
}

/// Runs one of Ceph's programs to completion; its output, or why it failed.
pub(super) fn run(program: &'static str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|cause| match cause.kind() {
            std::io::ErrorKind::NotFound => CephError::Missing {
                program,
                package: PROGRAMS
                    .iter()
                    .find(|(p, _)| *p == program)
                    .map_or("ceph", |(_, pkg)| pkg),
            },
            _ => CephError::Spawn {
                program: program.into(),
                cause,
            },
        })?;
    if !out.status.success() {
        return Err(CephError::Failed {
            what: format!("{program} {}", args.first().copied().unwrap_or_default()),
            status: out.status,
            stderr: last_line(&out.stderr),
        });
    }
    Ok(out)
}

/// A running private cluster with one monitor. Dropping it tears it down.
#[derive(Debug)]
pub struct CephCluster {
    conf: CephConf,
    torn_down: bool,
}

impl CephCluster {
    /// Creates a cluster in `dir` (which must not exist or be empty) with its monitor on
    /// `mon_addr`, starts the monitor and waits until it has formed its quorum of one.
    pub fn create(dir: &Path, mon_addr: std::net::SocketAddr) -> Result<CephCluster> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |cause| CephError::Io { what, path, cause }
        };
        if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(CephError::Exists {
                path: dir.to_path_buf(),
            });
        }
        let conf = CephConf::new(dir, mon_addr);
        for d in [
            conf.run_dir(),
            conf.log_dir(),
            conf.mon_data(),
            conf.dir.join("osd"),
        ] {
            std::fs::create_dir_all(&d).map_err(io("creating", &d))?;
        }
        // From here on a failure removes what was made.
        let cluster = CephCluster {
            conf,
            torn_down: false,
        };
        let c = &cluster.conf;
        c.save()?;
        std::fs::write(c.conf_path(), c.render()).map_err(io("writing", &c.conf_path()))?;
        let path = |p: PathBuf| p.display().to_string();
        let mon_keyring = path(c.mon_keyring());
        run(
            "ceph-authtool",
            &[
                "--create-keyring",
                &mon_keyring,
                "--gen-key",
                "-n",
                "mon.",
                "--cap",
                "mon",
                "allow *",
            ],
        )?;
        for (entity, caps) in [
            (
                "client.admin",
                &[
                    "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *",
                ][..],
            ),
            (
                "client.bootstrap-osd",
                &[
                    "--cap",
                    "mon",
                    "profile bootstrap-osd",
                    "--cap",
                    "mgr",
                    "allow r",
                ][..],
            ),
        ] {
            let k = path(c.keyring(entity));
            let mut args = vec!["--create-keyring", &k, "--gen-key", "-n", entity];
            args.extend_from_slice(caps);
            run("ceph-authtool", &args)?;
            run("ceph-authtool", &[&mon_keyring, "--import-keyring", &k])?;
        }
        let monmap = path(c.monmap());
        let fsid = c.fsid.to_string();
        let addr = format!("[v1:{}]", c.mon_addr);
        run(
            "monmaptool",
            &["--create", "--addv", "a", &addr, "--fsid", &fsid, &monmap],
        )?;
        let conf_path = path(c.conf_path());
        let common = ["--cluster", CLUSTER_NAME, "-c", &conf_path, "-i", "a"];
        let mut mkfs = common.to_vec();
        mkfs.extend_from_slice(&["--mkfs", "--monmap", &monmap, "--keyring", &mon_keyring]);
        run("ceph-mon", &mkfs)?;
        // Without -f the monitor daemonises once it is ready to serve.
        run("ceph-mon", &common)?;
        cluster.await_quorum(Duration::from_secs(30))?;
        Ok(cluster)
    }

    pub fn conf(&self) -> &CephConf {
        &self.conf
    }

    /// Leaves the cluster running after this handle is gone (`blocklab ceph create`);
    /// [`teardown`] with the returned description stops it.
    pub fn detach(mut self) -> CephConf {
        self.torn_down = true;
        self.conf.clone()
    }

    /// Waits until the monitor says it leads its quorum (on its admin socket).
    fn await_quorum(&self, timeout: Duration) -> Result<()> {
        let sock = self.conf.admin_socket("mon.a");
        let start = Instant::now();
        loop {
            let st = asok::command(&sock, &json!({"prefix": "mon_status"}), timeout);
            if let Ok(v) = &st {
                if v["state"] == "leader" {
                    return Ok(());
                }
            }
            if start.elapsed() > timeout {
                return Err(CephError::Timeout {
                    what: "the monitor's quorum".into(),
                    secs: timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops every process of the cluster (SIGKILL: nothing of it is kept) and removes its
    /// directory. Only processes started with this cluster's config file are touched.
    pub fn teardown(mut self) -> Result<()> {
        self.torn_down = true;
        teardown(&self.conf)
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        if !self.torn_down {
            let _ = teardown(&self.conf);
        }
    }
}

/// Kills the processes of the cluster `conf` (found by their command line naming its
/// config file), waits until they are gone and removes the cluster's directory.
pub fn teardown(conf: &CephConf) -> Result<()> {
    let procs = processes(&conf.conf_path());
    for &pid in &procs {
        // A process that exited meanwhile is fine.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
    let start = Instant::now();
    while procs
        .iter()
        .any(|p| Path::new(&format!("/proc/{}", p.as_raw_nonzero())).exists())
    {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(CephError::Timeout {
                what: "stopping the cluster's daemons".into(),
                secs: 10.0,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match std::fs::remove_dir_all(&conf.dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CephError::Io {
            what: "removing the cluster directory",
            path: conf.dir.clone(),
            cause: e,
        }),
        _ => Ok(()),
    }
}

/// The sum of the peak resident sets (KiB) of the cluster's processes now running (the
/// monitor and the OSDs): each process's own peak, so an upper bound of the cluster's peak.
pub fn peak_rss_kib(conf: &CephConf) -> u64 {
    processes(&conf.conf_path())
        .into_iter()
        .filter_map(|p| crate::procstat::peak_rss_kib(p.as_raw_nonzero().get() as u32))
        .sum()
}

/// The processes whose command line has `conf` as an argument.
pub fn processes(conf: &Path) -> Vec<rustix::process::Pid> {
    let want = conf.as_os_str().as_encoded_bytes();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == want)
            .then(|| rustix::process::Pid::from_raw(pid))
            .flatten()
    })
    .collect()
}
