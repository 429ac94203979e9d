//! Recognising someone else's data before a destructive operation.
//!
//! Every destructive operation (mkfs, an experiment writing to a device) reads the first
//! MiB first and refuses when it finds anything: a filesystem superblock, a partition
//! table, a blocklab label, or plain non-zero bytes.

use super::buf::AlignedBuf;
use super::device::Device;
use super::engine::IoEngine;
use super::error::Result;

/// How much of the device the probe reads.
pub const PROBE_LEN: u64 = 1 << 20;

/// The magic at the start of a blocklab label (see `format`).
pub const BLOCKLAB_MAGIC: &[u8; 8] = b"BLKLAB\x00\x01";

/// The start of a BlueStore label (`bluestore_bdev_label_t`), followed by the OSD's uuid.
pub const BLUESTORE_MAGIC: &[u8; 23] = b"bluestore block device\n";

/// What the probe found at the start of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The first MiB is all zeros.
    Empty,
    /// A blocklab label (the caller decides whether it is its own).
    Blocklab,
    /// An ext2/3/4 filesystem.
    Ext,
    Xfs,
    Btrfs,
    /// A GPT partition table.
    Gpt,
    /// A FAT12/16/32 filesystem.
    Fat,
    /// An exFAT filesystem.
    Exfat,
    /// An NTFS filesystem.
    Ntfs,
    /// A DOS/MBR partition table (boot signature 0x55AA and none of the above).
    Mbr,
    /// LVM2 physical volume label.
    Lvm,
    /// Linux swap.
    Swap,
    /// A Ceph BlueStore OSD's block device, with the OSD's uuid from its label.
    Bluestore {
        osd_uuid: String,
    },
    /// Non-zero bytes of no recognised kind, at this offset.
    Data {
        first_nonzero: u64,
    },
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Empty => f.write_str("nothing (first MiB is zero)"),
            Found::Blocklab => f.write_str("a blocklab label"),
            Found::Ext => f.write_str("an ext2/3/4 filesystem"),
            Found::Xfs => f.write_str("an XFS filesystem"),
            Found::Btrfs => f.write_str("a btrfs filesystem"),
            Found::Gpt => f.write_str("a GPT partition table"),
            Found::Fat => f.write_str("a FAT filesystem"),
            Found::Exfat => f.write_str("an exFAT filesystem"),
            Found::Ntfs => f.write_str("an NTFS filesystem"),
            Found::Mbr => f.write_str("a DOS/MBR partition table"),
            Found::Lvm => f.write_str("an LVM2 physical volume"),
            Found::Swap => f.write_str("a swap area"),
            Found::Bluestore { osd_uuid } => {
                write!(f, "a Ceph BlueStore OSD (osd uuid {osd_uuid})")
            }
            Found::Data { first_nonzero } => write!(
                f,
                "non-zero data (first non-zero byte at offset {first_nonzero})"
            ),
        }
    }
}

/// Classifies the first bytes of a device (at most [`PROBE_LEN`] of them).
pub fn classify(head: &[u8]) -> Found {
    let at = |off: usize, magic: &[u8]| {
        head.len() >= off + magic.len() && &head[off..off + magic.len()] == magic
    };
    if at(0, BLOCKLAB_MAGIC) {
        return Found::Blocklab;
    }
    if at(0, BLUESTORE_MAGIC) {
        let rest = &head[BLUESTORE_MAGIC.len()..head.len().min(BLUESTORE_MAGIC.len() + 36)];
        return Found::Bluestore {
            osd_uuid: String::from_utf8_lossy(rest).into_owned(),
        };
    }
    if at(1024 + 56, &[0x53, 0xEF]) {
        return Found::Ext;
    }
    if at(0, b"XFSB") {
        return Found::Xfs;
    }
    if at(0x10040, b"_BHRfS_M") {
        return Found::Btrfs;
    }
    if at(512, b"EFI PART") {
        return Found::Gpt;
    }
    if at(512 + 24, b"LVM2 001") || at(24, b"LVM2 001") {
        return Found::Lvm;
    }
    if at(4096 - 10, b"SWAPSPACE2") {
        return Found::Swap;
    }
    if at(510, &[0x55, 0xAA]) {
        // FAT, exFAT and NTFS boot sectors end with the same signature as an MBR: tell
        // them apart by their OEM name or file-system type string.
        if at(3, b"NTFS    ") {
            return Found::Ntfs;
        }
        if at(3, b"EXFAT   ") {
            return Found::Exfat;
        }
        if at(82, b"FAT32   ") || at(54, b"FAT12   ") || at(54, b"FAT16   ") || at(54, b"FAT     ")
        {
            return Found::Fat;
        }
        return Found::Mbr;
    }
    match head.iter().position(|&b| b != 0) {
        None => Found::Empty,
        Some(i) => Found::Data {
            first_nonzero: i as u64,
        },
    }
}

/// The start of a device as [`probe_head`] read it, and what it holds.
#[derive(Debug)]
pub struct Probed {
    pub found: Found,
    head: AlignedBuf,
    len: usize,
}

impl Probed {
    /// The bytes read: the first [`PROBE_LEN`] bytes of the device, or all of a smaller
    /// one (in whole alignment units). A caller that finds a label decodes it from here
    /// instead of reading block 0 again.
    pub fn head(&self) -> &[u8] {
        &self.head[..self.len]
    }
}

/// Reads the start of `dev` and classifies it.
pub fn probe(engine: &mut dyn IoEngine, dev: &Device) -> Result<Found> {
    Ok(probe_head(engine, dev)?.found)
}

/// Reads the start of `dev`, classifies it and keeps the bytes.
pub fn probe_head(engine: &mut dyn IoEngine, dev: &Device) -> Result<Probed> {
    let align = dev.align() as u64;
    let len = PROBE_LEN.min(dev.size() / align * align) as usize;
    let mut head = AlignedBuf::with_alignment(len, dev.align());
    if len == 0 {
        return Ok(Probed {
            found: Found::Empty,
            head,
            len,
        });
    }
    engine.read_at(dev, 0, &mut head[..len])?;
    Ok(Probed {
        found: classify(&head[..len]),
        head,
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        let mut b = vec![0u8; 1 << 20];
        assert_eq!(classify(&b), Found::Empty);
        b[1080] = 0x53;
        b[1081] = 0xEF;
        assert_eq!(classify(&b), Found::Ext);
        let mut b = vec![0u8; 1 << 20];
        b[..4].copy_from_slice(b"XFSB");
        assert_eq!(classify(&b), Found::Xfs);
        let mut b = vec![0u8; 1 << 20];
        b[510] = 0x55;
        b[511] = 0xAA;
        assert_eq!(classify(&b), Found::Mbr);
        b[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(classify(&b), Found::Gpt);
        let mut b = vec![0u8; 1 << 20];
        b[777_777] = 1;
        assert_eq!(
            classify(&b),
            Found::Data {
                first_nonzero: 777_777
            }
        );
        let mut b = vec![0u8; 4096];
        b[..8].copy_from_slice(BLOCKLAB_MAGIC);
        assert_eq!(classify(&b), Found::Blocklab);
        let mut b = vec![0u8; 4096];
        let label = b"bluestore block device\n0b8c4f7e-8e8a-4c4e-9a59-0c1f3c8f2a11\n";
        b[..label.len()].copy_from_slice(label);
        assert_eq!(
            classify(&b),
            Found::Bluestore {
                osd_uuid: "0b8c4f7e-8e8a-4c4e-9a59-0c1f3c8f2a11".into()
            }
        );
    }

    /// FAT, exFAT and NTFS boot sectors carry the MBR's 0x55AA too; they are named as
    /// what they are.
    #[test]
    fn boot_sectors_are_not_partition_tables() {
        let boot = |at: usize, text: &[u8]| {
            let mut b = vec![0u8; 1 << 20];
            b[510] = 0x55;
            b[511] = 0xAA;
            b[at..at + text.len()].copy_from_slice(text);
            classify(&b)
        };
        assert_eq!(boot(3, b"NTFS    "), Found::Ntfs);
        assert_eq!(boot(3, b"EXFAT   "), Found::Exfat);
        assert_eq!(boot(82, b"FAT32   "), Found::Fat);
        assert_eq!(boot(54, b"FAT16   "), Found::Fat);
        assert_eq!(boot(54, b"FAT12   "), Found::Fat);
        assert_eq!(boot(3, b"MSDOS5.0"), Found::Mbr);
        assert!(Found::Ntfs.to_string().contains("NTFS"));
    }
}
