//! Round trips and corruption detection of every structure.

use super::*;

fn label() -> Label {
    Label {
        flags: 0,
        cluster_fsid: uuid::Uuid::from_u128(0x1234),
        daemon_id: 7,
        daemon_uuid: uuid::Uuid::from_u128(0xabcd),
        birth_time_unix_ns: 1_795_305_600_000_000_000,
        layout: Layout::compute(16 << 30, LayoutParams::default()).unwrap(),
    }
}

fn superblock() -> Superblock {
    Superblock {
        cluster_fsid: uuid::Uuid::from_u128(0x1234),
        daemon_id: 7,
        alloc_unit: 4096,
        total_units: 65536,
        used_units: 1042,
        generation: 3,
    }
}

fn log_record() -> LogInitRecord {
    LogInitRecord {
        daemon_uuid: uuid::Uuid::from_u128(0xabcd),
        log_len: 4 << 20,
        birth_time_unix_ns: 42,
    }
}

#[test]
fn round_trips() {
    let l = label();
    let enc = l.encode();
    assert_eq!(enc.len(), BLOCK);
    assert_eq!(Label::decode(&enc).unwrap(), l);
    let ready = l.with_ready(true);
    assert!(ready.is_ready());
    assert_eq!(Label::decode(&ready.encode()).unwrap(), ready);
    let s = superblock();
    assert_eq!(Superblock::decode(&s.encode()).unwrap(), s);
    let r = log_record();
    assert_eq!(LogInitRecord::decode(&r.encode()).unwrap(), r);
}

/// Flipping any single byte of any structure is detected (magic, CRC or CRC field).
#[test]
fn every_flipped_byte_is_detected() {
    type Decode = fn(&[u8]) -> Result<()>;
    let cases: [(&str, Vec<u8>, Decode); 3] = [
        ("label", label().encode(), |b| Label::decode(b).map(|_| ())),
        ("superblock", superblock().encode(), |b| {
            Superblock::decode(b).map(|_| ())
        }),
        ("log", log_record().encode(), |b| {
            LogInitRecord::decode(b).map(|_| ())
        }),
    ];
    for (name, enc, decode) in cases {
        for i in 0..BLOCK {
            let mut b = enc.clone();
            b[i] ^= 0x40;
            let err = decode(&b).expect_err(name);
            assert!(
                matches!(
                    err,
                    FormatError::BadCrc { .. } | FormatError::BadMagic { .. }
                ),
                "{name} byte {i}: {err}"
            );
        }
    }
}

#[test]
fn other_version_and_short_buffers_are_refused() {
    // A block with a valid CRC but another version.
    let mut b = superblock().encode();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32c::crc32c(&b[..BLOCK - 4]);
    b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        Superblock::decode(&b),
        Err(FormatError::BadVersion {
            found: 2,
            supported: 1,
            ..
        })
    ));
    // The label is written with FORMAT_VERSION, and a label of another version refused.
    let mut b = label().encode();
    assert_eq!(b[8..12], FORMAT_VERSION.to_le_bytes());
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32c::crc32c(&b[..BLOCK - 4]);
    b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        Label::decode(&b),
        Err(FormatError::BadVersion { found: 2, .. })
    ));
    assert!(matches!(
        Label::decode(&[0u8; 100]),
        Err(FormatError::Truncated { .. })
    ));
    assert!(matches!(
        Label::decode(&[0u8; BLOCK]),
        Err(FormatError::BadMagic { .. })
    ));
}

#[test]
fn label_magic_is_what_the_probe_recognises() {
    assert_eq!(
        crate::dev::probe::classify(&label().encode()),
        crate::dev::Found::Blocklab
    );
}
