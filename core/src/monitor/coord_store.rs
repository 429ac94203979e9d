//! The monitor's map on a coordination backend ([`crate::coord`]): one node holding the
//! committed map as JSON, replaced on every proposal with a version check, so a second
//! monitor writing the same map is detected instead of silently overwriting. The
//! embedded backend fsyncs (write, fsync, rename) and ZooKeeper logs to disk before a
//! write returns, so a commit is durable before the monitor answers anyone.

use uuid::Uuid;

use crate::coord::{self, Coord, CoordError, NodeKind};

use super::error::{MonitorError, Result};
use super::journal::MapStore;
use super::map::{Change, ClusterMap};

/// Default path of the map node.
pub const DEFAULT_MAP_PATH: &str = "/blocklab/monitor/map";

/// [`MapStore`] on a [`Coord`] session. It keeps only the version of the node it wrote
/// last: the monitor hands every commit the whole next map.
pub struct CoordStore {
    coord: Box<dyn Coord>,
    path: String,
    version: Option<i32>,
}

impl std::fmt::Debug for CoordStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordStore")
            .field("backend", &self.coord.describe())
            .field("path", &self.path)
            .finish()
    }
}

impl CoordStore {
    pub fn new(coord: Box<dyn Coord>, path: &str) -> CoordStore {
        CoordStore {
            coord,
            path: path.into(),
            version: None,
        }
    }

    fn err(&self, what: &str, e: CoordError) -> MonitorError {
        MonitorError::Store(format!(
            "{} {}: {what}: {e}",
            self.coord.describe(),
            self.path
        ))
    }
}

impl MapStore for CoordStore {
    fn load(&mut self) -> Result<Option<ClusterMap>> {
        match self.coord.get(&self.path) {
            Ok((data, stat)) => {
                let map: ClusterMap = serde_json::from_slice(&data).map_err(|e| {
                    MonitorError::Store(format!("{}: map does not decode: {e}", self.path))
                })?;
                self.version = Some(stat.version);
                Ok(Some(map))
            }
            Err(CoordError::NoNode(_)) => Ok(None),
            Err(e) => Err(self.err("read", e)),
        }
    }

    fn create(&mut self, fsid: Uuid) -> Result<()> {
        let map = ClusterMap::new(fsid);
        if let Some(parent) = coord::parent(&self.path) {
            coord::ensure_path(self.coord.as_ref(), parent)
                .map_err(|e| self.err("create parent", e))?;
        }
        let data = serde_json::to_vec(&map).expect("maps serialize");
        let stat = self
            .coord
            .create(&self.path, &data, NodeKind::Persistent)
            .map_err(|e| self.err("create", e))?;
        self.version = Some(stat.version);
        Ok(())
    }

    fn commit(&mut self, next: &ClusterMap, _changes: &[Change]) -> Result<()> {
        let version = self
            .version
            .ok_or_else(|| MonitorError::Store("commit before load or create".into()))?;
        let data = serde_json::to_vec(next).expect("maps serialize");
        let stat = self
            .coord
            .set(&self.path, &data, Some(version))
            .map_err(|e| self.err("write (another monitor may own this map)", e))?;
        self.version = Some(stat.version);
        Ok(())
    }
}
