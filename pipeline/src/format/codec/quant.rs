//! Value quantization, specified operation by operation (`schemas/gradient.md` §3) so that
//! every implementation — this one, the CUDA kernels, another language — gets the same bits.
//! Each arithmetic step is one IEEE-754 binary32 operation with round-to-nearest-even; no
//! fused multiply-add.

#![warn(missing_docs)]

use serde::{Deserialize, Serialize};

/// How kept values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueFormat {
    /// bf16 values, no scale: 16 bits per kept value, for updates that must not be quantized further.
    Bf16,
    /// 8-bit codes against a scale (256 levels, none at zero).
    Int8,
    /// 4-bit codes against a scale.
    Int4,
    /// 2-bit codes against a scale: Templar's operating point.
    Int2,
}

impl ValueFormat {
    /// The inverse of [`ValueFormat::name`]; `None` for a string no reader accepts.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "bf16" => Some(ValueFormat::Bf16),
            "int8" => Some(ValueFormat::Int8),
            "int4" => Some(ValueFormat::Int4),
            "int2" => Some(ValueFormat::Int2),
            _ => None,
        }
    }

    /// The string in registries, codec headers and section metadata (signed: never from `Debug`).
    pub fn name(self) -> &'static str {
        match self {
            ValueFormat::Bf16 => "bf16",
            ValueFormat::Int8 => "int8",
            ValueFormat::Int4 => "int4",
            ValueFormat::Int2 => "int2",
        }
    }

    /// Bits per stored value.
    pub fn bits(self) -> u32 {
        match self {
            ValueFormat::Bf16 => 16,
            ValueFormat::Int8 => 8,
            ValueFormat::Int4 => 4,
            ValueFormat::Int2 => 2,
        }
    }

    /// Whether values carry a scale (the integer formats).
    pub fn scaled(self) -> bool {
        self != ValueFormat::Bf16
    }
}

/// bf16 bits from f32, round to nearest even (finite inputs).
#[inline]
pub fn f32_to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1));
    (rounded >> 16) as u16
}

/// Widens a bf16 bit pattern to f32, exactly.
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The smallest bf16 not below `m` (a finite, non-negative f32): a scale that never clips.
#[inline]
pub(crate) fn bf16_ceil(m: f32) -> u16 {
    let b = m.to_bits();
    let hi = (b >> 16) as u16;
    if b & 0xFFFF == 0 { hi } else { hi + 1 }
}

/// Level table of a `bits`-bit format: level q is (2q − (M−1)) / (M−1), M = 2^bits; the
/// levels are symmetric and exclude zero, since kept values are the chunk's largest.
pub fn levels(bits: u32) -> Vec<f32> {
    let m1 = ((1u32 << bits) - 1) as f32;
    (0..(1u32 << bits))
        .map(|q| (2.0 * q as f32 - m1) / m1)
        .collect()
}

/// Quantizes `v` against scale `s` (both f32, `s` ≥ |v|): q = clamp(floor((v/s + 1)·h + 0.5)),
/// h = (M−1)/2. A zero scale gives q = 0 (which decodes to zero).
#[inline]
pub fn quantize(v: f32, s: f32, bits: u32) -> u32 {
    if s == 0.0 {
        return 0;
    }
    let max = (1u32 << bits) - 1;
    let h = max as f32 * 0.5;
    let x = (v / s + 1.0) * h;
    // floor(x + 0.5) clamped to [0, max]: for non-negative values truncation is floor, and
    // the saturating cast sends negatives (and NaN) to 0, which the clamp would anyway.
    ((x + 0.5) as u32).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_and_ceil() {
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0)), 1.0);
        let x = f32::from_bits(0x3F80_8000); // exactly halfway: ties to even (down)
        assert_eq!(f32_to_bf16(x), 0x3F80);
        let y = f32::from_bits(0x3F81_8000); // halfway, odd: up
        assert_eq!(f32_to_bf16(y), 0x3F82);
        let z = f32::from_bits(0x3F80_0001);
        assert!(bf16_to_f32(bf16_ceil(z)) >= z);
        assert_eq!(bf16_ceil(2.0), f32_to_bf16(2.0));
    }

    #[test]
    fn quantize_hits_levels_and_clamps() {
        for bits in [2, 4, 8] {
            let l = levels(bits);
            for (q, &lv) in l.iter().enumerate() {
                assert_eq!(
                    quantize(lv * 3.0, 3.0, bits),
                    q as u32,
                    "bits {bits} level {q}"
                );
            }
            assert_eq!(quantize(10.0, 1.0, bits), (1 << bits) - 1);
            assert_eq!(quantize(-10.0, 1.0, bits), 0);
        }
        assert_eq!(levels(2), vec![-1.0, -1.0 / 3.0, 1.0 / 3.0, 1.0]);
    }
}
