//! Golden vectors for the corners of envelope v1 that the first vectors left to guesswork
//! (`schemas/vectors/envelope-v1/edges/`, answered in `envelope.md` §8): duplicate JSON
//! keys, numbers that are not plain integers, `null`, escapes, empty section tables, bad
//! section names, oversized maps, several and skippable zstd frames, and signer keys that
//! are small-order, non-canonical or upper-case. Every object is correctly signed, so the
//! verdict comes from the rule under test and not from the signature.
//! `SHARDROP_BLESS=1 cargo test -p shardrop --test it golden_envelope_edges::` rewrites them.

use std::path::PathBuf;

use serde_json::json;
use shardrop::format::envelope::{
    Compression, EnvelopeBuilder, Expect, Head, Header, Kind, Limits, SectionEntry, assemble_raw,
    open_bytes,
};
use shardrop::identity::Identity;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/vectors/envelope-v1/edges")
}

fn id() -> Identity {
    Identity::from_seed([7u8; 32])
}

/// A valid one-section `blob` envelope and its parsed header.
fn base() -> (Vec<u8>, Header) {
    let bytes = EnvelopeBuilder::new(Kind::Blob, "edge-run")
        .window(5)
        .clock_ms(1_764_000_000_000)
        .codec("raw", Default::default())
        .meta("purpose", "edge-vector")
        .section("a.txt", b"edge case payload", Compression::None)
        .unwrap()
        .sign(&id())
        .unwrap()
        .to_vec()
        .unwrap();
    let head = Head::parse(&bytes, &Limits::default()).unwrap();
    (bytes, head.header)
}

/// Signs `header` (exact bytes) over `body`.
fn signed(header: &str, body: &[u8]) -> Vec<u8> {
    assemble_raw(Kind::Blob.code(), header.as_bytes(), body, &id())
}

fn text(h: &Header) -> String {
    String::from_utf8(h.to_canonical()).unwrap()
}

/// A header whose one section holds `stored` (compression zstd, raw bytes `raw`).
fn zstd_section(h: &Header, stored: &[u8], raw: &[u8]) -> String {
    let mut h = h.clone();
    h.sections = vec![SectionEntry {
        compression: Compression::Zstd,
        hash: blake3::hash(stored).to_hex().to_string(),
        len: stored.len() as u64,
        name: "a.txt".into(),
        offset: 0,
        raw_len: raw.len() as u64,
    }];
    h.body_len = stored.len() as u64;
    h.raw_len = raw.len() as u64;
    text(&h)
}

fn cases() -> Vec<(&'static str, &'static str, Vec<u8>, &'static str)> {
    let (good, h) = base();
    let body =
        good[Head::parse(&good, &Limits::default()).unwrap().body_start() as usize..].to_vec();
    let canon = text(&h);
    let edit = |from: &str, to: &str| {
        assert!(canon.contains(from), "{from}");
        signed(&canon.replacen(from, to, 1), &body)
    };
    let mut v = Vec::new();
    v.push(("valid", "the base object", good.clone(), "valid"));
    v.push((
        "duplicate-meta-key",
        "meta holds \"purpose\" twice (a map: the last would win, so it is not canonical)",
        edit(
            "\"meta\":{\"purpose\":\"edge-vector\"}",
            "\"meta\":{\"purpose\":\"x\",\"purpose\":\"edge-vector\"}",
        ),
        "header_not_canonical",
    ));
    v.push((
        "duplicate-field",
        "the key \"run\" appears twice",
        edit(
            "\"run\":\"edge-run\"",
            "\"run\":\"edge-run\",\"run\":\"edge-run\"",
        ),
        "header_malformed",
    ));
    v.push((
        "window-fraction",
        "window written 5.0",
        edit("\"window\":5", "\"window\":5.0"),
        "header_malformed",
    ));
    v.push((
        "window-exponent",
        "window written 5e0",
        edit("\"window\":5", "\"window\":5e0"),
        "header_malformed",
    ));
    v.push((
        "window-leading-zero",
        "window written 05",
        edit("\"window\":5", "\"window\":05"),
        "header_malformed",
    ));
    v.push((
        "window-negative",
        "window written -5",
        edit("\"window\":5", "\"window\":-5"),
        "header_malformed",
    ));
    v.push((
        "window-too-large",
        "window 2^53 (one over the largest integer)",
        edit("\"window\":5", "\"window\":9007199254740992"),
        "header_malformed",
    ));
    v.push((
        "step-null",
        "\"step\":null present (optional keys are absent, never null)",
        edit("\"signer\"", "\"step\":null,\"signer\""),
        "header_not_canonical",
    ));
    v.push((
        "escaped-run",
        "run written with a \\u escape",
        edit("\"run\":\"edge-run\"", "\"run\":\"edge\\u002drun\""),
        "header_not_canonical",
    ));
    v.push((
        "whitespace",
        "a space after a colon",
        edit("\"window\":5", "\"window\": 5"),
        "header_not_canonical",
    ));
    v.push((
        "unknown-key",
        "an extra top-level key \"zzz\"",
        edit("\"window\":5}", "\"window\":5,\"zzz\":1}"),
        "header_malformed",
    ));
    v.push((
        "signer-uppercase",
        "signer hex in upper case",
        {
            let s = h.signer.clone();
            edit(&s, &s.to_uppercase())
        },
        "header_malformed",
    ));
    v.push((
        "section-name-slash",
        "section name \"../a\"",
        edit("\"name\":\"a.txt\"", "\"name\":\"../a\""),
        "section_table",
    ));
    v.push((
        "section-name-dot",
        "section name \".a\" (starts with a dot)",
        edit("\"name\":\"a.txt\"", "\"name\":\".a\""),
        "section_table",
    ));
    {
        let mut big = h.clone();
        for i in 0..256 {
            big.meta.insert(format!("k{i:03}"), "v".into());
        }
        v.push((
            "meta-257-entries",
            "meta with 257 entries (limit 256)",
            signed(&text(&big), &body),
            "over_limit",
        ));
    }
    {
        let mut empty = h.clone();
        empty.sections.clear();
        empty.body_len = 0;
        empty.raw_len = 0;
        v.push((
            "no-sections",
            "an empty section table and an empty body",
            signed(&text(&empty), &[]),
            "valid",
        ));
    }
    {
        let raw = b"edge case payload";
        let mut two = zstd::encode_all(&raw[..8], 3).unwrap();
        two.extend(zstd::encode_all(&raw[8..], 3).unwrap());
        v.push((
            "zstd-two-frames",
            "a section stored as two zstd frames",
            {
                let hd = zstd_section(&h, &two, raw);
                signed(&hd, &two)
            },
            "valid",
        ));
        let mut skip = vec![0x50, 0x2A, 0x4D, 0x18, 4, 0, 0, 0, 1, 2, 3, 4];
        skip.extend(zstd::encode_all(&raw[..], 3).unwrap());
        v.push((
            "zstd-skippable-frame",
            "a skippable frame (magic 0x184D2A50, 4 bytes) before the data frame",
            {
                let hd = zstd_section(&h, &skip, raw);
                signed(&hd, &skip)
            },
            "valid",
        ));
        let empty = zstd::encode_all(&[][..], 3).unwrap();
        v.push((
            "zstd-empty-frame",
            "a zstd section holding one empty frame, raw_len 0",
            {
                let hd = zstd_section(&h, &empty, b"");
                signed(&hd, &empty)
            },
            "valid",
        ));
        v.push((
            "zstd-no-frame",
            "a zstd section of zero stored bytes, raw_len 0",
            {
                let hd = zstd_section(&h, b"", b"");
                signed(&hd, b"")
            },
            "decompress",
        ));
    }
    {
        // Signer keys no honest signer has: the identity point (small order) and a
        // non-canonical encoding (y = p, which reduces to 0). The signature bytes are
        // arbitrary; strict verification must refuse either key.
        let small = format!("01{}", "00".repeat(31));
        let noncanon = format!("ed{}7f", "ff".repeat(30));
        for (name, what, key) in [
            (
                "signer-small-order",
                "signer is the identity point (small order)",
                small,
            ),
            (
                "signer-non-canonical",
                "signer encodes y = p (not canonical)",
                noncanon,
            ),
        ] {
            let mut hh = h.clone();
            hh.signer = key;
            let mut b = signed(&text(&hh), &body);
            let sig_at = 16 + text(&hh).len();
            b[sig_at..sig_at + 64].fill(0);
            v.push((name, what, b, "bad_signature"));
        }
    }
    v
}

#[test]
fn envelope_edge_vectors() {
    let bless = std::env::var("SHARDROP_BLESS").is_ok_and(|v| v == "1");
    let d = dir();
    let expect = Expect {
        signer: None,
        run: Some("edge-run".into()),
        kind: Some(Kind::Blob),
        window: None,
        step: None,
    };
    let mut index = Vec::new();
    for (name, what, bytes, want) in cases() {
        let path = d.join(format!("{name}.bin"));
        if bless {
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let stored = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (SHARDROP_BLESS=1 once)", path.display()));
        assert!(
            stored == bytes,
            "{name}: this build produces different bytes"
        );
        let got = match open_bytes(&stored, &Limits::default(), &expect) {
            Ok(_) => "valid",
            Err(r) => r.reason.code(),
        };
        assert_eq!(got, want, "{name}: {what}");
        index.push(json!({"file": format!("{name}.bin"), "what": what, "result": want}));
    }
    let doc = serde_json::to_string_pretty(&json!({
        "format": "shardrop envelope v1, edge cases (envelope.md section 8)",
        "key_seed_hex": hex::encode([7u8; 32]),
        "expect": {"run": "edge-run", "kind": "blob", "signer": null, "window": null, "step": null},
        "cases": index,
    }))
    .unwrap()
        + "\n";
    let path = d.join("cases.json");
    if bless {
        std::fs::write(&path, &doc).unwrap();
    }
    assert_eq!(std::fs::read_to_string(&path).unwrap(), doc, "cases.json");
}
