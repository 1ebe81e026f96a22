//! The GPU codec kernels (`pipeline/src/format/codec/gpu/kernels.cu`), executed on the CPU by a
//! thread emulator (`tests/gpu_emu/`), against the CPU reference codec: same body bytes,
//! same error-feedback buffer, same dense accumulation, same verdict on bad input.
//!
//! This runs everywhere (no GPU, no CUDA toolkit: the kernel file is compiled as C++ with
//! g++). It checks the kernels' logic — top-k ties, short last chunks, radix select, bit
//! packing, the order of roundings — with the launch sequence of `codec::gpu`. What it
//! cannot check (NVRTC's code generation, real warps) the `gpu_parity` test checks on a GPU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use shardrop::format::codec::{
    ChunkLayout, CodecParams, EncodedTensor, InDtype, IndexEncoding, ScaleMode, TensorInput,
    accumulate, encode_tensor,
};

use crate::codec_cases::{Data, damaged, decode_sets, encode_cases, to_bytes, values};

fn harness() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gpu-emu-harness");
        let status = Command::new(std::env::var("CXX").unwrap_or_else(|_| "c++".into()))
            .args([
                "-std=c++20",
                "-O1",
                "-pthread",
                "-ffp-contract=off",
                "-Wall",
                "-Werror",
            ])
            .arg("-I")
            .arg(root.join("src/format/codec/gpu"))
            .arg(root.join("tests/gpu_emu/harness.cpp"))
            .arg("-o")
            .arg(&out)
            .status()
            .expect("a C++20 compiler (c++ or $CXX) builds the kernel emulator");
        assert!(status.success(), "compiling the emulated kernels failed");
        out
    })
}

fn run(mode: &str, job: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (jp, op) = (dir.path().join("job"), dir.path().join("out"));
    std::fs::write(&jp, job).unwrap();
    let st = Command::new(harness())
        .arg(mode)
        .arg(&jp)
        .arg(&op)
        .status()
        .unwrap();
    assert!(st.success(), "harness {mode} failed");
    std::fs::read(op).unwrap()
}

struct Out {
    fault: [u32; 2],
    idx: Vec<u8>,
    val: Vec<u8>,
    scales: Vec<u16>,
    state: Vec<f32>,
}

fn u32_at(b: &[u8], at: &mut usize) -> u32 {
    let v = u32::from_le_bytes(b[*at..*at + 4].try_into().unwrap());
    *at += 4;
    v
}

fn u64_at(b: &[u8], at: &mut usize) -> u64 {
    let v = u64::from_le_bytes(b[*at..*at + 8].try_into().unwrap());
    *at += 8;
    v
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn vbits(p: &CodecParams) -> u32 {
    p.values.bits()
}

/// The kernels' encode, through the harness.
fn emu_encode(input: &TensorInput, state: &[f32], beta: f32, p: &CodecParams, block: u32) -> Out {
    let n: u64 = input.shape.iter().product();
    let lay = ChunkLayout::new(n, p);
    let mut job = Vec::new();
    let dt = match input.dtype {
        InDtype::F32 => 0u32,
        InDtype::Bf16 => 1,
        InDtype::F16 => 2,
    };
    job.extend(dt.to_le_bytes());
    job.extend(n.to_le_bytes());
    for v in [
        p.chunk,
        p.k,
        vbits(p),
        u32::from(p.scales == ScaleMode::Tensor),
        u32::from(p.indices == IndexEncoding::Compact),
    ] {
        job.extend(v.to_le_bytes());
    }
    job.extend(beta.to_le_bytes());
    for v in [
        block,
        lay.idx_full as u32,
        lay.idx_last as u32,
        lay.val_full as u32,
        lay.val_last as u32,
        lay.n_scales as u32,
    ] {
        job.extend(v.to_le_bytes());
    }
    job.extend_from_slice(input.data);
    job.extend(state.iter().flat_map(|x| x.to_le_bytes()));
    let b = run("encode", &job);
    let mut at = 0;
    let fault = [u32_at(&b, &mut at), u32_at(&b, &mut at)];
    let il = u64_at(&b, &mut at) as usize;
    let idx = b[at..at + il].to_vec();
    at += il;
    let vl = u64_at(&b, &mut at) as usize;
    let val = b[at..at + vl].to_vec();
    at += vl;
    let scales = b[at..at + 2 * lay.n_scales]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    at += 2 * lay.n_scales;
    Out {
        fault,
        idx,
        val,
        scales,
        state: f32s(&b[at..]),
    }
}

/// The kernels' decode + weighted scatter into `dense`; returns (fault, dense after).
fn emu_accumulate(t: &EncodedTensor, dense: &[f32], weight: f32, block: u32) -> (u32, Vec<f32>) {
    let p = t.params;
    let lay = ChunkLayout::new(t.numel(), &p);
    let mut job = Vec::new();
    job.extend(t.numel().to_le_bytes());
    for v in [
        p.chunk,
        p.k,
        vbits(&p),
        u32::from(p.scales == ScaleMode::Tensor),
        u32::from(p.indices == IndexEncoding::Compact),
    ] {
        job.extend(v.to_le_bytes());
    }
    job.extend(weight.to_le_bytes());
    for v in [block, lay.idx_full as u32, lay.val_full as u32] {
        job.extend(v.to_le_bytes());
    }
    job.extend((t.idx.len() as u64).to_le_bytes());
    job.extend((t.val.len() as u64).to_le_bytes());
    job.extend((t.scales.len() as u32).to_le_bytes());
    job.extend_from_slice(&t.idx);
    job.extend_from_slice(&t.val);
    job.extend(t.scales.iter().flat_map(|s| s.to_le_bytes()));
    job.extend(dense.iter().flat_map(|x| x.to_le_bytes()));
    let b = run("decode", &job);
    (
        u32::from_le_bytes(b[0..4].try_into().unwrap()),
        f32s(&b[4..]),
    )
}

const NO_FAULT: u32 = u32::MAX;

/// Encodes two windows (error feedback carried) on both sides and compares every byte.
fn check_encode(name: &str, n: usize, dtype: InDtype, p: CodecParams, data: Data, block: u32) {
    let mut rng = ChaCha8Rng::seed_from_u64(n as u64 * 31 + p.k as u64);
    let mut cpu_state = vec![0f32; n];
    let shape = [n as u64];
    for step in 0..2 {
        let bytes = to_bytes(&values(data, n, &mut rng), dtype);
        let input = TensorInput {
            name,
            shape: &shape,
            dtype,
            data: &bytes,
        };
        let emu = emu_encode(&input, &cpu_state, 0.9, &p, block);
        let cpu = encode_tensor(&input, &mut cpu_state, 0.9, &p);
        match cpu {
            Err(e) => {
                assert_eq!(e.reason(), "non_finite", "{name}: {e}");
                assert!(
                    emu.fault != [NO_FAULT, NO_FAULT],
                    "{name} step {step}: the CPU refused ({e}), the kernels did not"
                );
                return;
            }
            Ok(t) => {
                assert_eq!(emu.fault, [NO_FAULT, NO_FAULT], "{name} step {step}");
                assert_eq!(emu.idx, t.idx, "{name} step {step}: index bytes");
                assert_eq!(emu.val, t.val, "{name} step {step}: value bytes");
                assert_eq!(emu.scales, t.scales, "{name} step {step}: scales");
                let same = emu
                    .state
                    .iter()
                    .zip(&cpu_state)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(
                    same, None,
                    "{name} step {step}: error-feedback buffer differs"
                );
            }
        }
    }
}

#[test]
fn encode_matches_the_cpu_codec() {
    for (name, n, dtype, p, data, block) in encode_cases() {
        check_encode(name, n, dtype, p, data, block);
    }
}

#[test]
fn decode_and_accumulate_match_and_refuse_what_the_cpu_refuses() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (s, p) in decode_sets().iter().enumerate() {
        let n = if p.chunk == 4096 { 9000 } else { 1000 };
        let v = values(Data::Random, n, &mut rng);
        let bytes = to_bytes(&v, InDtype::F32);
        let shape = [n as u64];
        let mut state = vec![0f32; n];
        let input = TensorInput {
            name: "t",
            shape: &shape,
            dtype: InDtype::F32,
            data: &bytes,
        };
        let t = encode_tensor(&input, &mut state, 0.9, p).unwrap();
        let dense0: Vec<f32> = values(Data::Random, n, &mut rng);
        let check = |t: &EncodedTensor, what: &str| {
            let mut cpu = dense0.clone();
            let verdict = accumulate(t, &mut cpu, 0.37);
            let (fault, emu) = emu_accumulate(t, &dense0, 0.37, 64);
            match verdict {
                Ok(()) => {
                    assert_eq!(fault, NO_FAULT, "set {s} {what}");
                    let diff = emu
                        .iter()
                        .zip(&cpu)
                        .position(|(a, b)| a.to_bits() != b.to_bits());
                    assert_eq!(diff, None, "set {s} {what}: dense differs");
                }
                Err(e) => {
                    assert_ne!(
                        fault, NO_FAULT,
                        "set {s} {what}: CPU refused ({e}), kernels did not"
                    );
                    assert!(
                        emu.iter()
                            .zip(&dense0)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "set {s} {what}: a refused tensor touched the accumulator"
                    );
                }
            }
        };
        check(&t, "as encoded");
        // Damaged index and value blocks: whatever the CPU says, the kernels say.
        let mut refused = 0;
        for trial in 0..12 {
            let bad = damaged(&t, trial, &mut rng);
            refused += usize::from(accumulate(&bad, &mut dense0.clone(), 1.0).is_err());
            check(&bad, &format!("damage {trial}"));
        }
        assert!(
            refused > 0,
            "set {s}: no damage was refused; the test checks nothing"
        );
    }
}
