//! The wire decoder against truncated, garbage, oversized and other-version frames: a clear
//! error, never a panic; encode/decode round trips; the stream reader; the encoder refusing
//! oversized frames.

use blocklab::repl::wire::{
    decode, decode_body, encode, encode_to_vec, read_frame, Frame, ReadError, Status, WireError,
    MAX_FRAME, WIRE_VERSION,
};
use blocklab::repl::{AppendOutcome, Entry, Message};
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
                payload: payload.into(),
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
            prop_oneof![
                Just(AppendOutcome::Ok),
                Just(AppendOutcome::Mismatch),
                (any::<u64>(), any::<u64>())
                    .prop_map(|(need, left)| AppendOutcome::LogFull { need, left }),
            ],
            any::<u64>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(
                |(term, from, outcome, match_index, commit, last_index)| Frame::Repl(
                    Message::AppendResp {
                        term,
                        from,
                        outcome,
                        match_index,
                        commit,
                        last_index
                    }
                )
            ),
        (any::<u64>(), prop::collection::vec(any::<u8>(), 0..128)).prop_map(|(id, payload)| {
            Frame::ClientWrite {
                id,
                payload: payload.into(),
            }
        }),
        // Hello is decoded whatever version it carries.
        (any::<u8>(), any::<u32>()).prop_map(|(version, id)| Frame::Hello { version, id }),
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
        let b = encode_to_vec(&f).unwrap();
        let (g, used) = decode(&b).unwrap().unwrap();
        prop_assert_eq!(used, b.len());
        prop_assert_eq!(&g, &f);
        // The stream reader reads the same frame, then a clean end.
        let mut r = &b[..];
        let mut body = Vec::new();
        prop_assert_eq!(read_frame(&mut r, &mut body).unwrap(), Some(f));
        prop_assert_eq!(read_frame(&mut r, &mut body).unwrap(), None);
    }

    #[test]
    fn every_truncation_is_incomplete_or_an_error(f in arb_frame(), cut in any::<prop::sample::Index>()) {
        let b = encode_to_vec(&f).unwrap();
        let n = cut.index(b.len());
        // A prefix of a frame is "not yet complete" for the stream decoder...
        prop_assert_eq!(decode(&b[..n]).unwrap(), None);
        // ...and a stream that ends there is truncated (a clean end only at 0 bytes).
        let mut r = &b[..n];
        match read_frame(&mut r, &mut Vec::new()) {
            Ok(None) => prop_assert_eq!(n, 0),
            Err(ReadError::Wire(WireError::Truncated { .. })) => prop_assert!(n > 0),
            other => prop_assert!(false, "{:?}", other),
        }
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
        let mut b = encode_to_vec(&f).unwrap();
        let i = at.index(b.len());
        b[i] ^= x;
        let _ = decode(&b);
    }
}

#[test]
fn named_bad_inputs_give_clear_errors() {
    let good = encode_to_vec(&Frame::ClientAck { id: 1, index: 2 }).unwrap();
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
        format!("peer speaks wire version 9, this build speaks version {WIRE_VERSION}")
    );
    // A Hello of another version still decodes, so the mismatch can be reported.
    let mut hello = encode_to_vec(&Frame::hello(3)).unwrap();
    hello[4] = 9;
    assert_eq!(
        decode(&hello).unwrap().unwrap().0,
        Frame::Hello { version: 9, id: 3 }
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
    }))
    .unwrap();
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
            payload: vec![].into(),
        }],
    });
    assert!(matches!(
        decode(&encode_to_vec(&bad).unwrap()),
        Err(WireError::Malformed(_))
    ));
    // An unknown append outcome.
    let mut resp = encode_to_vec(&Frame::Repl(Message::AppendResp {
        term: 1,
        from: 1,
        outcome: AppendOutcome::Ok,
        match_index: 0,
        commit: 0,
        last_index: 0,
    }))
    .unwrap();
    resp[4 + 2 + 8 + 4] = 7;
    assert_eq!(
        decode(&resp).unwrap_err(),
        WireError::Malformed("unknown append outcome")
    );
    // Too short to hold version and kind.
    assert_eq!(
        decode(&[1, 0, 0, 0, 1]).unwrap_err(),
        WireError::TooShort { len: 1 }
    );
}

#[test]
fn the_encoder_refuses_oversized_frames_and_leaves_the_buffer_alone() {
    let f = Frame::ClientWrite {
        id: 1,
        payload: vec![0u8; MAX_FRAME].into(),
    };
    let mut out = vec![1, 2, 3];
    assert!(matches!(
        encode(&f, &mut out),
        Err(WireError::Oversized { .. })
    ));
    assert_eq!(out, [1, 2, 3]);
    assert!(matches!(
        encode_to_vec(&f),
        Err(WireError::Oversized { .. })
    ));
}

#[test]
fn a_stream_ending_inside_the_length_prefix_is_truncated_not_a_clean_close() {
    for n in 1..4 {
        let b = encode_to_vec(&Frame::StatusReq).unwrap();
        let mut r = &b[..n];
        let e = read_frame(&mut r, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(e, ReadError::Wire(WireError::Truncated { have, .. }) if have == n),
            "{e}"
        );
    }
    // An oversized length prefix is refused before reading (or allocating) the body.
    let big = ((MAX_FRAME + 1) as u32).to_le_bytes();
    let e = read_frame(&mut &big[..], &mut Vec::new()).unwrap_err();
    assert!(
        matches!(e, ReadError::Wire(WireError::Oversized { .. })),
        "{e}"
    );
}
