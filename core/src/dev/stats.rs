//! A block device's I/O counters from the kernel (`/sys/class/block/NAME/stat`): how many
//! bytes a program wrote to it and how many flushes it sent, whichever program it was.

use std::path::Path;

use super::error::{DevError, Result};

/// Counters of one block device since it appeared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoCounters {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub writes: u64,
    /// Flush requests completed (cache flushes: fsync, fdatasync, FUA-less barriers).
    pub flushes: u64,
}

impl IoCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &IoCounters) -> IoCounters {
        IoCounters {
            bytes_read: self.bytes_read.saturating_sub(earlier.bytes_read),
            bytes_written: self.bytes_written.saturating_sub(earlier.bytes_written),
            writes: self.writes.saturating_sub(earlier.writes),
            flushes: self.flushes.saturating_sub(earlier.flushes),
        }
    }
}

/// Parses the `stat` file's fields (Documentation/block/stat.rst: sectors are 512 bytes;
/// field 16 is flushes, present since Linux 5.5).
pub fn parse_stat(text: &str) -> Option<IoCounters> {
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|w| w.parse().ok())
        .collect::<Option<_>>()?;
    Some(IoCounters {
        bytes_read: f.get(2)? * 512,
        writes: *f.get(4)?,
        bytes_written: f.get(6)? * 512,
        flushes: f.get(15).copied().unwrap_or(0),
    })
}

/// The counters of the block device `dev` (e.g. `/dev/loop3`).
pub fn io_counters(dev: &Path) -> Result<IoCounters> {
    let os = |op, cause| DevError::Os {
        path: dev.to_path_buf(),
        op,
        cause,
    };
    let real = std::fs::canonicalize(dev).map_err(|e| os("resolving", e))?;
    let name = real.file_name().ok_or_else(|| DevError::UnsupportedKind {
        path: dev.to_path_buf(),
    })?;
    let stat = Path::new("/sys/class/block").join(name).join("stat");
    let text = std::fs::read_to_string(&stat).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DevError::UnsupportedKind {
            path: dev.to_path_buf(),
        },
        _ => os("reading its kernel I/O counters", e),
    })?;
    parse_stat(&text).ok_or_else(|| {
        os(
            "parsing its kernel I/O counters",
            std::io::Error::other(text.trim().to_string()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernels_fields() {
        let c = parse_stat(
            "      88        0    21752       50      374      132     3584      472        0      484      844        0        0        0        0      186      322\n",
        )
        .unwrap();
        assert_eq!(c.bytes_read, 21752 * 512);
        assert_eq!(c.writes, 374);
        assert_eq!(c.bytes_written, 3584 * 512);
        assert_eq!(c.flushes, 186);
        assert_eq!(parse_stat("1 2 x"), None);
    }
}
