//! exp-io end to end (tiny settings) and the bad inputs every experiment shares.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use blocklab::dev::provision;
use blocklab::dev::Device;
use blocklab::testing::{
    ext4_intact, make_ext4, require_program, require_root, scratch, set_read_only, wait_for,
    KillOnDrop, LoopDevices,
};

const COLUMNS: &str = "tool,pattern,block_size_bytes,queue_depth,repetition,iops,bandwidth_mib_s,lat_p50_us,lat_p99_us,device";

/// exp-io's six workloads as its CSV spells them: pattern, block size, queue depth.
const WORKLOADS: [(&str, &str, &str); 6] = [
    ("randwrite", "4096", "1"),
    ("randwrite", "4096", "32"),
    ("randread", "4096", "1"),
    ("randread", "4096", "32"),
    ("write", "1048576", "8"),
    ("read", "1048576", "8"),
];

fn exp_io() -> Command {
    Command::new(env!("CARGO_BIN_EXE_exp-io"))
}

/// A quick run on `--files FILES` (16 MiB, an 8 MiB region, steps of `duration`, one
/// repetition) into `out`.
fn on_files(files: &Path, duration: &str, out: &Path) -> Command {
    let mut c = exp_io();
    c.arg("--files")
        .arg(files)
        .args(["--size", "16M", "--region", "8M", "--duration", duration])
        .args(["--repetitions", "1", "--out"])
        .arg(out);
    c
}

/// Runs and returns (success, stderr).
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("spawn exp-io");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn writes_the_documented_csv_and_meta() {
    if !require_program("fio", "fio") {
        return;
    }
    let files = scratch();
    let out = scratch();
    let (ok, err) = run(&mut on_files(files.path(), "200ms", out.path()));
    assert!(ok, "exp-io failed: {err}");
    let text = std::fs::read_to_string(out.path().join("exp-io.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(COLUMNS));
    let rows: Vec<Vec<String>> = lines
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    assert_eq!(rows.len(), 12, "6 workloads x 2 tools x 1 repetition");
    for tool in ["blocklab", "fio"] {
        for (pattern, bs, qd) in WORKLOADS {
            let row = rows
                .iter()
                .find(|r| r[0] == tool && r[1] == pattern && r[2] == bs && r[3] == qd)
                .unwrap_or_else(|| panic!("no row for {tool} {pattern} {bs} {qd}"));
            let iops: f64 = row[5].parse().unwrap();
            assert!(iops > 0.0, "{tool} {pattern} did no I/O");
        }
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("exp-io.meta.json")).unwrap())
            .unwrap();
    assert_eq!(meta["experiment"], "exp-io");
    assert_eq!(meta["devices"]["kind"], "file");
    assert!(meta["fio"].as_str().unwrap().starts_with("fio-"), "{meta}");
    for key in ["cpu_model", "memory_bytes", "rustc", "zookeeper", "clean"] {
        assert!(meta.get(key).is_some(), "meta.json lacks {key}");
    }
    // The raw data beside the CSV: blocklab's histograms, fio's JSON.
    let hist = std::fs::read_to_string(out.path().join("exp-io-hist.csv")).unwrap();
    let mut hist = hist.lines();
    assert_eq!(
        hist.next(),
        Some("tool,pattern,block_size_bytes,queue_depth,repetition,metric,hdr")
    );
    let hist: Vec<&str> = hist.collect();
    assert_eq!(hist.len(), 6, "one per blocklab row");
    for (pattern, bs, qd) in WORKLOADS {
        let prefix = format!("blocklab,{pattern},{bs},{qd},0,lat_ns,HISTF");
        assert!(hist.iter().any(|l| l.starts_with(&prefix)), "no {prefix}");
        let f = out
            .path()
            .join("exp-io-fio")
            .join(format!("{pattern}-bs{bs}-qd{qd}-rep0.json"));
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        assert!(json["jobs"][0].is_object(), "{}", f.display());
    }
    // A second run into the same directory refuses to overwrite.
    let (ok, err) = run(&mut on_files(files.path(), "100ms", out.path()));
    assert!(!ok && err.contains("already exists"), "{err}");
    // Its files were cleaned up.
    assert_eq!(std::fs::read_dir(files.path()).unwrap().count(), 0);
}

#[test]
fn bad_device_arguments_are_one_line_errors() {
    let dir = scratch();
    let out = dir.path().join("out");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--devices".into(), "/nonexistent/dev".into()],
            "no such device",
        ),
        (
            vec!["--devices".into(), dir.path().display().to_string()],
            "is a directory",
        ),
        (
            vec![
                "--files".into(),
                "/nonexistent".into(),
                "--size".into(),
                "16M".into(),
            ],
            "no such directory",
        ),
        (
            vec!["--size".into(), "1000".into()],
            "not a multiple of 4096",
        ),
        (
            vec![
                "--devices".into(),
                "/dev/null".into(),
                "--size".into(),
                "16M".into(),
            ],
            "cannot be used with",
        ),
        (
            vec![
                "--files".into(),
                dir.path().display().to_string(),
                "--size".into(),
                "4M".into(),
            ],
            "smaller than this run needs",
        ),
    ];
    for (args, want) in cases {
        let (ok, err) = run(exp_io().args(&args).arg("--out").arg(&out));
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err}");
    }
    assert!(!out.join("exp-io.csv").exists(), "nothing written");
}

#[test]
fn refuses_devices_with_data_and_read_only_devices() {
    let Some(g) = LoopDevices::provision("t-expio", 2, 64 << 20) else {
        return;
    };
    if !require_program("mkfs.ext4", "e2fsprogs") {
        return;
    }
    let sd = scratch();
    let paths = g.paths();
    let out = sd.path().join("out");
    // An ext4 filesystem on the first device: refused, and still intact afterwards.
    make_ext4(&paths[0]);
    let (ok, err) = run(exp_io()
        .arg("--devices")
        .arg(&paths[0])
        .args(["--region", "8M"])
        .arg("--out")
        .arg(&out));
    assert!(
        !ok && err.contains("ext2/3/4 filesystem") && err.contains("--force"),
        "{err}"
    );
    let (intact, fsck) = ext4_intact(&paths[0]);
    assert!(intact, "filesystem damaged: {fsck}");
    // A read-only device.
    set_read_only(&paths[1], true);
    let (ok, err) = run(exp_io()
        .arg("--devices")
        .arg(&paths[1])
        .args(["--region", "8M"])
        .arg("--out")
        .arg(&out));
    assert!(!ok && err.contains("read-only"), "{err}");
    set_read_only(&paths[1], false);
    // Too small for the run.
    let (ok, err) = run(exp_io()
        .arg("--devices")
        .arg(&paths[1])
        .args(["--region", "128M"])
        .arg("--out")
        .arg(&out));
    assert!(!ok && err.contains("needs at least"), "{err}");
    // A device someone holds exclusively (as a mount or device-mapper would): refused by
    // the experiments and by `blocklab mkfs`, --force or not.
    let held = Device::open_exclusive(&paths[1]).unwrap();
    let (ok, err) = run(exp_io()
        .arg("--devices")
        .arg(&paths[1])
        .args(["--region", "8M", "--force"])
        .arg("--out")
        .arg(&out));
    assert!(!ok && err.contains("in use"), "{err}");
    let mkfs = Command::new(env!("CARGO_BIN_EXE_blocklab"))
        .arg("mkfs")
        .arg(&paths[1])
        .args([
            "--cluster-fsid",
            &uuid::Uuid::new_v4().to_string(),
            "--id",
            "0",
        ])
        .arg("--force")
        .output()
        .unwrap();
    let mkfs_err = String::from_utf8_lossy(&mkfs.stderr);
    assert!(
        !mkfs.status.success() && mkfs_err.contains("in use"),
        "{mkfs_err}"
    );
    drop(held);
    // The same device twice.
    let (ok, err) = run(exp_io()
        .arg("--devices")
        .arg(format!("{},{}", paths[1].display(), paths[1].display()))
        .arg("--out")
        .arg(&out));
    assert!(!ok && err.contains("listed twice"), "{err}");
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Ctrl-C as soon as the `--files` directory exists: the handler removes it (the process
/// exits without running destructors).
#[test]
fn ctrl_c_removes_the_files_directory() {
    if !require_program("fio", "fio") {
        return;
    }
    let files = scratch();
    let out = scratch();
    let mut child =
        KillOnDrop::spawn(on_files(files.path(), "30s", out.path()).stderr(Stdio::null()));
    wait_for("the files directory", Duration::from_secs(60), || {
        !entries(files.path()).is_empty()
    });
    let status = child.interrupt();
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert_eq!(entries(files.path()), Vec::<String>::new(), "left behind");
}

/// Ctrl-C while loop devices are being provisioned (or just after): the set is torn down,
/// nothing stays attached, nothing stays recorded, and the run exits 130. A run that
/// opens its device just after the handler tore it down fails on it; before the main
/// thread waited for the handler (`devices::await_interrupt`) that failure exited 1 first,
/// in 1 of 6–12 runs of this test.
#[test]
fn ctrl_c_during_provisioning_tears_the_set_down() {
    ctrl_c_tears_the_set_down("30s", |_| true);
}

/// Ctrl-C in the middle of the measurements (after the first of 24 one-second steps, fio
/// or the engine busy on the device): the set is torn down (the kernel detaches the device
/// once the run's descriptors close) and the run exits 130.
#[test]
fn ctrl_c_mid_run_exits_130_after_the_teardown() {
    ctrl_c_tears_the_set_down("1s", |stderr| stderr.contains("[exp-io] 1/"));
}

/// Starts an exp-io run of `duration` per step on one provisioned loop device, waits until
/// its set directory exists and `ready` holds for what it printed on stderr so far,
/// interrupts it and checks the set is gone.
fn ctrl_c_tears_the_set_down(duration: &str, ready: impl Fn(&str) -> bool) {
    if !require_program("fio", "fio") {
        return;
    }
    if !require_root("loop devices need root") {
        return;
    }
    let sd = scratch();
    let out = scratch();
    let stderr_path = out.path().join("stderr");
    let mut child = KillOnDrop::spawn(
        exp_io()
            .args(["--provision", "1", "--size", "16M", "--region", "8M"])
            .args(["--duration", duration])
            .arg("--state-dir")
            .arg(sd.path())
            .arg("--out")
            .arg(out.path())
            .stderr(std::fs::File::create(&stderr_path).unwrap()),
    );
    wait_for(
        "the run to be ready for Ctrl-C",
        Duration::from_secs(60),
        || {
            !entries(sd.path()).is_empty()
                && ready(&std::fs::read_to_string(&stderr_path).unwrap_or_default())
        },
    );
    let status = child.interrupt();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert_eq!(status.code(), Some(130), "{status:?}: {stderr}");
    assert!(provision::list_sets(sd.path()).unwrap().is_empty());
    assert_eq!(entries(sd.path()), Vec::<String>::new(), "left behind");
    // A loop device the run still had open is detached by the kernel as the process
    // exits (teardown asked for it): poll until it is gone.
    let ours = || {
        let losetup = Command::new("losetup")
            .args(["--list", "--noheadings", "--output", "BACK-FILE"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&losetup.stdout).contains(&sd.path().display().to_string())
    };
    wait_for(
        "the loop devices to be detached",
        Duration::from_secs(30),
        || !ours(),
    );
}
