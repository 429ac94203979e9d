//! The unit of a volume's placement, shared by the store ([`super::store`]) and the copy
//! pipeline ([`super::copy`]).

use serde::{Deserialize, Serialize};

/// A contiguous byte range of one device (by index into the store's device list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub device: usize,
    pub offset: u64,
    pub len: u64,
}
