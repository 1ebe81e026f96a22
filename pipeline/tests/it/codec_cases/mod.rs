#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
//! Inputs shared by the GPU codec tests (emulated and on a device): random data, ties,
//! zeros, NaN, values that overflow bf16, f16 subnormals, short last chunks.
#![allow(dead_code)]

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use shardrop::format::codec::{
    CodecParams, EncodedTensor, InDtype, IndexEncoding, ScaleMode, ValueFormat, f32_to_bf16,
};

#[derive(Clone, Copy, Debug)]
pub enum Data {
    Random,
    /// Few distinct magnitudes: every selection ends in a tie.
    Ties,
    Zeros,
    /// A NaN in the second chunk.
    Nan,
    /// Values that round to infinity in bf16.
    Huge,
    /// f16 subnormals and signed zeros.
    Tiny,
}

pub fn values(data: Data, n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n)
        .map(|i| match data {
            Data::Random => {
                let v: f32 = rng.random_range(-1.0..1.0);
                if rng.random_range(0..64) == 0 {
                    v * 50.0
                } else {
                    v
                }
            }
            Data::Ties => [0.0, 1.0, -1.0, 0.5, -0.5, 2.0][rng.random_range(0..6)],
            Data::Zeros => 0.0,
            Data::Nan => {
                if i == n / 2 + 3 {
                    f32::NAN
                } else {
                    rng.random_range(-1.0..1.0)
                }
            }
            Data::Huge => {
                if i % 17 == 0 {
                    f32::MAX
                } else {
                    rng.random_range(-1.0..1.0)
                }
            }
            Data::Tiny => {
                let h = half::f16::from_bits(rng.random_range(0..0x0400) | (i as u16 & 1) << 15);
                h.to_f32()
            }
        })
        .collect()
}

pub fn to_bytes(v: &[f32], dtype: InDtype) -> Vec<u8> {
    match dtype {
        InDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        InDtype::Bf16 => v
            .iter()
            .flat_map(|&x| f32_to_bf16(x).to_le_bytes())
            .collect(),
        InDtype::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
    }
}

pub fn params(
    chunk: u32,
    k: u32,
    values: ValueFormat,
    scales: ScaleMode,
    idx: IndexEncoding,
) -> CodecParams {
    CodecParams {
        chunk,
        k,
        values,
        scales,
        indices: idx,
    }
}

/// (name, elements, input dtype, parameters, data, emulator block size).
pub fn encode_cases() -> Vec<(&'static str, usize, InDtype, CodecParams, Data, u32)> {
    use IndexEncoding::*;
    use ScaleMode::*;
    use ValueFormat::*;
    vec![
        (
            "default",
            3 * 4096 + 1000,
            InDtype::F32,
            CodecParams::default(),
            Data::Random,
            64,
        ),
        (
            "ties-int4",
            700,
            InDtype::F32,
            params(128, 20, Int4, Chunk, Compact),
            Data::Ties,
            64,
        ),
        (
            "ties-packed",
            700,
            InDtype::Bf16,
            params(128, 20, Int8, Tensor, Packed),
            Data::Ties,
            32,
        ),
        (
            "zeros",
            300,
            InDtype::F32,
            params(64, 5, Int2, Chunk, Compact),
            Data::Zeros,
            64,
        ),
        (
            "k-is-chunk",
            200,
            InDtype::F16,
            params(64, 64, Int8, Chunk, Compact),
            Data::Random,
            64,
        ),
        (
            "k-one",
            1000,
            InDtype::F32,
            params(256, 1, Int2, Tensor, Packed),
            Data::Random,
            256,
        ),
        (
            "bf16-values",
            2000,
            InDtype::Bf16,
            params(512, 37, Bf16, Chunk, Compact),
            Data::Random,
            64,
        ),
        (
            "f16-tiny",
            600,
            InDtype::F16,
            params(64, 9, Int4, Chunk, Packed),
            Data::Tiny,
            64,
        ),
        (
            "tiny-last-chunk",
            64 * 3 + 1,
            InDtype::F32,
            params(64, 8, Int2, Chunk, Compact),
            Data::Random,
            32,
        ),
        (
            "global-path",
            16384 + 5000,
            InDtype::Bf16,
            params(16384, 100, Int2, Chunk, Compact),
            Data::Random,
            128,
        ),
        (
            // 44 KB of index and value blocks per chunk: emit ORs into global staging.
            "big-blocks",
            16384 + 3000,
            InDtype::F32,
            params(16384, 16384, Int8, Chunk, Packed),
            Data::Ties,
            128,
        ),
        (
            "nan",
            1000,
            InDtype::F32,
            params(128, 8, Int2, Chunk, Compact),
            Data::Nan,
            64,
        ),
        (
            "huge-bf16-values",
            500,
            InDtype::F32,
            params(64, 8, Bf16, Chunk, Packed),
            Data::Huge,
            64,
        ),
    ]
}

/// Parameter sets for decode checks.
pub fn decode_sets() -> Vec<CodecParams> {
    use IndexEncoding::*;
    use ScaleMode::*;
    use ValueFormat::*;
    vec![
        params(128, 20, Int4, Chunk, Compact),
        params(128, 20, Int8, Tensor, Packed),
        params(64, 64, Int2, Chunk, Compact),
        params(256, 3, Bf16, Chunk, Compact),
        params(4096, 64, Int2, Chunk, Compact),
    ]
}

/// A copy of `t` with one bit flipped in its index or value blocks (every third trial a
/// value, made non-finite for bf16 values): whatever the CPU says of it, the kernels say.
pub fn damaged(t: &EncodedTensor, trial: usize, rng: &mut ChaCha8Rng) -> EncodedTensor {
    use ValueFormat::*;
    let p = t.params;
    let mut bad = t.clone();
    let (blk, at) = if trial % 3 == 2 && !bad.val.is_empty() {
        let at = rng.random_range(0..bad.val.len());
        (&mut bad.val, at)
    } else {
        let at = rng.random_range(0..bad.idx.len());
        (&mut bad.idx, at)
    };
    blk[at] ^= 1 << rng.random_range(0..8);
    if p.values == Bf16 && trial % 3 == 2 {
        // An exponent of all ones: a non-finite value.
        let pair = at & !1;
        bad.val[pair + 1] |= 0x7F;
        bad.val[pair] |= 0x80;
    }
    bad
}
