//! Progress output for long runs (to stderr, so stdout stays clean for pipes).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `total` steps with a message, elapsed time and an ETA; hidden when stderr is
/// not a terminal, where a plain line per step is printed instead (so CI logs show progress
/// too): `[exp-io] 12/40 <message> (elapsed 1m 2s, eta 3m 10s)`.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
    name: String,
    start: Instant,
}

/// `d` to the second (to the 100 ms under 10 s), as humantime prints it: `3m 10s`.
fn short(d: Duration) -> String {
    let d = if d < Duration::from_secs(10) {
        Duration::from_millis(d.as_millis() as u64 / 100 * 100)
    } else {
        Duration::from_secs(d.as_secs())
    };
    if d.is_zero() {
        return "0s".into();
    }
    humantime::format_duration(d).to_string()
}

/// The time the `total - done` remaining steps take at the pace of the `done` steps so far.
fn eta(elapsed: Duration, done: u64, total: u64) -> Option<Duration> {
    if done == 0 {
        return None;
    }
    let left = total.saturating_sub(done);
    Some(elapsed.mul_f64(left as f64 / done as f64))
}

impl Progress {
    pub fn new(name: &str, total: u64) -> Progress {
        let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let b = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} eta {eta} {msg}",
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
            start: Instant::now(),
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
            None => {
                let elapsed = self.start.elapsed();
                let timing = match eta(elapsed, self.done, self.total) {
                    Some(left) => format!("elapsed {}, eta {}", short(elapsed), short(left)),
                    None => format!("elapsed {}", short(elapsed)),
                };
                eprintln!(
                    "[{}] {}/{} {msg} ({timing})",
                    self.name, self.done, self.total
                );
            }
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
        eprintln!(
            "[{}] done: {} steps in {}",
            self.name,
            self.done,
            short(self.start.elapsed())
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_from_the_pace_so_far() {
        assert_eq!(eta(Duration::from_secs(10), 0, 40), None);
        assert_eq!(
            eta(Duration::from_secs(12), 12, 40),
            Some(Duration::from_secs(28))
        );
        assert_eq!(eta(Duration::from_secs(5), 40, 40), Some(Duration::ZERO));
        assert_eq!(short(Duration::from_millis(190_700)), "3m 10s");
        assert_eq!(short(Duration::from_millis(1_234)), "1s 200ms");
        assert_eq!(short(Duration::ZERO), "0s");
    }
}
