//! The one check for an external program a test runs: ZooKeeper's `zkServer.sh`
//! ([`require_zookeeper`]), fio, `mkfs.ext4`, `ip`. When the program is not installed the
//! test skips, printing `skipping: <program> is not installed (apt-get install
//! <package>)` — unless `BLOCKLAB_REQUIRE_ROOT` ("require everything", see [`super::root`])
//! is set: then it fails, as a test that lacks root does.

use std::path::{Path, PathBuf};

use super::root::{forbids_skipping, report_skip, REQUIRE_ROOT_VAR};

/// Searched after `PATH`: Debian installs `mkfs.ext4` (and `ip` links) in the sbin
/// directories, which are not on an ordinary user's `PATH`.
const SBIN: [&str; 2] = ["/usr/sbin", "/sbin"];

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where program `name` is: `name` itself when it contains a `/`, else the first
/// executable file `name` on `PATH` or in `/usr/sbin`, `/sbin`. `None` when there is none.
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable_file(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable_file(p))
}

/// [`find_program`], or `name` as it is (for [`std::process::Command`], whose error then
/// says it was not found).
pub fn program_path(name: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| PathBuf::from(name))
}

/// The rule, without printing: `true` when `program` is installed, `false` when it is not
/// and `require` (the value of [`REQUIRE_ROOT_VAR`]) is unset, empty or `"0"`. Panics when
/// it is not installed and `require` forbids skipping.
pub fn check_program(program: &str, package: &str, require: Option<&str>) -> bool {
    if find_program(program).is_some() {
        return true;
    }
    if forbids_skipping(require) {
        panic!(
            "{}; {REQUIRE_ROOT_VAR}={} forbids skipping (install it, or unset \
             {REQUIRE_ROOT_VAR})",
            not_installed(program, package),
            require.unwrap_or_default()
        );
    }
    false
}

fn not_installed(program: &str, package: &str) -> String {
    format!("{program} is not installed (apt-get install {package})")
}

/// `true` when `program` (a name on `PATH`, or a path) is installed. Otherwise prints
/// `skipping: {program} is not installed (apt-get install {package})` and returns `false`
/// (the test returns), or panics when [`REQUIRE_ROOT_VAR`] is set.
pub fn require_program(program: &str, package: &str) -> bool {
    let require = std::env::var(REQUIRE_ROOT_VAR).ok();
    let found = check_program(program, package, require.as_deref());
    if !found {
        report_skip(&not_installed(program, package));
    }
    found
}

/// [`require_program`] for the script [`ZkServer`](crate::coord::zk_server::ZkServer)
/// starts (`BLOCKLAB_ZKSERVER`, else Debian's `zkServer.sh`), from package `zookeeper`.
/// Every test that starts a private ZooKeeper server begins with it.
pub fn require_zookeeper() -> bool {
    let script = crate::coord::zk_server::script_path();
    require_program(&script.to_string_lossy(), "zookeeper")
}

/// [`require_program`] for everything a private Ceph cluster needs
/// ([`crate::ceph::PROGRAMS`], and Debian's Python with its `rados` module for monitor
/// sessions). Every test that starts a Ceph cluster begins with it.
pub fn require_ceph() -> bool {
    match crate::ceph::missing() {
        None => true,
        // The same skip-or-fail rule as any missing program.
        Some((what, package)) => require_program(what, package),
    }
}

#[cfg(test)]
mod tests {
    use super::{check_program, find_program};

    const MISSING: &str = "blocklab-no-such-program";

    #[test]
    fn an_installed_program_runs_whatever_is_required() {
        // `sh` is on every Debian system (package dash), also as an absolute path.
        for require in [None, Some(""), Some("0"), Some("1")] {
            assert!(check_program("sh", "dash", require));
            assert!(check_program("/bin/sh", "dash", require));
        }
    }

    #[test]
    fn a_missing_program_skips_unless_required() {
        assert_eq!(find_program(MISSING), None);
        for require in [None, Some(""), Some("0")] {
            assert!(!check_program(MISSING, "no-such-package", require));
            assert!(!check_program(
                "/nonexistent/zkServer.sh",
                "zookeeper",
                require
            ));
        }
    }

    #[test]
    #[should_panic(
        expected = "blocklab-no-such-program is not installed (apt-get install \
                               no-such-package); BLOCKLAB_REQUIRE_ROOT=1 forbids skipping"
    )]
    fn a_missing_program_fails_when_required() {
        check_program(MISSING, "no-such-package", Some("1"));
    }

    #[test]
    #[should_panic(
        expected = "/nonexistent/zkServer.sh is not installed (apt-get install \
                               zookeeper); BLOCKLAB_REQUIRE_ROOT=yes forbids skipping"
    )]
    fn a_missing_path_fails_when_required_too() {
        check_program("/nonexistent/zkServer.sh", "zookeeper", Some("yes"));
    }

    #[test]
    fn a_directory_or_a_plain_file_is_not_a_program() {
        assert_eq!(find_program("/tmp"), None);
        let dir = crate::testing::scratch();
        let f = dir.path().join("not-executable");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        assert!(!check_program(&f.to_string_lossy(), "none", None));
    }
}
