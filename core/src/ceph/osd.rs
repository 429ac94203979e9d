//! The manual deployment steps of one BlueStore OSD on a block device (what ceph-volume
//! does, without LVM, which refuses loop devices): a cephx secret, an id from the monitor
//! (`osd new`, which also registers the secret), the OSD directory with `block` linked to
//! the device, `ceph-osd --mkfs`, the daemon started, and up in the monitor's map.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::dev::{Device, Found, UringEngine};

use super::asok;
use super::cluster::run;
use super::conf::{CephConf, CLUSTER_NAME};
use super::error::{CephError, Result};
use super::monc::{MonClient, MonCommand};

/// Where an OSD's result goes in the monitor's config-key store: `PREFIX` + `osd.ID`.
pub const REPORT_PREFIX: &str = "blocklab/init/";

/// A fresh cephx secret, as `ceph-authtool --gen-print-key` makes one: Ceph's encoded
/// `CryptoKey` (type AES = 1, creation time, 16 random bytes), in base64.
pub fn gen_secret() -> String {
    use base64::Engine as _;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut key = Vec::with_capacity(28);
    key.extend_from_slice(&1u16.to_le_bytes());
    key.extend_from_slice(&(now.as_secs() as u32).to_le_bytes());
    key.extend_from_slice(&now.subsec_nanos().to_le_bytes());
    key.extend_from_slice(&16u16.to_le_bytes());
    key.extend_from_slice(&rand::random::<[u8; 16]>());
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// `osd new UUID` with the OSD's secret: the monitor allocates the smallest free id, or
/// returns the id it gave this uuid before, and registers `osd.ID`'s key.
pub fn new_id_command(uuid: Uuid, secret: &str) -> MonCommand {
    MonCommand {
        cmd: json!({"prefix": "osd new", "uuid": uuid.to_string(), "format": "json"}),
        input: json!({ "cephx_secret": secret }).to_string(),
    }
}

/// The id in the monitor's answer to `osd new` (`{"osdid": N}`).
pub fn parse_new_id(out: &str) -> Result<u32> {
    serde_json::from_str::<Value>(out)
        .ok()
        .and_then(|v| v["osdid"].as_u64())
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| CephError::Parse {
            what: "osd new".into(),
            text: out.into(),
        })
}

/// Checks that `device` is a block device nobody holds and that it is blank; with `force`,
/// anything on it is accepted and its first MiB zeroed (BlueStore's label lives there).
pub fn check_device(device: &Path, force: bool) -> Result<()> {
    let meta = std::fs::metadata(device).map_err(|cause| CephError::Io {
        what: "opening the device",
        path: device.into(),
        cause,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(CephError::NotBlock {
            path: device.into(),
        });
    }
    let dev_err = |e: crate::dev::DevError| CephError::Io {
        what: "probing the device",
        path: device.into(),
        cause: std::io::Error::other(e.to_string()),
    };
    let found = {
        // Exclusive: a device a running OSD (or a filesystem) holds is refused.
        let dev = Device::open_exclusive(device).map_err(dev_err)?;
        let mut eng = UringEngine::with_queue_depth(1).map_err(dev_err)?;
        crate::dev::probe(&mut eng, &dev).map_err(dev_err)?
    };
    match found {
        Found::Empty => Ok(()),
        _ if force => zero_head(device),
        other => Err(CephError::Foreign {
            path: device.into(),
            found: other.to_string(),
        }),
    }
}

/// Zeroes the first MiB of `device` durably.
fn zero_head(device: &Path) -> Result<()> {
    let io = |cause| CephError::Io {
        what: "zeroing the device's first MiB",
        path: device.into(),
        cause,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(device)
        .map_err(io)?;
    f.write_all(&vec![0u8; crate::dev::probe::PROBE_LEN as usize])
        .map_err(io)?;
    f.sync_all().map_err(io)
}

/// Writes OSD `id`'s directory: `block` linked to `device`, and its keyring.
pub fn prepare_dir(conf: &CephConf, id: u32, device: &Path, secret: &str) -> Result<()> {
    let dir = conf.osd_dir(id);
    let io = |what, path: PathBuf| move |cause| CephError::Io { what, path, cause };
    if dir.exists() {
        // What an earlier attempt for this id left: its directory goes, its device stays.
        std::fs::remove_dir_all(&dir).map_err(io("removing an old OSD directory", dir.clone()))?;
    }
    std::fs::create_dir_all(&dir).map_err(io("creating the OSD directory", dir.clone()))?;
    let block = dir.join("block");
    std::os::unix::fs::symlink(device, &block).map_err(io("linking the device", block))?;
    let keyring = dir.join("keyring");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&keyring)
        .map_err(io("writing the OSD keyring", keyring.clone()))?;
    writeln!(f, "[osd.{id}]\n\tkey = {secret}")
        .map_err(io("writing the OSD keyring", keyring.clone()))
}

fn osd_args<'a>(conf: &'a str, id: &'a str) -> [&'a str; 6] {
    ["--cluster", CLUSTER_NAME, "-c", conf, "-i", id]
}

/// `ceph-osd --mkfs`: BlueStore's on-disk structures on the device.
pub fn mkfs(conf: &CephConf, id: u32, uuid: Uuid) -> Result<()> {
    let (c, i, u) = (
        conf.conf_path().display().to_string(),
        id.to_string(),
        uuid.to_string(),
    );
    let mut args = osd_args(&c, &i).to_vec();
    args.extend_from_slice(&["--mkfs", "--osd-uuid", &u]);
    run("ceph-osd", &args).map(drop)
}

/// Starts OSD `id` (it daemonises; its boot goes on in the background).
pub fn start(conf: &CephConf, id: u32) -> Result<()> {
    let (c, i) = (conf.conf_path().display().to_string(), id.to_string());
    run("ceph-osd", &osd_args(&c, &i)).map(drop)
}

/// Waits until OSD `id` is up in the monitor's map: the daemon says `active` on its admin
/// socket, which it does once a map from the monitor marks it up at its own address.
pub fn await_up(conf: &CephConf, id: u32, timeout: Duration) -> Result<()> {
    let sock = conf.admin_socket(&format!("osd.{id}"));
    let start = Instant::now();
    loop {
        if let Ok(st) = asok::command(&sock, &json!({"prefix": "status"}), timeout) {
            if st["state"] == "active" {
                return Ok(());
            }
        }
        if start.elapsed() > timeout {
            return Err(CephError::Timeout {
                what: format!("osd.{id} up"),
                secs: timeout.as_secs_f64(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid of the running OSD `id` (from its pid file).
pub fn pid(conf: &CephConf, id: u32) -> Option<u32> {
    let path = conf.run_dir().join(format!("{CLUSTER_NAME}-osd.{id}.pid"));
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Stores OSD `id`'s result in the monitor's config-key store.
pub fn report_command(id: u32, result: &Value) -> MonCommand {
    MonCommand::new(json!({
        "prefix": "config-key set",
        "key": format!("{REPORT_PREFIX}osd.{id}"),
        "val": result.to_string(),
    }))
}

/// One OSD as the monitor's map has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdState {
    pub id: u32,
    pub uuid: String,
    pub up: bool,
    /// `exists`, `new`, `up`, `destroyed`...
    pub state: Vec<String>,
}

/// The monitor's OSD map: its epoch (one per committed change) and its OSDs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OsdMap {
    pub epoch: u64,
    pub osds: Vec<OsdState>,
}

impl OsdMap {
    pub fn parse(out: &str) -> Result<OsdMap> {
        let bad = || CephError::Parse {
            what: "osd dump".into(),
            text: out.chars().take(200).collect(),
        };
        let v: Value = serde_json::from_str(out).map_err(|_| bad())?;
        let epoch = v["epoch"].as_u64().ok_or_else(bad)?;
        let osds = v["osds"]
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|o| {
                Some(OsdState {
                    id: u32::try_from(o["osd"].as_u64()?).ok()?,
                    uuid: o["uuid"].as_str()?.to_string(),
                    up: o["up"].as_u64()? == 1,
                    state: o["state"]
                        .as_array()?
                        .iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect(),
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(bad)?;
        Ok(OsdMap { epoch, osds })
    }

    pub fn get(&self, id: u32) -> Option<&OsdState> {
        self.osds.iter().find(|o| o.id == id)
    }

    /// How many OSDs are up.
    pub fn up(&self) -> usize {
        self.osds.iter().filter(|o| o.up).count()
    }
}

/// The monitor's current OSD map.
pub fn osd_map(client: &MonClient) -> Result<OsdMap> {
    OsdMap::parse(&client.command(MonCommand::new(
        json!({"prefix": "osd dump", "format": "json"}),
    ))?)
}

/// The results OSDs reported (`config-key dump` under [`REPORT_PREFIX`]), by id.
pub fn reports(client: &MonClient) -> Result<Vec<(u32, Value)>> {
    let out = client.command(MonCommand::new(
        json!({"prefix": "config-key dump", "key": REPORT_PREFIX}),
    ))?;
    let v: Value = serde_json::from_str(&out).map_err(|_| CephError::Parse {
        what: "config-key dump".into(),
        text: out.clone(),
    })?;
    let mut res: Vec<(u32, Value)> = v
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, val)| {
            let id = k
                .strip_prefix(REPORT_PREFIX)?
                .strip_prefix("osd.")?
                .parse()
                .ok()?;
            let val = val.as_str().and_then(|s| serde_json::from_str(s).ok())?;
            Some((id, val))
        })
        .collect();
    res.sort_by_key(|(id, _)| *id);
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_look_like_ceph_authtools() {
        let (a, b) = (gen_secret(), gen_secret());
        assert_eq!(a.len(), 40);
        assert!(a.starts_with("AQ") && a.ends_with("=="), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn parses_the_monitors_answers() {
        assert_eq!(parse_new_id(r#"{"osdid":7}"#).unwrap(), 7);
        assert!(parse_new_id("7").is_err());
        let m = OsdMap::parse(
            r#"{"epoch":14,"osds":[{"osd":0,"uuid":"u0","up":1,"in":1,"state":["exists","up"]},
                {"osd":1,"uuid":"u1","up":0,"in":1,"state":["exists","new"]}]}"#,
        )
        .unwrap();
        assert_eq!(m.epoch, 14);
        assert_eq!(m.up(), 1);
        assert_eq!(m.get(1).unwrap().state, ["exists", "new"]);
        assert!(OsdMap::parse(r#"{"epoch":1}"#).is_err());
    }
}
