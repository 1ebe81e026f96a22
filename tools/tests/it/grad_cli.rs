//! `shardrop grad encode|decode` and `bench codec` as a training loop would use them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{ok_json, p, shardrop};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn wave(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.731 + seed).sin() * (1.0 + (i % 13) as f32)) * 1e-3)
        .collect()
}

/// An update with an f32 matrix (short last chunk) and a bf16 vector.
fn write_update(path: &Path, seed: f32) -> (Vec<f32>, Vec<f32>) {
    let w = wave(5000, seed);
    let b = wave(4096, seed + 1.0);
    let wb: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    let bb: Vec<u8> = b
        .iter()
        .flat_map(|&x| shardrop::format::codec::f32_to_bf16(x).to_le_bytes())
        .collect();
    let views = vec![
        (
            "layer.weight",
            TensorView::new(Dtype::F32, vec![50, 100], &wb).unwrap(),
        ),
        (
            "layer.bias",
            TensorView::new(Dtype::BF16, vec![4096], &bb).unwrap(),
        ),
    ];
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    let b_rounded = b
        .iter()
        .map(|&x| shardrop::format::codec::bf16_to_f32(shardrop::format::codec::f32_to_bf16(x)))
        .collect();
    (w, b_rounded)
}

fn read_f32(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32);
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn encode_decode_roundtrip_with_state_and_envelope() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |s: &str| -> PathBuf { tmp.path().join(s) };
    let (w, b) = write_update(&t("u1.safetensors"), 0.0);
    let j = ok_json(shardrop(&[
        "grad",
        "encode",
        p(&t("u1.safetensors")),
        p(&t("out1")),
        "--state",
        p(&t("state")),
        "--beta",
        "0.9",
        "--json",
    ]));
    assert_eq!(j["dense_bytes"], 5000 * 4 + 4096 * 2);
    assert_eq!(
        j["kept"],
        64 * 3,
        "two chunks of the matrix (one short) and one of the bias"
    );
    for key in ["bytes", "ratio", "bits_per_kept", "zstd_bytes"] {
        assert!(j[key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert!(j["bits_per_kept"].as_f64().unwrap() <= 10.5);
    assert!(
        t("state/error-feedback.safetensors").exists(),
        "state persisted"
    );

    ok_json(shardrop(&[
        "grad",
        "decode",
        p(&t("out1")),
        p(&t("dense1.safetensors")),
        "--model",
        p(&t("u1.safetensors")),
        "--json",
    ]));
    let dw = read_f32(&t("dense1.safetensors"), "layer.weight");
    let db = read_f32(&t("dense1.safetensors"), "layer.bias");
    assert_eq!(dw.iter().filter(|x| **x != 0.0).count(), 128);
    assert_eq!(db.iter().filter(|x| **x != 0.0).count(), 64);
    // Decoded values sit on the kept positions and are close (int2: within a third of the
    // chunk's largest magnitude) to the update.
    for (dense, orig) in [(&dw, &w), (&db, &b)] {
        for (c, (dc, oc)) in dense.chunks(4096).zip(orig.chunks(4096)).enumerate() {
            let max = oc.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (i, (&d, &o)) in dc.iter().zip(oc).enumerate() {
                if d != 0.0 {
                    assert!(
                        (d - o).abs() <= max / 3.0 * 1.01,
                        "chunk {c} elem {i}: {d} vs {o}"
                    );
                    assert!(o.abs() >= max / 4.0, "kept values are the large ones");
                }
            }
        }
    }

    // A second window: the error-feedback state makes it differ from a fresh encode, and a
    // fresh encode from the same state is byte-identical (deterministic restart).
    let state_copy = t("state-copy");
    std::fs::create_dir_all(&state_copy).unwrap();
    std::fs::copy(
        t("state/error-feedback.safetensors"),
        state_copy.join("error-feedback.safetensors"),
    )
    .unwrap();
    write_update(&t("u2.safetensors"), 5.0);
    ok_json(shardrop(&[
        "grad",
        "encode",
        p(&t("u2.safetensors")),
        p(&t("out2")),
        "--state",
        p(&t("state")),
        "--json",
    ]));
    ok_json(shardrop(&[
        "grad",
        "encode",
        p(&t("u2.safetensors")),
        p(&t("out2b")),
        "--state",
        p(&state_copy),
        "--json",
    ]));
    ok_json(shardrop(&[
        "grad",
        "encode",
        p(&t("u2.safetensors")),
        p(&t("out2c")),
        "--state",
        p(&t("fresh")),
        "--json",
    ]));
    let sec = "t00000-00001.safetensors";
    let read = |d: &str| std::fs::read(t(d).join(sec)).unwrap();
    assert_eq!(read("out2"), read("out2b"));
    assert_ne!(read("out2"), read("out2c"));
    let refused = shardrop(&[
        "grad",
        "encode",
        p(&t("u2.safetensors")),
        p(&t("out2")),
        "--state",
        p(&t("state")),
    ]);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "a non-empty output folder is refused"
    );

    // Signed into a grad envelope, decoded from the envelope: same dense tensors.
    let key = t("miner.key");
    ok_json(shardrop(&["keygen", "--out", p(&key), "--json"]));
    let env = format!("file://{}", t("store/w1.grad").display());
    let sections: Vec<String> = std::fs::read_dir(t("out1"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    let mut args = vec![
        "sign",
        "--key",
        p(&key),
        "--kind",
        "grad",
        "--run",
        "r",
        "--window",
        "1",
        "--to",
        &env,
        "--json",
    ];
    args.extend(sections.iter().map(String::as_str));
    ok_json(shardrop(&args));
    ok_json(shardrop(&[
        "grad",
        "decode",
        &env,
        p(&t("dense-env.safetensors")),
        "--json",
    ]));
    assert_eq!(
        std::fs::read(t("dense-env.safetensors")).unwrap(),
        std::fs::read(t("dense1.safetensors")).unwrap()
    );
}

#[test]
fn decode_refuses_bad_sections_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |s: &str| -> PathBuf { tmp.path().join(s) };
    write_update(&t("u.safetensors"), 1.0);
    ok_json(shardrop(&[
        "grad",
        "encode",
        p(&t("u.safetensors")),
        p(&t("out")),
        "--state",
        p(&t("s")),
        "--indices",
        "packed",
        "--json",
    ]));
    let sec = t("out/t00000-00001.safetensors");
    // Another model: the tensors are unknown to it.
    let other = t("other.safetensors");
    let z = vec![0u8; 16];
    std::fs::write(
        &other,
        safetensors::serialize(
            vec![("x", TensorView::new(Dtype::F32, vec![4], &z).unwrap())],
            None,
        )
        .unwrap(),
    )
    .unwrap();
    let out = shardrop(&[
        "grad",
        "decode",
        p(&sec),
        p(&t("d.safetensors")),
        "--model",
        p(&other),
    ]);
    // A codec rejection exits 3, like every verified-and-rejected input.
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown_tensor") && err.contains("t00000-00001"),
        "{err}"
    );
    // Corrupt the first index of layer.bias so indices are no longer increasing.
    let mut bytes = std::fs::read(&sec).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let idx = st.tensor("layer.bias/idx").unwrap();
    let offset = idx.data().as_ptr() as usize - bytes.as_ptr() as usize;
    drop(st);
    bytes[offset] = 0xFF; // first 12-bit index becomes large, the next is smaller
    bytes[offset + 1] |= 0x0F;
    std::fs::write(&sec, &bytes).unwrap();
    let out = shardrop(&["grad", "decode", p(&sec), p(&t("d.safetensors"))]);
    // A codec rejection exits 3, like every verified-and-rejected input.
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("indices_not_increasing"), "{err}");
    assert!(
        !t("d.safetensors").exists(),
        "nothing is written for a rejected input"
    );
}

#[test]
fn bench_codec_matches_numpy_byte_for_byte() {
    let python = std::env::var("SHARDROP_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_numpy = Command::new(&python)
        .args(["-c", "import numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_numpy {
        assert!(
            std::env::var("SHARDROP_NUMPY_REQUIRED").is_err(),
            "numpy required but {python} has none"
        );
        eprintln!("skipping: {python} has no numpy (run tools/test)");
        return;
    }
    for extra in [
        &["--values", "int2", "--indices", "compact"][..],
        &[
            "--values",
            "int4",
            "--indices",
            "packed",
            "--chunk",
            "1024",
            "--k",
            "32",
        ][..],
    ] {
        let mut args = vec![
            "bench", "codec", "--size", "4M", "--reps", "1", "--python", &python, "--json",
        ];
        args.extend_from_slice(extra);
        let j = ok_json(shardrop(&args));
        assert_eq!(j["numpy"]["identical"], true, "{extra:?}: {}", j["numpy"]);
        assert!(j["f32"]["encode_gbps"].as_f64().unwrap() > 0.0);
        assert!(j["read_pass_gbps"].as_f64().unwrap() > 0.0);
    }
}

/// `--device cuda:0` where no GPU can be used (no `cuda` feature, no driver): a warning
/// naming the reason, the CPU codec, and the very bytes a CPU run writes. On a GPU machine
/// (feature `cuda`) the same test checks the GPU's files against the CPU's.
#[test]
fn encode_device_cuda_falls_back_or_matches_the_cpu_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let t = |s: &str| -> PathBuf { tmp.path().join(s) };
    write_update(&t("u.safetensors"), 3.0);
    let mut files = Vec::new();
    for (dev, out, state) in [("cpu", "o-cpu", "s-cpu"), ("cuda:0", "o-gpu", "s-gpu")] {
        for step in 0..2 {
            let out = format!("{out}{step}");
            let o = shardrop(&[
                "grad",
                "encode",
                p(&t("u.safetensors")),
                p(&t(&out)),
                "--state",
                p(&t(state)),
                "--device",
                dev,
                "--json",
            ]);
            let j = ok_json(&o);
            let stderr = String::from_utf8_lossy(&o.stderr);
            if dev == "cpu" {
                assert_eq!(j["device"], "cpu");
                assert!(j["device_fallback"].is_null());
            } else if j["device"] == "cpu" {
                let why = j["device_fallback"].as_str().expect("a fallback reason");
                assert!(!why.is_empty());
                assert!(
                    stderr.contains("warning: --device cuda:0") && stderr.contains(why),
                    "{stderr}"
                );
            } else {
                assert!(j["device_fallback"].is_null(), "{j}");
            }
            let mut names: Vec<_> = std::fs::read_dir(t(&out))
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            let bytes: Vec<Vec<u8>> = names.iter().map(|n| std::fs::read(n).unwrap()).collect();
            files.push(bytes);
        }
        files.push(vec![
            std::fs::read(t(&format!("{state}/error-feedback.safetensors"))).unwrap(),
        ]);
    }
    assert_eq!(
        files[0..3],
        files[3..6],
        "sections and state after two windows"
    );

    let bad = shardrop(&[
        "grad",
        "encode",
        p(&t("u.safetensors")),
        p(&t("o-bad")),
        "--state",
        p(&t("s-bad")),
        "--device",
        "gpu0",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected cpu, cuda or cuda:N"));
}

/// `bench codec --device cuda:0` without a usable GPU runs the CPU bench and says why; with
/// one (feature `cuda` on a GPU machine) it reports the GPU's figures and its CPU parity.
#[test]
fn bench_codec_device_cuda_reports_the_device_it_used() {
    let o = shardrop(&[
        "bench",
        "codec",
        "--device",
        "cuda:0",
        "--size",
        "1M",
        "--reps",
        "1",
        "--no-numpy",
        "--json",
    ]);
    let j = ok_json(&o);
    if j["device"] == "cpu" {
        assert!(
            j["device_fallback"].as_str().is_some_and(|s| !s.is_empty()),
            "{j}"
        );
        assert!(j["f32"]["encode_gbps"].as_f64().unwrap() > 0.0);
    } else {
        assert_eq!(j["cpu_parity"], true, "{j}");
        assert!(j["encode_vs_copy"].as_f64().unwrap() > 0.0);
    }
}
