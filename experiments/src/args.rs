//! Arguments every experiment binary takes.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
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
    /// Repetitions per configuration (default: the profile's; each experiment's --help
    /// says how many).
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
    /// The repetitions to run: `--repetitions`, else the experiment's count for the profile.
    pub fn repetitions_or(&self, default: Repetitions) -> u32 {
        self.repetitions.unwrap_or(match self.profile {
            Profile::Quick => default.quick,
            Profile::Full => default.full,
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

/// An experiment's repetitions per configuration by profile: `quick` and `full`.
#[derive(Debug, Clone, Copy)]
pub struct Repetitions {
    pub quick: u32,
    pub full: u32,
}

impl Repetitions {
    /// `--repetitions`' help with this experiment's counts, for the binary's
    /// `#[command(mut_arg("repetitions", |a| REPETITIONS.help(a)))]`.
    pub fn help(self, arg: clap::Arg) -> clap::Arg {
        arg.help(format!(
            "Repetitions per configuration (default: quick {}, full {})",
            self.quick, self.full
        ))
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
// `parse_duration` below. Sizes and durations carry their units in the value, never in the
// flag's name (`--volume-size 16M`, `--gap 300ms`).

/// The one size parser: `4096`, `256M`, `1.5G`, `64KiB`, `1 GiB`... (parse-size; K, M, G,
/// T... and KiB, MiB... are all powers of 1024, the B optional, case ignored). A bare number
/// is bytes.
fn parse_size_in(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|e| format!("{s:?}: not a size (e.g. 4096, 256M, 1.5G, 64KiB): {e}"))
}

/// A device size or length: positive and a multiple of 4096 bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    match parse_offset(s)? {
        0 => Err(format!("{s:?}: size must be positive")),
        bytes => Ok(bytes),
    }
}

/// A byte offset on a device: 0, or a multiple of 4096 bytes.
pub fn parse_offset(s: &str) -> Result<u64, String> {
    let bytes = parse_size_in(s)?;
    if bytes % 4096 != 0 {
        return Err(format!("{s:?} = {bytes} bytes is not a multiple of 4096"));
    }
    Ok(bytes)
}

/// A number of bytes, any: `56`, `1K`, `128M` (also a rate in bytes per second, as
/// `--copy-rate 128M`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size_in(s)
}

/// The one duration parser: a number with a unit, in humantime's spellings: `100us`,
/// `300ms`, `1.5s`, `2min`, `1h 30min`. A bare number is refused (it used to mean the unit
/// of the flag's name, `--gap-ms 300`), so an old command line fails instead of changing
/// meaning.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "{s:?}: a duration needs a unit: add one, e.g. {t}ms, {t}s or {t}us"
        ));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("{s:?}: not a duration (e.g. 100us, 300ms, 1.5s, 2min): {e}"))
}

/// A duration that must be longer than zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: must be longer than zero")),
        d => Ok(d),
    }
}

/// A duration of whole milliseconds, for flags whose CSV column is an integer `_ms`
/// (`--heartbeats 50ms,100ms`); longer than zero.
pub fn parse_whole_ms(s: &str) -> Result<Duration, String> {
    let d = parse_positive_duration(s)?;
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("{s:?}: not a whole number of milliseconds"));
    }
    Ok(d)
}

/// A share in `[0, 100%)` written as a percentage (`10%`, `2.5%`, `0%`), as a fraction
/// (`10%` is 0.1). A bare number is refused: `10` could mean 10% or 0.1.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let Some(num) = t.strip_suffix('%') else {
        return Err(format!(
            "{s:?}: a share needs a percent sign, e.g. {t}% (a percentage in [0%, 100%))"
        ));
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: not a percentage (e.g. 10%, 2.5%)"))?;
    if !(0.0..100.0).contains(&v) {
        return Err(format!("{s:?}: outside [0%, 100%)"));
    }
    Ok(v / 100.0)
}

/// A duration as a command-line value again (`300ms`, `1s 500ms`): what [`parse_duration`]
/// reads, for arguments passed on to a child process.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_string();
    }
    humantime::format_duration(d).to_string()
}

/// Milliseconds of `d`, fractions kept: the value of a CSV column or meta.json field
/// named `_ms`.
pub fn millis(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages() {
        assert_eq!(parse_percent("10%"), Ok(0.1));
        assert_eq!(parse_percent("0%"), Ok(0.0));
        assert_eq!(parse_percent(" 2.5 % "), Ok(0.025));
        assert!(parse_percent("10").unwrap_err().contains("percent sign"));
        assert!(parse_percent("100%")
            .unwrap_err()
            .contains("outside [0%, 100%)"));
        assert!(parse_percent("-1%").unwrap_err().contains("outside"));
        assert!(parse_percent("NaN%").unwrap_err().contains("outside"));
        assert!(parse_percent("x%")
            .unwrap_err()
            .contains("not a percentage"));
    }

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
        assert_eq!(parse_bytes("128M"), Ok(128 << 20));
        assert_eq!(parse_bytes("0"), Ok(0));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.5ms"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration(" 0s "), Ok(Duration::ZERO));
        for bare in ["300", "0.8", "0"] {
            let e = parse_duration(bare).unwrap_err();
            assert!(e.contains("needs a unit") && e.contains("ms"), "{e}");
        }
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_positive_duration("0ms")
            .unwrap_err()
            .contains("longer than zero"));
        assert_eq!(parse_whole_ms("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_whole_ms("1.5ms")
            .unwrap_err()
            .contains("whole number"));
        for d in [
            Duration::ZERO,
            Duration::from_micros(100),
            Duration::from_millis(1500),
            Duration::from_secs(90),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(millis(Duration::from_micros(500)), 0.5);
    }
}
