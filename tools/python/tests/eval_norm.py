"""A deterministic usefulness measure, used two ways by test_validate: as `shardrop validate
--eval-cmd` (reading the decoded update the CLI writes) and in process on the updates
`Validator.shards` yields. Same update, same floats."""

from __future__ import annotations

import argparse
import json

import numpy as np


def losses(update: dict, scale: float) -> tuple[float, float]:
    """(loss_before, loss_after) of a made-up model whose loss falls with the update's norm.
    The scale is an f32 (the aggregate's step): the command receives its shortest decimal
    form, the in-process validator its exact value; both round to the same f32 here."""
    scale = float(np.float32(scale))
    norm = sum(float(np.square(update[k], dtype=np.float64).sum()) for k in sorted(update))
    return 2.0, 2.0 - scale * norm


if __name__ == "__main__":
    from safetensors.numpy import load_file

    p = argparse.ArgumentParser()
    for a in ("--update", "--window", "--peer", "--run", "--scale"):
        p.add_argument(a)
    args = p.parse_args()
    before, after = losses(load_file(args.update), float(args.scale))
    print(json.dumps({"loss_before": before, "loss_after": after}))
