"""Checkpoints pushed and pulled from Python, loaded back, with progress reported."""

from __future__ import annotations

import numpy as np
import pytest

import shardrop
from conftest import read_safetensors, write_safetensors


def test_push_pull_ls_round_trip(folder_run, tmp_path):
    r = folder_run
    src = tmp_path / "ckpt-src"
    src.mkdir()
    rng = np.random.default_rng(5)
    tensors = {
        "layers.0.mlp.weight": rng.standard_normal((64, 48)).astype(np.float32),
        "layers.0.mlp.bias": rng.standard_normal(48).astype(np.float32),
        "embed.weight": rng.standard_normal((100, 16)).astype(np.float32),
    }
    write_safetensors(src / "model.safetensors", tensors)
    pushed_bytes = []
    # Not the run's model: refused, nothing pushed; any_model pushes it anyway.
    with pytest.raises(shardrop.Refused) as e:
        shardrop.ckpt.push(r.registry, r.keys["agg"], src, step=7, window=3)
    assert e.value.reason == "model_mismatch" and "is not in the run's model" in str(e.value)
    assert shardrop.ckpt.ls(r.registry) == []
    p = shardrop.ckpt.push(r.registry, r.keys["agg"], src, step=7, window=3,
                           shard_size=8 << 10, progress=pushed_bytes.append, any_model=True)
    assert p["step"] == 7 and p["shards"] >= 2 and p["tensors"] == 3
    assert sum(pushed_bytes) > 0
    [info] = shardrop.ckpt.ls(r.registry)
    assert info["step"] == 7 and info["window"] == 3 and info["latest"] is True
    out = tmp_path / "pulled"
    pulled_bytes = []
    q = shardrop.ckpt.pull("latest", out, registry_url=r.registry, tensors=["layers.*"],
                           progress=pulled_bytes.append)
    assert q["tensors"] == 2 and q["window"] == 3
    assert sum(pulled_bytes) == q["fetched_bytes"] > 0
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(read_safetensors(f))
    assert set(got) == {"layers.0.mlp.weight", "layers.0.mlp.bias"}
    for k, v in got.items():
        assert v.tobytes() == tensors[k].tobytes(), k
