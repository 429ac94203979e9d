//! Progress output for long runs (to stderr, so stdout stays clean for pipes).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `total` steps with a message; hidden when stderr is not a terminal, where a
/// plain line per step is printed instead (so CI logs show progress too).
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    name: String,
}

impl Progress {
    pub fn new(name: &str, total: u64) -> Progress {
        let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let b = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            ) {
                b.set_style(style);
            }
            b.set_prefix(name.to_string());
            Some(b)
        } else {
            None
        };
        Progress {
            bar,
            total,
            done: 0,
            name: name.to_string(),
        }
    }

    /// One step done; `msg` says which.
    pub fn step(&mut self, msg: &str) {
        self.done += 1;
        match &self.bar {
            Some(b) => {
                b.set_message(msg.to_string());
                b.inc(1);
            }
            None => eprintln!("[{}] {}/{} {}", self.name, self.done, self.total, msg),
        }
    }

    /// A line that does not advance the bar.
    pub fn note(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("[{}] {msg}", self.name),
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
        eprintln!("[{}] done: {} steps", self.name, self.done);
    }
}
