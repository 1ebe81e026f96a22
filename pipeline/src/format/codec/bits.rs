//! Bit packing for one chunk: fixed-width fields (packed indices, quantized values) and the
//! Elias–Fano code for sorted indices. Streams are LSB-first: field j starts at bit
//! `j * width` of the chunk's byte block, bit 0 being the least significant bit of byte 0.
//! Every chunk starts on a byte boundary, so chunk blocks have computable offsets and are
//! coded independently (and in parallel).

#![warn(missing_docs)]

/// Writes LSB-first fields into a zeroed byte slice.
pub(super) struct BitWriter<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl<'a> BitWriter<'a> {
    pub(super) fn new(out: &'a mut [u8]) -> Self {
        out.fill(0);
        BitWriter { out, pos: 0 }
    }

    #[inline]
    pub(super) fn put(&mut self, value: u32, width: u32) {
        let mut v = value as u64;
        let mut left = width as usize;
        while left > 0 {
            let byte = self.pos / 8;
            let shift = self.pos % 8;
            let take = (8 - shift).min(left);
            self.out[byte] |= ((v & ((1 << take) - 1)) << shift) as u8;
            v >>= take;
            left -= take;
            self.pos += take;
        }
    }

    /// Sets the single bit at `bit` (absolute position within this block).
    #[inline]
    pub(super) fn set_bit(&mut self, bit: usize) {
        self.out[bit / 8] |= 1 << (bit % 8);
    }

    pub(super) fn pos(&self) -> usize {
        self.pos
    }
}

/// Reads a `width`-bit field (width ≤ 32) at bit offset `bit`. Callers guarantee the block
/// is long enough (sizes are validated before any field is read).
#[inline]
pub(super) fn get(block: &[u8], bit: usize, width: u32) -> u32 {
    if width == 0 {
        return 0;
    }
    let byte = bit / 8;
    let mut w = [0u8; 8];
    let avail = (block.len() - byte).min(8);
    w[..avail].copy_from_slice(&block[byte..byte + avail]);
    ((u64::from_le_bytes(w) >> (bit % 8)) & ((1u64 << width) - 1)) as u32
}

/// Elias–Fano parameters for `n` sorted values below `universe`: the low-bit width and
/// the length of the high-bit vector.
#[inline]
pub(super) fn ef_shape(n: u32, universe: u32) -> (u32, usize) {
    let low = if universe > n {
        (universe / n).ilog2()
    } else {
        0
    };
    let high = n as usize + (((universe - 1) >> low) as usize) + 1;
    (low, high)
}

/// Bytes of one chunk's index block.
#[inline]
pub(super) fn index_block_bytes(compact: bool, n: u32, universe: u32, chunk_log2: u32) -> usize {
    if n == 0 {
        return 0;
    }
    let bits = if compact {
        let (low, high) = ef_shape(n, universe);
        n as usize * low as usize + high
    } else {
        n as usize * chunk_log2 as usize
    };
    bits.div_ceil(8)
}

/// Writes sorted indices (strictly increasing, all < universe).
pub(super) fn write_indices(
    out: &mut [u8],
    idx: &[u32],
    compact: bool,
    universe: u32,
    chunk_log2: u32,
) {
    let mut w = BitWriter::new(out);
    if !compact {
        for &i in idx {
            w.put(i, chunk_log2);
        }
        return;
    }
    let n = idx.len() as u32;
    let (low, _) = ef_shape(n, universe);
    for &i in idx {
        w.put(i & ((1u32 << low) - 1), low);
    }
    let base = w.pos();
    for (j, &i) in idx.iter().enumerate() {
        w.set_bit(base + (i >> low) as usize + j);
    }
}

/// Why an index block is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IndexFault {
    OutOfRange(u32),
    NotIncreasing(u32),
    Malformed,
}

/// Decodes `out.len()` indices, checking range and strict order.
pub(super) fn read_indices(
    block: &[u8],
    out: &mut [u32],
    compact: bool,
    universe: u32,
    chunk_log2: u32,
) -> Result<(), IndexFault> {
    let n = out.len() as u32;
    if !compact {
        let mut prev: Option<u32> = None;
        for (j, o) in out.iter_mut().enumerate() {
            let v = get(block, j * chunk_log2 as usize, chunk_log2);
            check(v, prev, universe)?;
            prev = Some(v);
            *o = v;
        }
        return Ok(());
    }
    let (low, high_len) = ef_shape(n, universe);
    let base = n as usize * low as usize;
    let mut j = 0usize;
    let mut prev: Option<u32> = None;
    // Walk the high bit vector 32 bits at a time; each set bit is one element.
    let mut bit = 0usize;
    while bit < high_len {
        let take = (high_len - bit).min(32) as u32;
        let mut word = get(block, base + bit, take);
        while word != 0 {
            let t = word.trailing_zeros() as usize;
            word &= word - 1;
            if j >= out.len() {
                return Err(IndexFault::Malformed);
            }
            let high = (bit + t - j) as u32;
            let v = (high << low) | get(block, j * low as usize, low);
            check(v, prev, universe)?;
            prev = Some(v);
            out[j] = v;
            j += 1;
        }
        bit += take as usize;
    }
    if j != out.len() {
        return Err(IndexFault::Malformed);
    }
    Ok(())
}

#[inline]
fn check(v: u32, prev: Option<u32>, universe: u32) -> Result<(), IndexFault> {
    if v >= universe {
        return Err(IndexFault::OutOfRange(v));
    }
    if prev.is_some_and(|p| v <= p) {
        return Err(IndexFault::NotIncreasing(v));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ef_roundtrip_and_size() {
        let idx: Vec<u32> = (0..64).map(|i| i * 64 + (i % 7)).collect();
        let bytes = index_block_bytes(true, 64, 4096, 12);
        assert_eq!(
            bytes, 64,
            "k=64 of C=4096: 6 low + 2 high bits = 8 bits per index"
        );
        let mut block = vec![0u8; bytes];
        write_indices(&mut block, &idx, true, 4096, 12);
        let mut out = vec![0u32; 64];
        read_indices(&block, &mut out, true, 4096, 12).unwrap();
        assert_eq!(out, idx);
        let mut packed = vec![0u8; index_block_bytes(false, 64, 4096, 12)];
        write_indices(&mut packed, &idx, false, 4096, 12);
        read_indices(&packed, &mut out, false, 4096, 12).unwrap();
        assert_eq!(out, idx);
    }

    #[test]
    fn edge_shapes() {
        for (n, u) in [
            (1u32, 1u32),
            (1, 64),
            (64, 64),
            (3, 5),
            (7, 100),
            (100, 65536),
        ] {
            let idx: Vec<u32> = (0..n)
                .map(|i| (i as u64 * u as u64 / n as u64) as u32)
                .collect();
            let mut block = vec![0u8; index_block_bytes(true, n, u, 16)];
            write_indices(&mut block, &idx, true, u, 16);
            let mut out = vec![0u32; n as usize];
            read_indices(&block, &mut out, true, u, 16).unwrap();
            assert_eq!(out, idx, "n={n} u={u}");
        }
    }

    #[test]
    fn faults_are_detected() {
        let mut block = vec![0u8; index_block_bytes(false, 3, 64, 6)];
        write_indices(&mut block, &[5, 5, 9], false, 64, 6);
        let mut out = vec![0u32; 3];
        assert_eq!(
            read_indices(&block, &mut out, false, 64, 6),
            Err(IndexFault::NotIncreasing(5))
        );
        // A short last chunk: index 40 is out of range for a chunk of 40 elements.
        write_indices(&mut block, &[1, 2, 40], false, 64, 6);
        assert_eq!(
            read_indices(&block, &mut out, false, 40, 6),
            Err(IndexFault::OutOfRange(40))
        );
        // Elias–Fano with too few set high bits.
        let mut block = vec![0u8; index_block_bytes(true, 3, 64, 6)];
        assert_eq!(
            read_indices(&block, &mut out, true, 64, 6),
            Err(IndexFault::Malformed)
        );
        block.fill(0xff);
        assert!(read_indices(&block, &mut out, true, 64, 6).is_err());
    }
}
