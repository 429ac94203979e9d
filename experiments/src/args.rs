//! Arguments every experiment binary takes.

use std::path::PathBuf;

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

/// Parses `4096`, `256M`, `1G`, `1.5G`, `64KiB`... (powers of 1024) into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown size unit {unit:?} (use K, M, G or T)"
            ))
        }
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: not a size (e.g. 4096, 256M, 1G)"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s:?}: size must be positive"));
    }
    let bytes = (v * mult as f64).round();
    if bytes > u64::MAX as f64 {
        return Err(format!("{s:?}: too large"));
    }
    let bytes = bytes as u64;
    if bytes % 4096 != 0 {
        return Err(format!("{s:?} = {bytes} bytes is not a multiple of 4096"));
    }
    Ok(bytes)
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
        assert!(parse_size("1000").unwrap_err().contains("multiple of 4096"));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-4096").is_err());
        assert!(parse_size("").is_err());
    }
}
