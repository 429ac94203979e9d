//! Arguments every experiment binary takes.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// Seconds: used by tests and CI.
    Quick,
    /// The paper's figures.
    Full,
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Profile::Quick => "quick",
            Profile::Full => "full",
        })
    }
}

/// Flattened into every experiment's clap arguments.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// quick: seconds (tests, CI); full: the paper's figures.
    #[arg(long, value_enum, default_value_t = Profile::Quick)]
    pub profile: Profile,
    /// Directory the CSV and meta.json go to (created if missing).
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Block devices to use (they will be overwritten; each must look unused, see --force,
    /// and must not be mounted or held by another driver).
    #[arg(long, num_args = 1.., value_delimiter = ',', conflicts_with_all = ["provision", "files", "size"])]
    pub devices: Vec<PathBuf>,
    /// Provision loop devices from sparse files (root), torn down at exit: as many as the
    /// run uses, which must be at most this many.
    #[arg(long, requires = "size", conflicts_with = "files")]
    pub provision: Option<usize>,
    /// Size of each provisioned device or file: bytes or K/M/G/T (powers of 1024), 4 KiB aligned.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Use regular files (O_DIRECT) in this directory instead of block devices.
    #[arg(long)]
    pub files: Option<PathBuf>,
    /// Repetitions per configuration (default: the profile's).
    #[arg(long)]
    pub repetitions: Option<u32>,
    /// Replace an existing CSV / meta.json in --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Overwrite devices given with --devices even if they hold data (never a mounted
    /// device or one held by another driver).
    #[arg(long)]
    pub force: bool,
    /// Where provisioned loop devices' backing files and state live.
    #[arg(long, default_value = blocklab::dev::provision::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

impl CommonArgs {
    /// The repetitions to run: `--repetitions`, else `quick` or `full` by profile.
    pub fn repetitions_or(&self, quick: u32, full: u32) -> u32 {
        self.repetitions.unwrap_or(match self.profile {
            Profile::Quick => quick,
            Profile::Full => full,
        })
    }
    /// `quick` or `full` by profile.
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        match self.profile {
            Profile::Quick => quick,
            Profile::Full => full,
        }
    }
}

/// A list flag's values, or `default` when it was not given (an empty list).
pub fn or_default<T: Clone>(given: &[T], default: Vec<T>) -> Vec<T> {
    if given.is_empty() {
        default
    } else {
        given.to_vec()
    }
}

// Every size and duration argument of every CLI goes through `parse_size_in` and
// `parse_duration` below; the other functions only say which unit a bare number is in
// (the one the flag's name carries, as in `--volume-mib 16`) and what the value must be.

/// The one size parser: `4096`, `256M`, `1.5G`, `64KiB`, `1 GiB`... (parse-size; K, M, G,
/// T... and KiB, MiB... are all powers of 1024, the B optional, case ignored). A bare number
/// counts `unit` bytes.
fn parse_size_in(s: &str, unit: u64) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .with_default_factor(unit)
        .parse_size(s.trim())
        .map_err(|e| format!("{s:?}: not a size (e.g. 4096, 256M, 1.5G, 64KiB): {e}"))
}

/// A device size or length: positive and a multiple of 4096 bytes (a bare number is bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    match parse_offset(s)? {
        0 => Err(format!("{s:?}: size must be positive")),
        bytes => Ok(bytes),
    }
}

/// A byte offset on a device: 0, or a multiple of 4096 bytes.
pub fn parse_offset(s: &str) -> Result<u64, String> {
    let bytes = parse_size_in(s, 1)?;
    if bytes % 4096 != 0 {
        return Err(format!("{s:?} = {bytes} bytes is not a multiple of 4096"));
    }
    Ok(bytes)
}

/// A number of bytes, any (a bare number is bytes): `56`, `1K`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size_in(s, 1)
}

/// A whole number of MiB (flags named `-mib`): `16` or `16M`, `1G`, `2048K`.
pub fn parse_mib(s: &str) -> Result<u64, String> {
    const MIB: u64 = 1 << 20;
    let bytes = parse_size_in(s, MIB)?;
    if bytes % MIB != 0 {
        return Err(format!("{s:?} is not a whole number of MiB"));
    }
    Ok(bytes / MIB)
}

/// The unit a bare number means in a duration argument: the one the flag's name carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeUnit {
    Micros,
    Millis,
    Secs,
}

impl TimeUnit {
    fn suffix(self) -> &'static str {
        match self {
            TimeUnit::Micros => "us",
            TimeUnit::Millis => "ms",
            TimeUnit::Secs => "s",
        }
    }
    fn nanos(self) -> u128 {
        match self {
            TimeUnit::Micros => 1_000,
            TimeUnit::Millis => 1_000_000,
            TimeUnit::Secs => 1_000_000_000,
        }
    }
}

/// The one duration parser: `100ms`, `1.5s`, `250us`, `2min`, `1h 30min` (humantime's
/// spellings), or a bare number, fractions allowed, of `unit` (`--gap-ms 300`,
/// `--seconds 0.8`).
pub fn parse_duration(s: &str, unit: TimeUnit) -> Result<Duration, String> {
    let t = s.trim();
    let bare = t.starts_with(|c: char| c.is_ascii_digit())
        && t.chars().all(|c| c.is_ascii_digit() || c == '.');
    let spelled = if bare {
        format!("{t}{}", unit.suffix())
    } else {
        t.to_string()
    };
    humantime::parse_duration(&spelled).map_err(|e| {
        format!(
            "{s:?}: not a duration (e.g. 100ms, 1.5s, or a number of {}): {e}",
            unit.suffix()
        )
    })
}

/// A duration as a whole number of `unit`s (the flag's value type when it is an integer).
fn whole(s: &str, unit: TimeUnit) -> Result<u64, String> {
    let ns = parse_duration(s, unit)?.as_nanos();
    if ns % unit.nanos() != 0 {
        return Err(format!("{s:?} is not a whole number of {}", unit.suffix()));
    }
    u64::try_from(ns / unit.nanos()).map_err(|_| format!("{s:?}: too long"))
}

/// A duration in whole milliseconds (flags named `-ms`): `100`, `100ms`, `2s`.
pub fn parse_ms(s: &str) -> Result<u64, String> {
    whole(s, TimeUnit::Millis)
}

/// A duration in milliseconds, fractions kept (`--rtt-ms 0.5`, `--delay-ms 0.5`).
pub fn parse_ms_f64(s: &str) -> Result<f64, String> {
    Ok(parse_duration(s, TimeUnit::Millis)?.as_nanos() as f64 / 1e6)
}

/// A duration in whole microseconds (flags named `-us`): `100`, `100us`, `1ms`.
pub fn parse_us(s: &str) -> Result<u64, String> {
    whole(s, TimeUnit::Micros)
}

/// A duration in whole seconds (flags named `-s`): `60`, `60s`, `2min`.
pub fn parse_secs(s: &str) -> Result<u64, String> {
    whole(s, TimeUnit::Secs)
}

/// A duration in seconds, fractions kept (`--seconds 0.8`, `--poisson-secs 0.6`).
pub fn parse_secs_f64(s: &str) -> Result<f64, String> {
    Ok(parse_duration(s, TimeUnit::Secs)?.as_nanos() as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("64kb"), Ok(64 << 10));
        assert_eq!(parse_size(" 1 G "), Ok(1 << 30));
        assert!(parse_size("1000").unwrap_err().contains("multiple of 4096"));
        assert!(parse_size("0").unwrap_err().contains("positive"));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-4096").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_offset("0"), Ok(0));
        assert_eq!(parse_offset("1M"), Ok(1 << 20));
        assert!(parse_offset("512").is_err());
        assert_eq!(parse_bytes("56"), Ok(56));
        assert_eq!(parse_mib("16"), Ok(16));
        assert_eq!(parse_mib("1G"), Ok(1024));
        assert_eq!(parse_mib("0"), Ok(0));
        assert!(parse_mib("1500K").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_ms("100"), Ok(100));
        assert_eq!(parse_ms("100ms"), Ok(100));
        assert_eq!(parse_ms("2s"), Ok(2000));
        assert!(parse_ms("1.5").unwrap_err().contains("whole number"));
        assert!(parse_ms("-1").is_err());
        assert!(parse_ms("").is_err());
        assert!(parse_ms("5 parsecs").is_err());
        assert_eq!(parse_ms_f64("0.5"), Ok(0.5));
        assert_eq!(parse_ms_f64("0.1"), Ok(0.1));
        assert_eq!(parse_ms_f64("10"), Ok(10.0));
        assert_eq!(parse_ms_f64("250us"), Ok(0.25));
        assert_eq!(parse_us("100"), Ok(100));
        assert_eq!(parse_us("1ms"), Ok(1000));
        assert_eq!(parse_secs("60"), Ok(60));
        assert_eq!(parse_secs("2min"), Ok(120));
        assert_eq!(parse_secs_f64("0.8"), Ok(0.8));
        assert_eq!(parse_secs_f64("0.6"), Ok(0.6));
        assert_eq!(parse_secs_f64("3"), Ok(3.0));
        assert_eq!(parse_secs_f64("300ms"), Ok(0.3));
        assert_eq!(
            parse_duration("1.5", TimeUnit::Millis),
            Ok(Duration::from_micros(1500))
        );
    }
}
