//! Child processes for tests: killed and reaped on drop, and read line by line.

use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use super::wait::wait_for_some;

/// A child process, killed (SIGKILL) and reaped on drop (every exit path of a test).
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Spawns `cmd` (as configured: pipes and all).
    pub fn spawn(cmd: &mut Command) -> KillOnDrop {
        KillOnDrop(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
        )
    }

    /// SIGKILLs the process now (a crash) and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        self.0.kill().expect("sending SIGKILL");
        self.0.wait().expect("waiting for the child")
    }

    /// Sends SIGINT (as Ctrl-C would) and waits for the process to exit.
    pub fn interrupt(&mut self) -> ExitStatus {
        let pid = rustix::process::Pid::from_child(&self.0);
        rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("sending SIGINT");
        self.0.wait().expect("waiting for the child")
    }

    /// Waits until the process exits by itself; panics naming `what` after `timeout` (a
    /// hung child fails the test instead of hanging it).
    pub fn wait_exit(&mut self, what: &str, timeout: Duration) -> ExitStatus {
        wait_for_some(what, timeout, || {
            self.0.try_wait().expect("waiting for the child")
        })
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` with stdout piped and returns it with its stdout as lines.
pub fn spawn_lines(cmd: &mut Command) -> (KillOnDrop, Lines<BufReader<ChildStdout>>) {
    let mut child = KillOnDrop::spawn(cmd.stdout(Stdio::piped()));
    let out = child.0.stdout.take().expect("piped stdout");
    (child, BufReader::new(out).lines())
}

/// Spawns `cmd` with stdout piped and returns it with the first line it prints (servers
/// announce their address that way). Panics if it exits before printing one.
pub fn spawn_announcing(cmd: &mut Command) -> (KillOnDrop, String) {
    let (child, mut lines) = spawn_lines(cmd);
    let line = next_line_where(&mut lines, &format!("{cmd:?}"), |_| true);
    (child, line)
}

/// Reads `lines` until one satisfies `pred` and returns it; panics naming `what` when the
/// lines end first (the process exited). Blocks while the process prints nothing.
pub fn next_line_where<R: BufRead>(
    lines: &mut Lines<R>,
    what: &str,
    mut pred: impl FnMut(&str) -> bool,
) -> String {
    loop {
        match lines.next() {
            Some(Ok(l)) if pred(&l) => return l,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("{what}: reading its output: {e}"),
            None => panic!("{what}: exited before printing the line waited for"),
        }
    }
}

/// Stdout then stderr of a finished command, as text (for assertion messages).
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts that a finished command succeeded, showing its output otherwise.
#[track_caller]
pub fn assert_success(o: &Output) {
    assert!(o.status.success(), "{}: {}", o.status, output_text(o));
}
