//! The one root check, and the one switch that forbids skipping. Tests that need root
//! (loop devices, network namespaces) skip when not root, and tests that need an external
//! program skip when it is not installed ([`super::program`]) — unless
//! `BLOCKLAB_REQUIRE_ROOT` is set (to anything but `""` or `0`): "require everything".
//! Then a test that would skip (or fall back to regular files) fails instead, so a run
//! that is meant to have everything (CI, `scripts/test` as root, which installs every
//! package) cannot pass a test by skipping it. The variable keeps its name from when root
//! was the only thing a test could lack.

use std::io::Write;

/// The environment variable that turns a skip (for lack of root or of an installed
/// program) into a failure.
pub const REQUIRE_ROOT_VAR: &str = "BLOCKLAB_REQUIRE_ROOT";

/// The environment variable naming a file every skip is also appended to, one line per
/// skip: the test's name, a tab, the reason. `scripts/test` sets it and sums the file up.
pub const SKIP_LOG_VAR: &str = "BLOCKLAB_SKIP_LOG";

/// Whether `require` (the value of [`REQUIRE_ROOT_VAR`]) forbids skipping: set, and
/// neither empty nor `"0"`.
pub(super) fn forbids_skipping(require: Option<&str>) -> bool {
    matches!(require, Some(v) if !v.is_empty() && v != "0")
}

/// Prints `skipping: {why}` and appends it to the file [`SKIP_LOG_VAR`] names, if any.
pub(super) fn report_skip(why: &str) {
    eprintln!("skipping: {why}");
    let Some(log) = std::env::var_os(SKIP_LOG_VAR) else {
        return;
    };
    let test = std::thread::current()
        .name()
        .unwrap_or("an unnamed test")
        .to_string();
    let line = format!("{test}\t{why}\n");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!(
            "warning: cannot record the skip in {}: {e}",
            std::path::Path::new(&log).display()
        );
    }
}

/// Whether this process runs as root. Tests decide with [`require_root`] (or
/// [`super::LoopDevices::provision`], [`super::TestDevices::loop_or_files`]), which apply
/// [`REQUIRE_ROOT_VAR`]; this is only the fact.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The rule, as a pure function of the facts: `true` when a test needing root for `why`
/// runs, `false` when it skips (not root, `require` unset, empty or `"0"`). Panics when
/// not root and `require` (the value of [`REQUIRE_ROOT_VAR`]) is set.
pub fn check_root(is_root: bool, require: Option<&str>, why: &str) -> bool {
    if is_root {
        return true;
    }
    if forbids_skipping(require) {
        panic!(
            "{why}, and this process is not root; {REQUIRE_ROOT_VAR}={} forbids skipping \
             (run the tests as root, or unset {REQUIRE_ROOT_VAR})",
            require.unwrap_or_default()
        );
    }
    false
}

/// [`check_root`] for this process and its environment, without printing.
pub(super) fn root_available(why: &str) -> bool {
    let require = std::env::var(REQUIRE_ROOT_VAR).ok();
    check_root(is_root(), require.as_deref(), why)
}

/// `true` when root. Otherwise prints `skipping: {why}` and returns `false` (the test
/// returns), or panics when [`REQUIRE_ROOT_VAR`] is set. `why` says what needs root, e.g.
/// `"loop devices need root"`.
pub fn require_root(why: &str) -> bool {
    let root = root_available(why);
    if !root {
        report_skip(why);
    }
    root
}

#[cfg(test)]
mod tests {
    use super::check_root;

    #[test]
    fn root_always_runs() {
        for require in [None, Some(""), Some("0"), Some("1")] {
            assert!(check_root(true, require, "loop devices need root"));
        }
    }

    #[test]
    fn not_root_skips_unless_required() {
        for require in [None, Some(""), Some("0")] {
            assert!(!check_root(false, require, "loop devices need root"));
        }
    }

    #[test]
    #[should_panic(expected = "loop devices need root, and this process is not root; \
                    BLOCKLAB_REQUIRE_ROOT=1 forbids skipping")]
    fn not_root_fails_when_required() {
        check_root(false, Some("1"), "loop devices need root");
    }

    #[test]
    #[should_panic(expected = "BLOCKLAB_REQUIRE_ROOT=yes forbids skipping")]
    fn any_other_value_requires_root_too() {
        check_root(false, Some("yes"), "the netns VIP backend needs root");
    }
}
