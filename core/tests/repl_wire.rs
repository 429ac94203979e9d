//! The wire decoder against truncated, garbage, oversized and other-version frames: a clear
//! error, never a panic; and encode/decode round trips.

use blocklab::repl::wire::{
    decode, decode_body, encode_to_vec, Frame, Status, WireError, MAX_FRAME, WIRE_VERSION,
};
use blocklab::repl::{Entry, Message};
use proptest::prelude::*;

fn arb_entries(prev: u64) -> impl Strategy<Value = Vec<Entry>> {
    prop::collection::vec(
        (any::<u64>(), prop::collection::vec(any::<u8>(), 0..64)),
        0..8,
    )
    .prop_map(move |v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (term, payload))| Entry {
                term,
                index: prev + 1 + i as u64,
                payload,
            })
            .collect()
    })
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u64>(),
            any::<u32>(),
            0..u64::MAX / 2,
            any::<u64>(),
            any::<u64>()
        )
            .prop_flat_map(|(term, from, prev_index, prev_term, commit)| {
                arb_entries(prev_index).prop_map(move |entries| {
                    Frame::Repl(Message::Append {
                        term,
                        from,
                        prev_index,
                        prev_term,
                        commit,
                        entries,
                    })
                })
            }),
        (
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(
                |(term, from, success, match_index, commit, last_index)| Frame::Repl(
                    Message::AppendResp {
                        term,
                        from,
                        success,
                        match_index,
                        commit,
                        last_index
                    }
                )
            ),
        (any::<u64>(), prop::collection::vec(any::<u8>(), 0..128))
            .prop_map(|(id, payload)| Frame::ClientWrite { id, payload }),
        (any::<u64>(), any::<u64>()).prop_map(|(id, index)| Frame::ClientAck { id, index }),
        (any::<u64>(), ".{0,40}").prop_map(|(id, message)| Frame::ClientErr { id, message }),
        Just(Frame::StatusReq),
        (any::<u32>(), any::<bool>(), any::<[u64; 5]>()).prop_map(
            |(id, primary, v)| Frame::Status(Status {
                id,
                primary,
                term: v[0],
                last_index: v[1],
                durable_index: v[2],
                commit: v[3],
                applied: v[4]
            })
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip(f in arb_frame()) {
        let b = encode_to_vec(&f);
        let (g, used) = decode(&b).unwrap().unwrap();
        prop_assert_eq!(used, b.len());
        prop_assert_eq!(g, f);
    }

    #[test]
    fn every_truncation_is_incomplete_or_an_error(f in arb_frame(), cut in any::<prop::sample::Index>()) {
        let b = encode_to_vec(&f);
        let n = cut.index(b.len());
        // A prefix of a frame is "not yet complete" for the stream decoder...
        prop_assert_eq!(decode(&b[..n]).unwrap(), None);
        // ...and an error, not a panic, when a length prefix claims it is whole.
        if n > 4 {
            let mut short = b[..n].to_vec();
            let len = (n - 4) as u32;
            short[..4].copy_from_slice(&len.to_le_bytes());
            prop_assert!(decode(&short).is_err());
        }
    }

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
        let _ = decode_body(&bytes);
        // With the right version byte the body parser is exercised too.
        let mut v = bytes.clone();
        if !v.is_empty() { v[0] = WIRE_VERSION; }
        let _ = decode_body(&v);
    }

    #[test]
    fn flipped_bytes_never_panic(f in arb_frame(), at in any::<prop::sample::Index>(), x in 1u8..) {
        let mut b = encode_to_vec(&f);
        let i = at.index(b.len());
        b[i] ^= x;
        let _ = decode(&b);
    }
}

#[test]
fn named_bad_inputs_give_clear_errors() {
    let good = encode_to_vec(&Frame::ClientAck { id: 1, index: 2 });
    // Another version.
    let mut other = good.clone();
    other[4] = 9;
    let e = decode(&other).unwrap_err();
    assert_eq!(
        e,
        WireError::Version {
            got: 9,
            want: WIRE_VERSION
        }
    );
    assert_eq!(
        e.to_string(),
        "peer speaks wire version 9, this build speaks version 1"
    );
    // Oversized: refused from the length prefix alone.
    let big = ((MAX_FRAME + 1) as u32).to_le_bytes();
    assert!(matches!(decode(&big), Err(WireError::Oversized { .. })));
    // Unknown kind.
    let mut k = good.clone();
    k[5] = 200;
    assert_eq!(decode(&k).unwrap_err(), WireError::UnknownKind(200));
    // Trailing bytes.
    let mut t = good.clone();
    t.push(0);
    let len = (t.len() - 4) as u32;
    t[..4].copy_from_slice(&len.to_le_bytes());
    assert_eq!(decode(&t).unwrap_err(), WireError::Trailing(1));
    // Entry count larger than the frame can hold: refused before allocating.
    let mut a = encode_to_vec(&Frame::Repl(Message::Append {
        term: 1,
        from: 0,
        prev_index: 0,
        prev_term: 0,
        commit: 0,
        entries: vec![],
    }));
    let n = a.len();
    a[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(decode(&a), Err(WireError::Truncated { .. })));
    // Entries that do not follow prev_index.
    let bad = Frame::Repl(Message::Append {
        term: 1,
        from: 0,
        prev_index: 5,
        prev_term: 1,
        commit: 0,
        entries: vec![Entry {
            term: 1,
            index: 9,
            payload: vec![],
        }],
    });
    assert!(matches!(
        decode(&encode_to_vec(&bad)),
        Err(WireError::Malformed(_))
    ));
    // Too short to hold version and kind.
    assert_eq!(
        decode(&[1, 0, 0, 0, 1]).unwrap_err(),
        WireError::TooShort { len: 1 }
    );
}
