#!/usr/bin/env python3
"""A PyTorch validator on shardrop: every window it scores each miner's shard (the library's
checks, copy detection and agreement) and measures usefulness on its own copy of the model,
in process: the loss on a held-out batch before and after the miner's update at the step it
contributes. It publishes the Parquet score table and signed weights `shardrop validate`
would, and keeps its model at the run's parameters by applying each aggregate.

    python torch_validator.py --registry URL --key val.key --init model.safetensors --windows 5
"""

from __future__ import annotations

import argparse
import logging

import torch
from safetensors.torch import load_file

import shardrop
from tinylm import batch, corpus, initial, loss, params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--init", required=True, help="the run's initial model (safetensors)")
    ap.add_argument("--windows", type=int, default=5)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run = shardrop.Run.open(a.registry)
    val = run.validator(a.key)
    model = initial()
    model.load_state_dict(load_file(a.init), strict=False)
    model.eval()
    theta, outer, data = params(model), shardrop.OptimizerState(), corpus()
    have = {"through": None}

    def prepare(window: int) -> None:
        """Brings the model to θ_window: every aggregate before it, applied once."""
        if window > 0 and have["through"] != window - 1:
            start = "genesis" if have["through"] is None else have["through"]
            run.catch_up(theta, start, window - 1, outer, wait=run.window_secs + run.grace_secs + 30)
            have["through"] = window - 1

    @torch.no_grad()
    def evaluate(peer: str, update: dict, scale: float, window: int):
        x, y = batch(data, torch.Generator().manual_seed(window), 32, "val")
        before = loss(model, x, y).item()
        saved = {n: t.clone() for n, t in theta.items()}
        for n, t in theta.items():
            t.sub_(torch.from_numpy(update[n]), alpha=scale)
        after = loss(model, x, y).item()
        for n, t in theta.items():
            t.copy_(saved[n])
        return before, after

    w = run.window_now()
    for _ in range(a.windows):
        v = val.validate(w, evaluate=evaluate, prepare=prepare, name="torch-tinylm")
        for r in v["rows"]:
            use = "-" if r["usefulness"] is None else f"{r['usefulness']:+.4f}"
            print(f"window {w}: {r['peer'][:10]} {r['verdict']:9s} {r['reason'] or '':14s} usefulness {use} rating {r['rating']:.3f}")
        print(f"window {w}: table {v['scores']}", flush=True)
        w += 1


if __name__ == "__main__":
    main()
