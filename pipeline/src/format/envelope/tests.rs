//! Unit tests: every rejection reason from in-memory objects, hostile headers, and a
//! property test that the parser never panics.

use super::*;
use crate::identity::Identity;
use proptest::prelude::*;

fn key() -> Identity {
    Identity::from_seed([3; 32])
}

fn sample() -> Vec<u8> {
    EnvelopeBuilder::new(Kind::Grad, "run-a")
        .window(7)
        .clock_ms(1_700_000_000_000)
        .section("a", b"hello hello hello hello", Compression::Zstd)
        .unwrap()
        .section("b", &[9u8; 1000], Compression::None)
        .unwrap()
        .sign(&key())
        .unwrap()
        .to_vec()
        .unwrap()
}

fn reason(bytes: &[u8], expect: &Expect) -> Reason {
    open_bytes(bytes, &Limits::default(), expect)
        .unwrap_err()
        .reason
}

fn header_range(bytes: &[u8]) -> std::ops::Range<usize> {
    let h = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    16..16 + h
}

/// Re-signs `header` (already mutated) over the original body.
fn resign(bytes: &[u8], header: &Header) -> Vec<u8> {
    let body_start = header_range(bytes).end + 64;
    let kind = u16::from_le_bytes([bytes[10], bytes[11]]);
    assemble_raw(kind, &header.to_canonical(), &bytes[body_start..], &key())
}

#[test]
fn valid_roundtrip() {
    let bytes = sample();
    let expect = Expect {
        signer: Some(key().peer_id()),
        run: Some("run-a".into()),
        kind: Some(Kind::Grad),
        window: Some(7),
        step: None,
    };
    let opened = open_bytes(&bytes, &Limits::default(), &expect).unwrap();
    assert_eq!(opened.section("a").unwrap(), b"hello hello hello hello");
    assert_eq!(opened.section("b").unwrap(), &[9u8; 1000][..]);
    assert_eq!(opened.signer, key().peer_id());
}

#[test]
fn builder_output_is_deterministic() {
    assert_eq!(sample(), sample());
}

#[test]
fn file_and_memory_sections_give_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let p = dir.path().join("d");
    std::fs::write(&p, &data).unwrap();
    let mem = EnvelopeBuilder::new(Kind::Blob, "r")
        .clock_ms(1)
        .section("d", &data, Compression::Zstd)
        .unwrap()
        .sign(&key())
        .unwrap();
    let file = EnvelopeBuilder::new(Kind::Blob, "r")
        .clock_ms(1)
        .section_file("d", &p, Compression::Zstd, None)
        .unwrap()
        .sign(&key())
        .unwrap();
    assert_eq!(mem.to_vec().unwrap(), file.to_vec().unwrap());
    let whole = mem.to_vec().unwrap();
    let mut buf = vec![0u8; whole.len() - 101];
    file.read_at(100, &mut buf).unwrap();
    assert_eq!(&buf[..], &whole[100..whole.len() - 1]);
    assert!(file.read_at(100, &mut vec![0u8; whole.len()]).is_err());
}

#[test]
fn each_reason_is_produced() {
    let good = sample();
    let d = Expect::default();

    let mut b = good.clone();
    b[0] = b'X';
    assert_eq!(reason(&b, &d), Reason::NotEnvelope);
    assert_eq!(reason(b"SHARD", &d), Reason::NotEnvelope);

    let mut b = good.clone();
    b[8] = 2;
    assert_eq!(reason(&b, &d), Reason::UnsupportedVersion);

    let mut b = good.clone();
    b[10] = 99;
    assert_eq!(reason(&b, &d), Reason::HeaderMalformed);

    let mut b = good.clone();
    b[10] = Kind::Agg.code() as u8; // prefix says agg, header says grad
    assert_eq!(reason(&b, &d), Reason::HeaderMalformed);

    let mut b = good.clone();
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(reason(&b, &d), Reason::OverLimit);

    // Header edited without re-signing: window 7 -> 8 keeps it canonical.
    let r = header_range(&good);
    let text = String::from_utf8(good[r.clone()].to_vec()).unwrap();
    let edited = text.replace("\"window\":7", "\"window\":8");
    let mut b = good.clone();
    b.splice(r.clone(), edited.bytes());
    assert_eq!(reason(&b, &d), Reason::BadSignature);

    let mut b = good.clone();
    let sig_at = r.end + 5;
    b[sig_at] ^= 1;
    assert_eq!(reason(&b, &d), Reason::BadSignature);

    // Non-canonical spacing, signed correctly.
    let spaced = text.replacen(",", ", ", 1);
    let b = assemble_raw(
        Kind::Grad.code(),
        spaced.as_bytes(),
        &good[r.end + 64..],
        &key(),
    );
    assert_eq!(reason(&b, &d), Reason::HeaderNotCanonical);

    let other = Identity::from_seed([4; 32]).peer_id();
    assert_eq!(
        reason(
            &good,
            &Expect {
                signer: Some(other),
                ..d.clone()
            }
        ),
        Reason::UnexpectedSigner
    );
    assert_eq!(
        reason(
            &good,
            &Expect {
                run: Some("run-b".into()),
                ..d.clone()
            }
        ),
        Reason::WrongRun
    );
    assert_eq!(
        reason(
            &good,
            &Expect {
                window: Some(8),
                ..d.clone()
            }
        ),
        Reason::WrongWindow
    );
    assert_eq!(
        reason(
            &good,
            &Expect {
                step: Some(1),
                ..d.clone()
            }
        ),
        Reason::WrongStep
    );
    assert_eq!(
        reason(
            &good,
            &Expect {
                kind: Some(Kind::Agg),
                ..d.clone()
            }
        ),
        Reason::WrongKind
    );

    assert_eq!(reason(&good[..good.len() - 1], &d), Reason::Truncated);
    assert_eq!(reason(&good[..20], &d), Reason::Truncated);
    let mut b = good.clone();
    b.push(0);
    assert_eq!(reason(&b, &d), Reason::TrailingBytes);

    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] ^= 0xff;
    assert_eq!(reason(&b, &d), Reason::SectionHashMismatch);

    let head = Head::parse(&good, &Limits::default()).unwrap();
    // Overlapping sections, correctly signed.
    let mut h = head.header.clone();
    h.sections[1].offset = 0;
    assert_eq!(reason(&resign(&good, &h), &d), Reason::SectionTable);
    // A section past the body.
    let mut h = head.header.clone();
    h.sections[1].len += 10;
    h.sections[1].raw_len += 10;
    h.raw_len += 10;
    assert_eq!(reason(&resign(&good, &h), &d), Reason::SectionTable);
}

#[test]
fn bomb_and_corrupt_zstd_are_refused() {
    // A small frame that inflates to 8 MiB, declared as 1 KiB, correctly hashed and signed.
    let bomb = zstd::bulk::compress(&vec![0u8; 8 << 20], 19).unwrap();
    let header = |stored: &[u8], raw_len: u64| Header {
        body_len: stored.len() as u64,
        clock_ms: 0,
        codec: "raw".into(),
        codec_params: Default::default(),
        kind: "blob".into(),
        meta: Default::default(),
        raw_len,
        run: "r".into(),
        sections: vec![SectionEntry {
            compression: Compression::Zstd,
            hash: blake3::hash(stored).to_hex().to_string(),
            len: stored.len() as u64,
            name: "s".into(),
            offset: 0,
            raw_len,
        }],
        signer: key().peer_id().to_string(),
        step: None,
        window: None,
    };
    let b = assemble_raw(1, &header(&bomb, 1024).to_canonical(), &bomb, &key());
    assert_eq!(reason(&b, &Expect::default()), Reason::SectionSize);
    // Declared larger than it really is.
    let small = zstd::bulk::compress(b"abc", 3).unwrap();
    let b = assemble_raw(1, &header(&small, 4).to_canonical(), &small, &key());
    assert_eq!(reason(&b, &Expect::default()), Reason::SectionSize);
    // Garbage, hashed and signed: the signer's own broken section.
    let junk = b"definitely not zstd".to_vec();
    let b = assemble_raw(1, &header(&junk, 10).to_canonical(), &junk, &key());
    assert_eq!(reason(&b, &Expect::default()), Reason::Decompress);
    // A frame cut short.
    let cut = &zstd::bulk::compress(&[1u8; 5000], 3).unwrap()[..8];
    let b = assemble_raw(1, &header(cut, 5000).to_canonical(), cut, &key());
    assert_eq!(reason(&b, &Expect::default()), Reason::Decompress);
}

#[test]
fn huge_window_zstd_frame_is_refused_without_allocating_it() {
    // A frame whose header asks for a 1 GiB window (long-distance mode) must not be decoded.
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.long_distance_matching(true).unwrap();
    enc.window_log(30).unwrap();
    std::io::Write::write_all(&mut enc, &[7u8; 100_000]).unwrap();
    let stored = enc.finish().unwrap();
    let h = Header {
        body_len: stored.len() as u64,
        clock_ms: 0,
        codec: "raw".into(),
        codec_params: Default::default(),
        kind: "blob".into(),
        meta: Default::default(),
        raw_len: 100_000,
        run: "r".into(),
        sections: vec![SectionEntry {
            compression: Compression::Zstd,
            hash: blake3::hash(&stored).to_hex().to_string(),
            len: stored.len() as u64,
            name: "s".into(),
            offset: 0,
            raw_len: 100_000,
        }],
        signer: key().peer_id().to_string(),
        step: None,
        window: None,
    };
    let b = assemble_raw(1, &h.to_canonical(), &stored, &key());
    assert_eq!(reason(&b, &Expect::default()), Reason::Decompress);
}

fn with_header(text: &str) -> Vec<u8> {
    assemble_raw(1, text.as_bytes(), b"", &key())
}

#[test]
fn hostile_headers_fail_fast() {
    let d = Expect::default();
    // Deeply nested JSON.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(reason(&with_header(&deep), &d), Reason::HeaderMalformed);
    // Wrong types and unknown fields.
    assert_eq!(
        reason(&with_header("{\"body_len\":\"x\"}"), &d),
        Reason::HeaderMalformed
    );
    assert_eq!(reason(&with_header("7"), &d), Reason::HeaderMalformed);
    let good = sample();
    let r = header_range(&good);
    let text = String::from_utf8(good[r].to_vec()).unwrap();
    let extra = text.replacen("{", "{\"zzz\":1,", 1);
    assert_eq!(reason(&with_header(&extra), &d), Reason::HeaderMalformed);
    // A section table claiming 2^40 sections in a tiny header cannot allocate them.
    let huge_body = text
        .replace("\"body_len\":", "\"body_len\":9007199254740991")
        .replacen("9007199254740991", "", 0);
    assert!(open_bytes(&with_header(&huge_body), &Limits::default(), &d).is_err());
    // Absurd lengths, properly signed: refused by limits before any read.
    let head = Head::parse(&good, &Limits::default()).unwrap();
    let mut h = head.header.clone();
    h.body_len = MAX_SAFE_INT;
    assert_eq!(reason(&resign(&good, &h), &d), Reason::OverLimit);
    let mut h = head.header.clone();
    h.sections[0].raw_len = 1 << 50;
    h.raw_len = h.sections.iter().map(|s| s.raw_len).sum();
    assert_eq!(reason(&resign(&good, &h), &d), Reason::OverLimit);
    // Too many sections for the configured limit.
    let tight = Limits {
        max_sections: 1,
        ..Limits::default()
    };
    assert_eq!(
        open_bytes(&good, &tight, &d).unwrap_err().reason,
        Reason::OverLimit
    );
    // Names that would escape a folder.
    let mut h = head.header.clone();
    h.sections[0].name = "../x".into();
    assert_eq!(reason(&resign(&good, &h), &d), Reason::SectionTable);
    // Escapes in strings are never canonical (strings are restricted to plain ASCII).
    let escaped = text.replace("\"run-a\"", "\"run\\u002da\"");
    assert_eq!(
        reason(&with_header(&escaped), &d),
        Reason::HeaderNotCanonical
    );
}

#[test]
fn reason_codes_roundtrip() {
    for &r in Reason::ALL {
        assert_eq!(Reason::parse(r.code()), Some(r));
    }
    for k in Kind::ALL {
        assert_eq!(Kind::from_code(k.code()), Some(k));
        assert_eq!(Kind::parse(k.name()), Some(k));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = open_bytes(&bytes, &Limits::default(), &Expect::default());
    }

    #[test]
    fn parser_never_panics_on_mutated_envelopes(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut b = sample();
        for (at, v) in edits {
            let i = at.index(b.len());
            b[i] = v;
        }
        let keep = cut.index(b.len() + 1);
        let _ = open_bytes(&b[..keep.max(b.len() / 2)], &Limits::default(), &Expect::default());
    }

    #[test]
    fn any_header_json_value_never_panics(s in "\\{[a-z_\":,0-9\\[\\]{} ]{0,200}\\}") {
        let _ = open_bytes(&with_header(&s), &Limits::default(), &Expect::default());
    }
}

/// A damaged immutable object is read a second time (a store may serve a read overlapping
/// a replacement under the old ETag) and then still refused with its reason, not reported as
/// "changed".
#[tokio::test]
async fn a_damaged_object_is_refused_after_the_second_read() {
    use object_store::ObjectStoreExt;
    let store = object_store::memory::InMemory::new();
    let mut bytes = sample();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let path = object_store::path::Path::from("runs/r/x.grad");
    store
        .put(&path, bytes::Bytes::from(bytes).into())
        .await
        .unwrap();
    let expect = Expect::default();
    let e = read_whole_consistent(&store, &path, "mem://x", &Limits::default(), &expect)
        .await
        .unwrap_err();
    assert_eq!(
        e.rejection().map(|r| r.reason),
        Some(Reason::SectionHashMismatch),
        "{e}"
    );
}
