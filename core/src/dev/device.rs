//! Opening a block device (or a regular file, for tests and machines without root) with
//! `O_DIRECT`, and learning its size and logical sector size.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::error::{DevError, Result};
use super::ioctl;

/// The smallest alignment blocklab ever uses for direct I/O, whatever the device says.
pub const MIN_ALIGN: usize = 4096;

/// What a [`Device`] is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// A block device (`/dev/loopN`, `/dev/nvme0n1`, ...).
    Block,
    /// A regular file opened with `O_DIRECT`.
    File,
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Block => "block",
            DeviceKind::File => "file",
        })
    }
}

/// How a device is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    ReadOnly,
    ReadWrite,
    /// Read-write, and `O_EXCL` for a block device.
    Exclusive,
}

/// An open block device or regular file, always with `O_DIRECT`.
#[derive(Debug)]
pub struct Device {
    file: File,
    path: PathBuf,
    kind: DeviceKind,
    size: u64,
    logical_sector: u32,
}

impl Device {
    /// Opens `path` for reading and writing with `O_DIRECT`.
    pub fn open(path: impl AsRef<Path>) -> Result<Device> {
        Self::open_mode(path.as_ref(), Mode::ReadWrite)
    }

    /// Opens `path` read-only with `O_DIRECT`.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Device> {
        Self::open_mode(path.as_ref(), Mode::ReadOnly)
    }

    /// Opens `path` for reading and writing with `O_DIRECT` and, for a block device,
    /// `O_EXCL`: the kernel refuses the open ([`DevError::InUse`]) while the device is
    /// mounted, held by device-mapper, md or LVM, or opened exclusively by another
    /// process; and while this `Device` is open, none of them can claim it. Use it before
    /// overwriting a device. A regular file has no such claim and opens as with
    /// [`Device::open`].
    pub fn open_exclusive(path: impl AsRef<Path>) -> Result<Device> {
        Self::open_mode(path.as_ref(), Mode::Exclusive)
    }

    fn open_mode(path: &Path, mode: Mode) -> Result<Device> {
        let path = path.to_path_buf();
        let meta = std::fs::metadata(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DevError::NotFound { path: path.clone() }
            } else {
                DevError::os(&path, "stat", e)
            }
        })?;
        let ft = meta.file_type();
        let kind = if ft.is_block_device() {
            DeviceKind::Block
        } else if ft.is_file() {
            DeviceKind::File
        } else if ft.is_dir() {
            return Err(DevError::IsDirectory { path });
        } else {
            return Err(DevError::UnsupportedKind { path });
        };
        let write = mode != Mode::ReadOnly;
        let exclusive = mode == Mode::Exclusive && kind == DeviceKind::Block;
        let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
        if exclusive {
            flags |= libc::O_EXCL;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(flags)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EROFS) if write => DevError::ReadOnly {
                    path: path.clone(),
                    cause: e,
                },
                Some(libc::EACCES) | Some(libc::EPERM) => DevError::PermissionDenied {
                    path: path.clone(),
                    cause: e,
                },
                Some(libc::EBUSY) if exclusive => DevError::InUse { path: path.clone() },
                _ => DevError::os(&path, "open(O_DIRECT)", e),
            })?;
        if write && kind == DeviceKind::Block {
            let ro = ioctl::block_read_only(&file)
                .map_err(|e| DevError::os(&path, "ioctl(BLKROGET)", e))?;
            if ro {
                return Err(DevError::ReadOnly {
                    path,
                    cause: std::io::Error::from_raw_os_error(libc::EROFS),
                });
            }
        }
        let (size, logical_sector) = match kind {
            DeviceKind::Block => {
                let size = ioctl::block_size_bytes(&file)
                    .map_err(|e| DevError::os(&path, "ioctl(BLKGETSIZE64)", e))?;
                let sector = ioctl::block_logical_sector(&file)
                    .map_err(|e| DevError::os(&path, "ioctl(BLKSSZGET)", e))?;
                (size, sector)
            }
            DeviceKind::File => (meta.len(), 512),
        };
        Ok(Device {
            file,
            path,
            kind,
            size,
            logical_sector,
        })
    }

    /// Another handle on the same open file (`dup`): it shares the open's claims, so a
    /// device opened with [`Device::open_exclusive`] stays claimed once, by this process,
    /// until every handle is dropped.
    pub fn try_clone(&self) -> Result<Device> {
        Ok(Device {
            file: self
                .file
                .try_clone()
                .map_err(|e| DevError::os(&self.path, "dup", e))?,
            path: self.path.clone(),
            kind: self.kind,
            size: self.size,
            logical_sector: self.logical_sector,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }
    /// Size in bytes (`BLKGETSIZE64` for devices, `stat` for files).
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The logical sector size the kernel reports (`BLKSSZGET`); 512 for files.
    pub fn logical_sector(&self) -> u32 {
        self.logical_sector
    }
    /// The alignment of every offset, length and buffer address: the logical sector
    /// size, and never less than [`MIN_ALIGN`].
    pub fn align(&self) -> usize {
        (self.logical_sector as usize).max(MIN_ALIGN)
    }
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Checks that `offset..offset+len` is aligned and inside the device.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let align = self.align() as u64;
        if offset % align != 0 {
            return Err(DevError::Misaligned {
                path: self.path.clone(),
                what: "offset",
                value: offset,
                align,
            });
        }
        if len % align != 0 {
            return Err(DevError::Misaligned {
                path: self.path.clone(),
                what: "length",
                value: len,
                align,
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(DevError::PastEnd {
                path: self.path.clone(),
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Checks that a buffer's address is aligned for direct I/O.
    pub fn check_buffer(&self, addr: usize) -> Result<()> {
        if addr % self.align() != 0 {
            return Err(DevError::MisalignedBuffer {
                path: self.path.clone(),
                addr,
                align: self.align(),
            });
        }
        Ok(())
    }

    /// Refuses a device smaller than `needed` bytes.
    pub fn require_size(&self, needed: u64) -> Result<()> {
        if self.size < needed {
            return Err(DevError::TooSmall {
                path: self.path.clone(),
                size: self.size,
                needed,
            });
        }
        Ok(())
    }
}

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
