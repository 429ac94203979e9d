//! The command-line convention every binary follows (docs/experiments.md): `-V`/`--version`
//! and `--help` everywhere, durations with units, a bare number refused with an error that
//! says to add one.

use std::process::{Command, Output};

const BLOCKLAB: &str = env!("CARGO_BIN_EXE_blocklab");

/// Every experiment binary and one of its duration flags.
const EXPERIMENTS: [(&str, &str); 6] = [
    (env!("CARGO_BIN_EXE_exp-io"), "--duration"),
    (env!("CARGO_BIN_EXE_exp-init"), "--propose-intervals"),
    (env!("CARGO_BIN_EXE_exp-commit"), "--gap"),
    (env!("CARGO_BIN_EXE_exp-alloc"), "--duration"),
    (env!("CARGO_BIN_EXE_exp-lunmap"), "--change-gap"),
    (env!("CARGO_BIN_EXE_exp-failover"), "--heartbeats"),
];

/// `blocklab`'s subcommands.
const SUBCOMMANDS: [&str; 14] = [
    "devices", "alloc", "index", "repl", "mkfs", "inspect", "monitor", "node", "init", "mgmt",
    "volume", "gateway", "lunmap", "proxy",
];

fn run(bin: &str, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn name(bin: &str) -> &str {
    bin.rsplit('/').next().unwrap_or(bin)
}

/// Whether `text` holds a duration with a unit, as `300ms`, `1.5s`, `100us` or `2min`.
fn has_duration_example(text: &str) -> bool {
    text.split(|c: char| c.is_whitespace() || ",()[]:;".contains(c))
        .any(|w| {
            let digits = w.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            let unit = &w[digits.len()..];
            !digits.is_empty()
                && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
                && ["us", "ms", "s", "min", "h"].contains(&unit)
        })
}

#[test]
fn every_binary_prints_its_version_and_help() {
    let version = env!("CARGO_PKG_VERSION");
    for bin in EXPERIMENTS.iter().map(|e| e.0).chain([BLOCKLAB]) {
        for flag in ["-V", "--version"] {
            let o = run(bin, &[flag]);
            assert!(o.status.success(), "{bin} {flag}: {}", stderr(&o));
            assert_eq!(
                stdout(&o).trim(),
                format!("{} {version}", name(bin)),
                "{bin} {flag}"
            );
        }
        let o = run(bin, &["--help"]);
        assert!(o.status.success(), "{bin} --help: {}", stderr(&o));
        assert!(
            stdout(&o).contains("Usage:"),
            "{bin} --help: {}",
            stdout(&o)
        );
    }
    for sub in SUBCOMMANDS {
        let o = run(BLOCKLAB, &[sub, "--help"]);
        assert!(o.status.success(), "blocklab {sub} --help: {}", stderr(&o));
        let o = run(BLOCKLAB, &[sub, "-V"]);
        assert!(o.status.success(), "blocklab {sub} -V: {}", stderr(&o));
        assert!(
            stdout(&o).contains(version),
            "blocklab {sub} -V: {}",
            stdout(&o)
        );
    }
}

#[test]
fn experiment_help_says_what_is_measured_and_shows_durations_with_units() {
    for (bin, flag) in EXPERIMENTS {
        let help = stdout(&run(bin, &["--help"]));
        let about = help.lines().next().unwrap_or_default();
        assert!(
            about.contains("Measures") && about.contains("compares"),
            "{bin}: the first line of --help says what it measures and compares: {about:?}"
        );
        let line = help
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(&format!("{flag} <DURATION>")))
            .take(4)
            .collect::<Vec<_>>()
            .join(" ");
        assert!(!line.is_empty(), "{bin}: no `{flag} <DURATION>` in\n{help}");
        assert!(
            has_duration_example(&line),
            "{bin}: {flag}'s help shows no duration with a unit: {line}"
        );
    }
}

#[test]
fn a_bare_number_as_a_duration_is_refused_with_a_clear_error() {
    let mut cases: Vec<(&str, Vec<&str>)> = EXPERIMENTS
        .iter()
        .map(|&(bin, flag)| (bin, vec![flag, "300"]))
        .collect();
    cases.extend([
        (
            BLOCKLAB,
            vec!["monitor", "serve", "--propose-interval", "50"],
        ),
        (BLOCKLAB, vec!["repl", "serve", "--tick", "100"]),
        (BLOCKLAB, vec!["repl", "serve", "--policy", "periodic:50"]),
        (BLOCKLAB, vec!["mgmt", "serve", "--heartbeat", "100"]),
        (
            BLOCKLAB,
            vec!["proxy", "--to", "127.0.0.1:1", "--delay", "500"],
        ),
    ]);
    for (bin, args) in cases {
        let o = run(bin, &args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{bin} {args:?}: {err}");
        assert!(
            err.contains("needs a unit") && err.contains("ms"),
            "{bin} {args:?}: the error says to add a unit: {err}"
        );
    }
    // The old flags with the unit in their name are gone.
    for (bin, old) in [
        (EXPERIMENTS[0].0, "--seconds"),
        (EXPERIMENTS[2].0, "--gap-ms"),
        (EXPERIMENTS[5].0, "--volume-mib"),
    ] {
        let o = run(bin, &[old, "1"]);
        assert_eq!(o.status.code(), Some(2), "{bin} {old}: {}", stderr(&o));
    }
}

#[test]
fn the_duration_example_check_finds_units() {
    assert!(has_duration_example("How long, e.g. 300ms (default: 2s)"));
    assert!(has_duration_example("e.g. 1.5s,"));
    assert!(!has_duration_example("in milliseconds (default: 300)"));
    assert!(!has_duration_example("e.g. 16M"));
}
