//! A process's CPU time and peak memory from the kernel (`/proc/PID/stat`, `/proc/PID/status`),
//! for processes blocklab does not wait for itself (a daemon that forked away) and for
//! the children it waited for.

use std::time::Duration;

/// The fields of `/proc/PID/stat` after the command name (field 3, `state`, first).
fn stat_fields(pid: &str) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    Some(
        rest.split_whitespace()
            .skip(1)
            .map(|w| w.parse().unwrap_or(0))
            .collect(),
    )
}

fn ticks(t: u64) -> Duration {
    Duration::from_secs_f64(t as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// CPU time (user + system) process `pid` has used so far (clock-tick resolution).
pub fn cpu_of(pid: u32) -> Option<Duration> {
    let f = stat_fields(&pid.to_string())?;
    // utime and stime are fields 14 and 15: indices 10 and 11 after `state` is skipped.
    Some(ticks(f.get(10)? + f.get(11)?))
}

/// CPU time (user + system) of this process's children that it has waited for.
pub fn children_cpu() -> Option<Duration> {
    let f = stat_fields("self")?;
    // cutime and cstime: fields 16 and 17.
    Some(ticks(f.get(12)? + f.get(13)?))
}

/// Peak resident set size of process `pid` in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        // Burn a little CPU so the counter has something to show at tick resolution.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        assert!(x != 1);
        assert!(cpu_of(me).is_some());
        assert!(children_cpu().is_some());
        assert!(peak_rss_kib(me).unwrap() > 0);
        assert_eq!(cpu_of(u32::MAX), None);
    }
}
