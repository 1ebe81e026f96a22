#!/usr/bin/env python3
"""A complete DiLoCo miner on shardrop: inner AdamW steps on a small transformer LM, then the
pseudo-gradient (θ_start − θ_end) published from memory, the window's aggregate applied in
place with the run's outer optimizer, and again. Every miner of the run ends each window
with bit-identical parameters.

    python torch_miner.py --write-init model.safetensors       # the run's initial model
    python torch_miner.py --registry URL --key m1.key --init model.safetensors --rounds 5

See tools/python/examples/README.md for the whole setup with the CLI.
"""

from __future__ import annotations

import argparse
import hashlib
import logging

import torch
from safetensors.torch import load_file, save_file

import shardrop
from tinylm import batch, corpus, eval_loss, initial, loss, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-init", help="write the initial model to this file and exit")
    ap.add_argument("--registry")
    ap.add_argument("--key")
    ap.add_argument("--init", help="the run's initial model (safetensors)")
    ap.add_argument("--state", help="folder keeping the error-feedback state across restarts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model = initial()
    if a.write_init:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, a.write_init)
        return
    model.load_state_dict(load_file(a.init), strict=False)
    run = shardrop.Run.open(a.registry)
    miner = run.miner(a.key, state=a.state)
    theta = params(model)
    outer = shardrop.OptimizerState()
    data, gen = corpus(), torch.Generator().manual_seed(a.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    # Join at the next window; first replay every aggregate before it.
    w = run.window_now() + 1
    if w > 0:
        run.catch_up(theta, "genesis", w - 1, outer, wait=run.window_secs + run.grace_secs + 30)
    print(f"window {w}: joined, validation loss {eval_loss(model, data):.3f}")
    for _ in range(a.rounds):
        start = {n: t.clone() for n, t in theta.items()}
        for _ in range(a.inner_steps):
            opt.zero_grad()
            loss(model, *batch(data, gen)).backward()
            opt.step()
        with torch.no_grad():
            delta = {n: start[n] - t for n, t in theta.items()}
        try:
            rep = miner.publish(delta, window=w, wait=True)
        except shardrop.Refused as e:
            if e.reason != "window_closed":
                raise
            # Training outlasted the window: this round's work is lost, not the run. The
            # aggregate is applied without it and the next round starts from there.
            print(f"window {w}: closed before the update was ready; skipped", flush=True)
            rep = None
        with torch.no_grad():
            for n, t in theta.items():
                t.copy_(start[n])
        run.apply_(theta, w, outer, wait=run.window_secs + run.grace_secs + 30)
        digest = hashlib.sha256(b"".join(t.numpy().tobytes() for _, t in sorted(theta.items()))).hexdigest()[:16]
        sent = f"published {rep['bytes']} B ({rep['ratio']:.0f}x smaller)" if rep else "nothing published"
        print(f"window {w}: {sent}, applied; "
              f"parameters {digest} (the same on every miner), validation loss {eval_loss(model, data):.3f}", flush=True)
        w += 1


if __name__ == "__main__":
    main()
