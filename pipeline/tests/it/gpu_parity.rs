//! The GPU codec (feature `cuda`) against the CPU reference, on a real device: same body
//! bytes, same error-feedback buffer, same accumulation, same refusals.
//!
//! Without a GPU these tests say so and pass, except where `SHARDROP_GPU_REQUIRED=1` (set it
//! on a GPU machine so that a broken driver set-up fails instead of skipping). The kernel
//! source is also compiled by NVRTC wherever libnvrtc loads (`SHARDROP_NVRTC_REQUIRED=1`
//! makes its absence a failure: `tools/test` installs it from PyPI).
#![cfg(feature = "cuda")]

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use shardrop::format::codec::gpu::{
    DeviceTensor, Gpu, GpuError, compile, compile_cubin, driver_present, nvrtc_present,
};
use shardrop::format::codec::{
    CodecParams, EfState, EncodeOptions, InDtype, TensorInput, accumulate, encode_tensor,
    encode_update,
};

use crate::codec_cases;
use crate::codec_cases::{Data, damaged, decode_sets, encode_cases, to_bytes, values};

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => {
            eprintln!("GPU: {}", g.describe());
            Some(g)
        }
        Err(e) if required("SHARDROP_GPU_REQUIRED") => panic!("SHARDROP_GPU_REQUIRED=1: {e}"),
        Err(e) => {
            eprintln!("skipped: no usable GPU ({e})");
            None
        }
    }
}

#[test]
fn kernels_compile_with_nvrtc() {
    if !nvrtc_present() {
        assert!(
            !required("SHARDROP_NVRTC_REQUIRED"),
            "SHARDROP_NVRTC_REQUIRED=1 but libnvrtc does not load (LD_LIBRARY_PATH?)"
        );
        eprintln!("skipped: no libnvrtc here");
        return;
    }
    for arch in ["compute_80", "compute_90"] {
        let ptx = compile(arch)
            .unwrap_or_else(|e| panic!("{arch}: {e}"))
            .to_src();
        for f in ["ef_select", "emit", "decode", "scatter_add", "fill_bench"] {
            assert!(
                ptx.contains(&format!(".entry {f}(")),
                "{arch}: no kernel {f}"
            );
        }
        // Bit parity with the CPU needs every multiply and add rounded on its own.
        let fused = ptx
            .lines()
            .filter(|l| l.trim_start().starts_with("fma."))
            .count();
        assert_eq!(fused, 0, "{arch}: {fused} fused multiply-adds in the PTX");
    }
    // Machine code for a real architecture, which `Gpu::open` loads first.
    for arch in ["sm_80", "sm_90"] {
        let cubin = compile_cubin(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{arch}: not an ELF cubin");
        for f in ["ef_select", "emit", "decode", "scatter_add", "fill_bench"] {
            assert!(
                cubin
                    .windows(f.len() + 1)
                    .any(|w| w[..f.len()] == *f.as_bytes() && w[f.len()] == 0),
                "{arch}: no kernel {f} in the cubin"
            );
        }
    }
    // A broken option or architecture is an error naming it, not a panic.
    match compile_cubin("sm_1") {
        Err(GpuError::Compile(msg)) => assert!(msg.contains("sm_1"), "{msg}"),
        other => panic!("sm_1 compiled: {:?}", other.map(|c| c.len())),
    }
}

#[test]
fn no_driver_is_an_error_not_a_panic() {
    if driver_present() {
        eprintln!("skipped: a CUDA driver is present here");
        return;
    }
    assert!(matches!(Gpu::open(0), Err(GpuError::NoDriver)));
}

fn encode_on(gpu: &Gpu, name: &str, n: usize, dtype: InDtype, p: CodecParams, data: Data) {
    let s = gpu.stream();
    let mut rng = ChaCha8Rng::seed_from_u64(n as u64 * 31 + p.k as u64);
    let mut cpu_state = vec![0f32; n];
    let mut dev_state = s.clone_htod(&cpu_state).unwrap();
    let shape = [n as u64];
    for step in 0..3 {
        let bytes = to_bytes(&values(data, n, &mut rng), dtype);
        let dev_in = s.clone_htod(&bytes).unwrap();
        let dev = gpu.encode_tensor(
            &DeviceTensor {
                name,
                shape: &shape,
                dtype,
                data: dev_in.as_view(),
            },
            &mut dev_state,
            0.9,
            &p,
        );
        let input = TensorInput {
            name,
            shape: &shape,
            dtype,
            data: &bytes,
        };
        match (encode_tensor(&input, &mut cpu_state, 0.9, &p), dev) {
            (Err(c), Err(GpuError::Codec(g))) => {
                assert_eq!(c, g, "{name}: both refuse, with the same error");
                return;
            }
            (Ok(c), Ok(g)) => {
                assert_eq!(c, g, "{name} step {step}: body differs");
                let st = s.clone_dtoh(&dev_state).unwrap();
                let diff = st
                    .iter()
                    .zip(&cpu_state)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(diff, None, "{name} step {step}: error feedback differs");
            }
            (c, g) => panic!("{name} step {step}: CPU {:?}, GPU {:?}", c.err(), g.err()),
        }
    }
}

#[test]
fn encode_matches_the_cpu_codec_on_the_device() {
    let Some(gpu) = gpu() else { return };
    for (name, n, dtype, p, data, _) in encode_cases() {
        encode_on(&gpu, name, n, dtype, p, data);
    }
    // Sizes where many blocks run at once.
    let big = CodecParams::default();
    encode_on(
        &gpu,
        "big-f32",
        (1 << 24) + 123,
        InDtype::F32,
        big,
        Data::Random,
    );
    encode_on(
        &gpu,
        "big-bf16-ties",
        1 << 23,
        InDtype::Bf16,
        big,
        Data::Ties,
    );
    let wide = codec_cases::params(
        65536,
        1000,
        shardrop::format::codec::ValueFormat::Int4,
        shardrop::format::codec::ScaleMode::Tensor,
        shardrop::format::codec::IndexEncoding::Packed,
    );
    encode_on(
        &gpu,
        "chunk-65536",
        (1 << 20) + 7,
        InDtype::F16,
        wide,
        Data::Random,
    );
}

#[test]
fn accumulate_matches_and_refuses_like_the_cpu_on_the_device() {
    let Some(gpu) = gpu() else { return };
    let s = gpu.stream();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (i, p) in decode_sets().iter().enumerate() {
        let n = 50_000;
        let bytes = to_bytes(&values(Data::Random, n, &mut rng), InDtype::F32);
        let shape = [n as u64];
        let input = TensorInput {
            name: "t",
            shape: &shape,
            dtype: InDtype::F32,
            data: &bytes,
        };
        let t = encode_tensor(&input, &mut vec![0f32; n], 0.9, p).unwrap();
        let dense0 = values(Data::Random, n, &mut rng);
        for trial in 0..13 {
            let t = if trial == 12 {
                t.clone()
            } else {
                damaged(&t, trial, &mut rng)
            };
            let mut cpu = dense0.clone();
            let verdict = accumulate(&t, &mut cpu, 0.37);
            let mut dev = s.clone_htod(&dense0).unwrap();
            let got = gpu.accumulate(&t, &mut dev, 0.37);
            let dev = s.clone_dtoh(&dev).unwrap();
            match (verdict, got) {
                (Ok(()), Ok(())) => {
                    let diff = dev
                        .iter()
                        .zip(&cpu)
                        .position(|(a, b)| a.to_bits() != b.to_bits());
                    assert_eq!(diff, None, "set {i} trial {trial}: dense differs");
                }
                (Err(c), Err(GpuError::Codec(g))) => {
                    assert_eq!(c.reason(), g.reason(), "set {i} trial {trial}");
                    assert!(
                        dev.iter()
                            .zip(&dense0)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "set {i} trial {trial}: a refused tensor touched the accumulator"
                    );
                }
                (c, g) => panic!("set {i} trial {trial}: CPU {c:?}, GPU {:?}", g.err()),
            }
        }
    }
}

#[test]
fn whole_update_sections_match() {
    let Some(gpu) = gpu() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let a = to_bytes(&values(Data::Random, 300_000, &mut rng), InDtype::F32);
    let b = to_bytes(&values(Data::Random, 70_001, &mut rng), InDtype::Bf16);
    let views = vec![
        (
            "a",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![300, 1000], &a)
                .unwrap(),
        ),
        (
            "b",
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![70_001], &b)
                .unwrap(),
        ),
    ];
    let file = safetensors::serialize(views, None).unwrap();
    let opts = EncodeOptions {
        section_bytes: 4096,
        ..Default::default()
    };
    let (mut cs, mut gs) = (EfState::default(), EfState::default());
    for _ in 0..2 {
        let c = encode_update(&file, &mut cs, &opts).unwrap();
        let g = gpu.encode_update(&file, &mut gs, &opts).unwrap();
        assert_eq!(c.sections, g.sections);
        assert_eq!(c.stats, g.stats);
        assert_eq!(cs, gs);
    }
}
