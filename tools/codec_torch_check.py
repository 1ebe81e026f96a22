#!/usr/bin/env python3
"""Checks the PyTorch baseline (codec_torch.py, exact-tie variant) against the numpy
implementation (codec_numpy.py, which `shardrop bench codec` checks against shardrop) on the
same data: index, value and scale bytes and the updated error-feedback buffer must be equal,
for f32 and bf16 inputs and several codec settings. Runs on the CPU by default, so the
baseline can be checked before a GPU machine is at hand:

    python3 tools/codec_torch_check.py [--device cpu|cuda:0]

Needs torch and numpy. Exits 1 on any difference.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import codec_torch as ct  # noqa: E402

CASES = [(4096, 64, 2, "compact"), (4096, 64, 8, "packed"), (1024, 32, 4, "compact"), (256, 256, 2, "packed")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunks", type=int, default=257)
    a = ap.parse_args()
    dev = torch.device(a.device)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("f32", "bf16"):
            for chunk, k, bits, indices in CASES:
                n = chunk * a.chunks
                x = ct.bench_data(n, dtype, 1, dev)
                state = torch.zeros(n, dtype=torch.float32, device=dev)
                ib, vb, sb = ct.encode(x, state, 0.9, chunk, k, bits, indices == "compact", True, ct.levels(bits, dev))
                d = os.path.join(tmp, f"{dtype}-{chunk}-{k}-{bits}-{indices}")
                os.makedirs(d)
                x.to(torch.float32).cpu().numpy().astype("<f4").tofile(os.path.join(d, "in.bin"))
                subprocess.run(
                    [sys.executable, os.path.join(HERE, "codec_numpy.py"), "--input", os.path.join(d, "in.bin"),
                     "--n", str(n), "--chunk", str(chunk), "--k", str(k), "--bits", str(bits),
                     "--indices", indices, "--beta", "0.9", "--out", d],
                    check=True, capture_output=True)

                def same(name, ours):
                    with open(os.path.join(d, name), "rb") as f:
                        return f.read() == ours

                checks = {
                    "idx": same("idx.bin", ib.numpy().tobytes()),
                    "val": same("val.bin", vb.numpy().tobytes()),
                    "scale": same("scale.bin", sb.numpy().astype("<u2").tobytes()),
                    "state": same("state.bin", state.cpu().numpy().astype("<f4").tobytes()),
                }
                ok = all(checks.values())
                failed += not ok
                print(f"{'ok  ' if ok else 'DIFF'} {dtype} C={chunk} k={k} int{bits} {indices}: {checks}")
    print(f"{len(CASES) * 2 - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
