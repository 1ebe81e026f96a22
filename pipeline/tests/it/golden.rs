//! Golden vectors for envelope v1 (`schemas/vectors/envelope-v1/`).
//!
//! The cases are built here from a fixed seed; the test checks that (1) this build produces
//! exactly the committed bytes and (2) verifying each committed file gives its recorded
//! result. `SHARDROP_BLESS=1 cargo test -p shardrop --test it golden::` rewrites the files after a deliberate
//! format change (which must also bump the format version).

use std::path::PathBuf;

use serde_json::json;
use shardrop::format::envelope::{
    Compression, EnvelopeBuilder, Expect, Head, Kind, Limits, assemble_raw, open_bytes,
};
use shardrop::identity::{Identity, PeerId};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/vectors/envelope-v1")
}

fn seed() -> [u8; 32] {
    let mut s = [0u8; 32];
    for (i, b) in s.iter_mut().enumerate() {
        *b = i as u8;
    }
    s
}

const TEXT: &[u8] = b"shardrop golden vector: the quick brown fox jumps over the lazy dog. \
the quick brown fox jumps over the lazy dog.\n";

fn numbers() -> Vec<u8> {
    (0u32..64).flat_map(|i| (i * i).to_le_bytes()).collect()
}

fn valid(id: &Identity) -> Vec<u8> {
    EnvelopeBuilder::new(Kind::Grad, "golden-run")
        .window(42)
        .clock_ms(1_764_000_000_000)
        .codec(
            "raw",
            [("note".to_string(), "two sections".to_string())].into(),
        )
        .meta("purpose", "golden-vector")
        .section("text.txt", TEXT, Compression::Zstd)
        .unwrap()
        .section("numbers.bin", &numbers(), Compression::None)
        .unwrap()
        .sign(id)
        .unwrap()
        .to_vec()
        .unwrap()
}

struct Case {
    file: &'static str,
    what: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
    result: &'static str,
}

fn cases() -> Vec<Case> {
    let id = Identity::from_seed(seed());
    let me = id.peer_id();
    let good = valid(&id);
    let head = Head::parse(&good, &Limits::default()).unwrap();
    let hlen = head.signed.len();
    let body = good[hlen + 64..].to_vec();
    let full = Expect {
        signer: Some(me),
        run: Some("golden-run".into()),
        kind: Some(Kind::Grad),
        window: Some(42),
        step: None,
    };
    let resigned = |h: &shardrop::format::envelope::Header| {
        assemble_raw(Kind::Grad.code(), &h.to_canonical(), &body, &id)
    };
    let mut v = Vec::new();
    let mut case = |file, what, bytes, expect: Expect, result| {
        v.push(Case {
            file,
            what,
            bytes,
            expect,
            result,
        })
    };

    case(
        "valid.bin",
        "two sections (zstd, none), run golden-run, window 42",
        good.clone(),
        full.clone(),
        "valid",
    );
    let mut b = good.clone();
    b[..8].copy_from_slice(b"NOTSHARD");
    case(
        "bad-magic.bin",
        "first 8 bytes replaced",
        b,
        full.clone(),
        "not_envelope",
    );
    let mut b = good.clone();
    b[8] = 2;
    case(
        "version-2.bin",
        "format version field set to 2",
        b,
        full.clone(),
        "unsupported_version",
    );
    let mut b = good.clone();
    b[12..16].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    case(
        "huge-header-len.bin",
        "header length field set to 0xFFFFFFF0",
        b,
        full.clone(),
        "over_limit",
    );
    let mut b = good.clone();
    b[10..12].copy_from_slice(&Kind::Agg.code().to_le_bytes());
    case(
        "kind-mismatch.bin",
        "prefix kind code changed to agg (4); header still says grad",
        b,
        full.clone(),
        "header_malformed",
    );
    let text = String::from_utf8(good[16..hlen].to_vec()).unwrap();
    let mut b = good.clone();
    b.splice(
        16..hlen,
        text.replace("\"window\":42", "\"window\":43").into_bytes(),
    );
    case(
        "window-edited.bin",
        "header window 42 -> 43 without re-signing",
        b,
        Expect::default(),
        "bad_signature",
    );
    let mut b = good.clone();
    b[hlen + 10] ^= 0x01;
    case(
        "signature-bitflip.bin",
        "one bit of the signature flipped",
        b,
        full.clone(),
        "bad_signature",
    );
    let spaced = text.replacen(',', ", ", 1);
    case(
        "not-canonical.bin",
        "a space after the first comma, correctly signed",
        assemble_raw(Kind::Grad.code(), spaced.as_bytes(), &body, &id),
        full.clone(),
        "header_not_canonical",
    );
    case(
        "truncated.bin",
        "last 10 bytes removed",
        good[..good.len() - 10].to_vec(),
        full.clone(),
        "truncated",
    );
    let mut b = good.clone();
    b.extend_from_slice(b"extra");
    case(
        "trailing.bin",
        "5 bytes appended",
        b,
        full.clone(),
        "trailing_bytes",
    );
    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] ^= 0xFF;
    case(
        "section-bitflip.bin",
        "last body byte flipped",
        b,
        full.clone(),
        "section_hash_mismatch",
    );
    let mut h = head.header.clone();
    h.sections[1].offset = 0;
    case(
        "overlap.bin",
        "second section's offset set to 0, correctly signed",
        resigned(&h),
        full.clone(),
        "section_table",
    );
    let other = Identity::from_seed([0xAB; 32]);
    let b = EnvelopeBuilder::new(Kind::Grad, "golden-run")
        .window(42)
        .clock_ms(1_764_000_000_000)
        .section("text.txt", TEXT, Compression::Zstd)
        .unwrap()
        .sign(&other)
        .unwrap()
        .to_vec()
        .unwrap();
    case(
        "other-signer.bin",
        "valid, but signed by the key with seed 0xAB x32",
        b,
        full.clone(),
        "unexpected_signer",
    );
    case(
        "expect-run.bin",
        "valid object; reader expects run other-run",
        good.clone(),
        Expect {
            run: Some("other-run".into()),
            ..full.clone()
        },
        "wrong_run",
    );
    case(
        "expect-window.bin",
        "valid object; reader expects window 41",
        good.clone(),
        Expect {
            window: Some(41),
            ..full.clone()
        },
        "wrong_window",
    );
    case(
        "expect-kind.bin",
        "valid object; reader expects kind agg",
        good.clone(),
        Expect {
            kind: Some(Kind::Agg),
            ..full.clone()
        },
        "wrong_kind",
    );
    case(
        "expect-step.bin",
        "valid object; reader expects step 1",
        good.clone(),
        Expect {
            step: Some(1),
            ..full.clone()
        },
        "wrong_step",
    );
    // A decompression bomb: 4 MiB of zeros declared as 100 bytes, hashed and signed.
    let bomb = zstd::bulk::compress(&vec![0u8; 4 << 20], 19).unwrap();
    let mut h = head.header.clone();
    h.sections.truncate(1);
    h.sections[0].hash = blake3::hash(&bomb).to_hex().to_string();
    h.sections[0].len = bomb.len() as u64;
    h.sections[0].raw_len = 100;
    h.body_len = bomb.len() as u64;
    h.raw_len = 100;
    case(
        "bomb.bin",
        "zstd section inflating to 4 MiB declared as 100 bytes, correctly signed",
        assemble_raw(Kind::Grad.code(), &h.to_canonical(), &bomb, &id),
        full.clone(),
        "section_size",
    );
    let junk = b"this is not a zstd frame at all".to_vec();
    h.sections[0].hash = blake3::hash(&junk).to_hex().to_string();
    h.sections[0].len = junk.len() as u64;
    h.body_len = junk.len() as u64;
    case(
        "bad-zstd.bin",
        "section bytes are not zstd, correctly hashed and signed",
        assemble_raw(Kind::Grad.code(), &h.to_canonical(), &junk, &id),
        full,
        "decompress",
    );
    v
}

fn expect_json(e: &Expect) -> serde_json::Value {
    json!({
        "signer": e.signer.map(|p| p.to_string()),
        "run": e.run, "kind": e.kind.map(|k| k.name()), "window": e.window, "step": e.step,
    })
}

#[test]
fn golden_vectors() {
    let bless = std::env::var("SHARDROP_BLESS").is_ok_and(|v| v == "1");
    let dir = dir();
    let id = Identity::from_seed(seed());
    let mut index = Vec::new();
    for c in cases() {
        let path = dir.join(c.file);
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &c.bytes).unwrap();
        }
        let stored = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with SHARDROP_BLESS=1 once)", path.display()));
        assert_eq!(
            stored, c.bytes,
            "{}: this build no longer produces the committed bytes",
            c.file
        );
        let got = match open_bytes(&stored, &Limits::default(), &c.expect) {
            Ok(opened) => {
                if c.result == "valid" {
                    assert_eq!(opened.section("text.txt").unwrap(), TEXT);
                    assert_eq!(opened.section("numbers.bin").unwrap(), numbers());
                }
                "valid".to_string()
            }
            Err(r) => r.reason.code().to_string(),
        };
        assert_eq!(got, c.result, "{}: {}", c.file, c.what);
        index.push(json!({"file": c.file, "what": c.what, "expect": expect_json(&c.expect), "result": c.result}));
    }
    let doc = json!({
        "format": "shardrop envelope v1",
        "key_seed_hex": hex::encode(seed()),
        "peer_id": id.peer_id().to_string(),
        "valid_sections": [
            {"name": "text.txt", "raw_len": TEXT.len(), "raw_blake3": blake3::hash(TEXT).to_hex().to_string()},
            {"name": "numbers.bin", "raw_len": numbers().len(), "raw_blake3": blake3::hash(&numbers()).to_hex().to_string()},
        ],
        "cases": index,
    });
    let index_path = dir.join("cases.json");
    let text = serde_json::to_string_pretty(&doc).unwrap() + "\n";
    if bless {
        std::fs::write(&index_path, &text).unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(&index_path).unwrap(),
        text,
        "cases.json is stale"
    );
    assert_eq!(
        PeerId::parse(&id.peer_id().to_string()).unwrap(),
        id.peer_id()
    );
}
