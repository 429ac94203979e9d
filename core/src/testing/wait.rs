//! Waiting for an observable condition, with a deadline that fails the test, instead of
//! sleeping for a while and hoping. Deadlines are generous and never asserted on.

use std::fmt::Display;
use std::time::{Duration, Instant};

use crate::coord::{Watch, WatchEvent};

/// Polls `f` every 10 ms until it holds; panics naming `what` after `timeout`.
#[track_caller]
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    wait_for_some(what, timeout, || f().then_some(()))
}

/// Polls `f` every 10 ms until it returns a value, and returns it; panics naming `what`
/// after `timeout`.
#[track_caller]
pub fn wait_for_some<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Calls `f` until it succeeds (every 100 ms, printing each error) and returns its value;
/// panics with the last error after `timeout`. For requests that fail while a server
/// restarts or a session reconnects.
#[track_caller]
pub fn retry<T, E: Display>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                eprintln!("{what}: retrying after: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{what}: still failing after {timeout:?}: {e}"),
        }
    }
}

/// Receives events from `w` until one satisfies `pred` (which sees every event, so it can
/// also note the others) and returns it; panics naming `what` after `timeout`.
#[track_caller]
pub fn next_event(
    w: &Watch,
    what: &str,
    timeout: Duration,
    mut pred: impl FnMut(&WatchEvent) -> bool,
) -> WatchEvent {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        if let Some(ev) = w.recv_timeout(left.min(Duration::from_millis(200))) {
            if pred(&ev) {
                return ev;
            }
        }
    }
}
