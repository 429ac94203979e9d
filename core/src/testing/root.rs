//! The one root check. Tests that need root (loop devices, network namespaces) skip when
//! not root — unless `BLOCKLAB_REQUIRE_ROOT` is set (to anything but `""` or `0`): then a
//! test that would skip (or fall back to regular files) fails instead, so a run that is
//! meant to be root (CI, `scripts/test` as root) cannot pass a test by skipping it.

/// The environment variable that turns a skip for lack of root into a failure.
pub const REQUIRE_ROOT_VAR: &str = "BLOCKLAB_REQUIRE_ROOT";

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
    match require {
        Some(v) if !v.is_empty() && v != "0" => panic!(
            "{why}, and this process is not root; {REQUIRE_ROOT_VAR}={v} forbids skipping \
             (run the tests as root, or unset {REQUIRE_ROOT_VAR})"
        ),
        _ => false,
    }
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
        eprintln!("skipping: {why}");
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
