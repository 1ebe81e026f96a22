//! Golden vectors for the gradient codec (`schemas/vectors/gradient-v1/`): fixed updates in
//! f32, bf16 and f16 (with a short last chunk), two encode steps with error feedback, for
//! several parameter sets. The test checks that this build reproduces every committed byte
//! and that decoding the committed sections gives the committed dense tensors.
//! `SHARDROP_BLESS=1 cargo test -p shardrop --test it golden_gradient::` rewrites them.

use std::path::PathBuf;

use safetensors::Dtype;
use safetensors::tensor::TensorView;
use shardrop::format::codec::{
    CodecLimits, CodecParams, Dense, EfState, EncodeOptions, IndexEncoding, ScaleMode, ValueFormat,
    accumulate_section, dense_to_safetensors, encode_update, f32_to_bf16,
};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/vectors/gradient-v1")
}

fn wave(n: usize, step: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.37 + step as f32).sin() * (1.0 + (i % 7) as f32)) * 0.01)
        .collect()
}

fn update(step: u32) -> Vec<u8> {
    let a: Vec<u8> = wave(300, step)
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let b: Vec<u8> = wave(130, step + 10)
        .iter()
        .flat_map(|&x| f32_to_bf16(x).to_le_bytes())
        .collect();
    let c: Vec<u8> = wave(64, step + 20)
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
        .collect();
    let views = vec![
        (
            "a.weight",
            TensorView::new(Dtype::F32, vec![3, 100], &a).unwrap(),
        ),
        (
            "b.bias",
            TensorView::new(Dtype::BF16, vec![130], &b).unwrap(),
        ),
        ("c.norm", TensorView::new(Dtype::F16, vec![64], &c).unwrap()),
    ];
    safetensors::serialize(views, None).unwrap()
}

fn cases() -> Vec<(&'static str, CodecParams)> {
    use IndexEncoding::*;
    use ScaleMode::*;
    use ValueFormat::*;
    let p = |chunk, k, values, scales, indices| CodecParams {
        chunk,
        k,
        values,
        scales,
        indices,
    };
    vec![
        ("int2-compact-chunk", p(64, 5, Int2, Chunk, Compact)),
        ("int4-packed-tensor", p(64, 8, Int4, Tensor, Packed)),
        ("bf16-compact", p(128, 3, Bf16, Chunk, Compact)),
        ("int8-packed-full", p(64, 64, Int8, Chunk, Packed)),
    ]
}

fn check(bless: bool, path: PathBuf, bytes: &[u8]) {
    if bless {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
    let stored = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (SHARDROP_BLESS=1 once)", path.display()));
    assert!(
        stored == bytes,
        "{}: this build produces different bytes",
        path.display()
    );
}

#[test]
fn gradient_golden_vectors() {
    let bless = std::env::var("SHARDROP_BLESS").is_ok_and(|v| v == "1");
    let d = dir();
    let updates = [update(1), update(2)];
    check(bless, d.join("update-1.safetensors"), &updates[0]);
    check(bless, d.join("update-2.safetensors"), &updates[1]);
    let mut index = Vec::new();
    for (name, params) in cases() {
        let opts = EncodeOptions {
            params,
            beta: 0.5,
            section_bytes: 16 << 20,
        };
        let mut state = EfState::default();
        let mut files = Vec::new();
        for (step, u) in updates.iter().enumerate() {
            let enc = encode_update(u, &mut state, &opts).unwrap();
            assert_eq!(enc.sections.len(), 1);
            let rel = format!("{name}/section-{}.safetensors", step + 1);
            check(bless, d.join(&rel), &enc.sections[0].1);
            // Decode the committed bytes, not our own: another implementation's output must
            // decode to the committed dense tensors.
            let committed = std::fs::read(d.join(&rel)).unwrap();
            let mut dense = Dense::new();
            accumulate_section(&mut dense, &committed, None, &CodecLimits::default(), 1.0).unwrap();
            let dense_rel = format!("{name}/dense-{}.safetensors", step + 1);
            check(
                bless,
                d.join(&dense_rel),
                &dense_to_safetensors(&dense).unwrap(),
            );
            files.push(serde_json::json!({"update": format!("update-{}.safetensors", step + 1), "section": rel, "dense": dense_rel}));
        }
        let state_dir = tempfile::tempdir().unwrap();
        state.save(state_dir.path()).unwrap();
        let state_rel = format!("{name}/state-after-2.safetensors");
        check(
            bless,
            d.join(&state_rel),
            &std::fs::read(state_dir.path().join("error-feedback.safetensors")).unwrap(),
        );
        index.push(serde_json::json!({"name": name, "params": params, "beta": 0.5, "steps": files, "state_after_step_2": state_rel}));
    }
    let doc = serde_json::to_string_pretty(&serde_json::json!({
        "codec": "topk-v1",
        "inputs": "a.weight f32 [3,100] (short last chunk at C=64), b.bias bf16 [130], c.norm f16 [64]; see pipeline/tests/it/golden_gradient.rs",
        "cases": index,
    }))
    .unwrap()
        + "\n";
    check(bless, d.join("cases.json"), doc.as_bytes());
}
