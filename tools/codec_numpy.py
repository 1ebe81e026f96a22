#!/usr/bin/env python3
"""numpy implementation of shardrop's gradient codec (schemas/gradient.md), the baseline of
`shardrop bench codec`.

Same algorithm, vectorised the way a Python miner would write it: error feedback, top-k per
chunk (ties to the lower index, via unique 64-bit keys), bf16-ceil per-chunk scales, 2/4/8-bit
quantization, LSB-first bit packing, packed or Elias-Fano indices, and decode into a dense
accumulator. Full chunks only (n must be a multiple of the chunk size). Prints one JSON line
with timings; with --out it writes idx.bin / val.bin / scale.bin of the first encode so the
caller can compare bytes.
"""
import argparse
import json
import os
import time

import numpy as np


def levels(bits):
    m1 = np.float32((1 << bits) - 1)
    q = np.arange(1 << bits, dtype=np.float32)
    return ((np.float32(2) * q - m1) / m1).astype(np.float32)


def bits_lsb(values, width):
    """(rows, k) ints -> (rows, k*width) bits, LSB first."""
    shifts = np.arange(width, dtype=np.uint32)
    return ((values[..., None].astype(np.uint32) >> shifts) & 1).astype(np.uint8).reshape(values.shape[0], -1)


def pack(bitrows):
    return np.packbits(bitrows, axis=1, bitorder="little")


def from_bits(bitrows, width, k):
    b = bitrows[:, : k * width].reshape(bitrows.shape[0], k, width).astype(np.uint32)
    return (b << np.arange(width, dtype=np.uint32)).sum(axis=2, dtype=np.uint32)


def encode(x, state, beta, chunk, k, bits, compact):
    buf = (np.float32(beta) * state + x).reshape(-1, chunk)
    rows = buf.shape[0]
    mag = buf.view(np.uint32) & np.uint32(0x7FFFFFFF)
    local = np.arange(chunk, dtype=np.uint64)
    key = (mag.astype(np.uint64) << np.uint64(32)) | (np.uint64(chunk - 1) - local)
    idx = np.sort(np.argpartition(key, chunk - k, axis=1)[:, chunk - k:], axis=1)
    v = np.take_along_axis(buf, idx, axis=1)
    mx = mag.max(axis=1)
    hi = (mx >> np.uint32(16)) + ((mx & np.uint32(0xFFFF)) != 0).astype(np.uint32)
    scale_bits = hi.astype(np.uint16)
    s = (hi << np.uint32(16)).view(np.float32)[:, None]
    m = (1 << bits) - 1
    h = np.float32(m * 0.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.floor((v / s + np.float32(1)) * h + np.float32(0.5))
    q = np.where(s == 0, 0, np.clip(q, 0, m)).astype(np.uint32)
    deq = s * levels(bits)[q]
    np.put_along_axis(buf, idx, v - deq, axis=1)
    val = pack(bits_lsb(q, bits))
    if compact:
        low = int(np.log2(chunk // k))
        high_len = k + ((chunk - 1) >> low) + 1
        lowbits = bits_lsb(idx & ((1 << low) - 1), low) if low else np.zeros((rows, 0), np.uint8)
        high = np.zeros((rows, high_len), np.uint8)
        np.put_along_axis(high, (idx >> low) + np.arange(k), 1, axis=1)
        ib = np.concatenate([lowbits, high], axis=1)
    else:
        ib = bits_lsb(idx, int(np.log2(chunk)))
    return buf.reshape(-1), pack(ib), val, scale_bits


def decode(idx_bytes, val_bytes, scale_bits, dense, weight, chunk, k, bits, compact):
    rows = scale_bits.shape[0]
    ib = np.unpackbits(idx_bytes, axis=1, bitorder="little")
    if compact:
        low = int(np.log2(chunk // k))
        high_len = k + ((chunk - 1) >> low) + 1
        high = ib[:, k * low: k * low + high_len]
        pos = np.nonzero(high)[1].reshape(rows, k).astype(np.uint32)
        idx = ((pos - np.arange(k, dtype=np.uint32)) << low) | (from_bits(ib, low, k) if low else 0)
    else:
        idx = from_bits(ib, int(np.log2(chunk)), k)
    q = from_bits(np.unpackbits(val_bytes, axis=1, bitorder="little"), bits, k)
    s = (scale_bits.astype(np.uint32) << np.uint32(16)).view(np.float32)[:, None]
    vals = s * levels(bits)[q]
    d = dense.reshape(rows, chunk)
    cur = np.take_along_axis(d, idx.astype(np.int64), axis=1)
    np.put_along_axis(d, idx.astype(np.int64), cur + np.float32(weight) * vals, axis=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--bits", type=int, default=2, choices=[2, 4, 8])
    ap.add_argument("--indices", default="compact", choices=["compact", "packed"])
    ap.add_argument("--beta", type=float, default=0.9)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out")
    a = ap.parse_args()
    assert a.n % a.chunk == 0, "full chunks only"
    x = np.fromfile(a.input, dtype="<f4", count=a.n)
    compact = a.indices == "compact"
    enc, dec = [], []
    for rep in range(a.reps):
        state = np.zeros(a.n, np.float32)
        t = time.perf_counter()
        state, ib, vb, sb = encode(x, state, a.beta, a.chunk, a.k, a.bits, compact)
        enc.append(time.perf_counter() - t)
        if rep == 0 and a.out:
            os.makedirs(a.out, exist_ok=True)
            ib.tofile(os.path.join(a.out, "idx.bin"))
            vb.tofile(os.path.join(a.out, "val.bin"))
            sb.astype("<u2").tofile(os.path.join(a.out, "scale.bin"))
            state.tofile(os.path.join(a.out, "state.bin"))
        dense = np.zeros(a.n, np.float32)
        t = time.perf_counter()
        decode(ib, vb, sb, dense, 1.0, a.chunk, a.k, a.bits, compact)
        dec.append(time.perf_counter() - t)
        if rep == 0 and a.out:
            dense.tofile(os.path.join(a.out, "dense.bin"))
    print(json.dumps({"encode_s": min(enc), "decode_s": min(dec), "numpy": np.__version__}))


if __name__ == "__main__":
    main()
