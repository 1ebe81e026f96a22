"""Checkpoints pushed and pulled from Python, loaded back, with progress reported."""

from __future__ import annotations

import json

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


def test_momentum_lives_in_its_own_files_that_optimizer_state_reads(folder_run, tmp_path):
    """A checkpoint's outer momentum never sits in the model's shards: a strict loader sees
    only the model; OptimizerState.load(folder) reads the buffers; without_momentum=True
    leaves them out."""
    r = folder_run
    src = tmp_path / "with-momentum"
    src.mkdir()
    rng = np.random.default_rng(9)
    model = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in r.theta0.items()}
    momentum = {
        "outer_momentum." + k: rng.standard_normal(v.shape).astype(np.float32)
        for k, v in r.theta0.items()
    }
    # Momentum that is not f32 would be refused by every peer that replays from it.
    half = tmp_path / "half-momentum"
    half.mkdir()
    write_safetensors(half / "model.safetensors",
                      {**model, **{k: v.astype(np.float16) for k, v in momentum.items()}})
    with pytest.raises(shardrop.Refused) as e:
        shardrop.ckpt.push(r.registry, r.keys["agg"], half, step=10, window=4)
    assert e.value.reason == "model_mismatch" and "not F32" in str(e.value)
    write_safetensors(src / "model.safetensors", {**model, **momentum})
    shardrop.ckpt.push(r.registry, r.keys["agg"], src, step=11, window=4)
    out = tmp_path / "pulled"
    shardrop.ckpt.pull("latest", out, registry_url=r.registry)
    names = sorted(f.name for f in out.glob("*.safetensors"))
    assert names == ["00000.safetensors", "momentum-00000.safetensors"], names
    # The model's shard holds exactly the model (what load_state_dict(strict=True) needs) and
    # the HF index lists only it.
    got = read_safetensors(out / "00000.safetensors")
    assert set(got) == set(model)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model)
    state = shardrop.OptimizerState.load(out)
    assert state.run is not None and state.run in r.registry and state.after == 4
    # Reprs read as Python, not Rust.
    assert repr(state) == f"OptimizerState(run='{state.run}', after=4, buffers={len(model)})"
    assert repr(shardrop.OptimizerState()) == "OptimizerState(run=None, after=None, buffers=0)"
    assert sorted(state.names) == sorted(model)
    # What it read is the pushed buffers: saved back, they are the same bytes.
    state.save(tmp_path / "outer.safetensors")
    saved = read_safetensors(tmp_path / "outer.safetensors")
    assert {k: v.tobytes() for k, v in saved.items()} == {k: v.tobytes() for k, v in momentum.items()}
    # A momentum file that is not the one the local manifest lists (another checkpoint's,
    # left by a half-finished pull over this one) is refused, never used.
    kept = (out / "momentum-00000.safetensors").read_bytes()
    write_safetensors(out / "momentum-00000.safetensors", {k: v + 1 for k, v in momentum.items()})
    with pytest.raises(shardrop.Rejected) as e:
        shardrop.OptimizerState.load(out)
    assert e.value.reason == "optimizer_state_invalid" and "pull the checkpoint again" in str(e.value)
    (out / "momentum-00000.safetensors").write_bytes(kept)
    # A post-training pull leaves the momentum out (no momentum file is fetched).
    lean = tmp_path / "lean"
    q = shardrop.ckpt.pull("latest", lean, registry_url=r.registry, without_momentum=True)
    assert sorted(f.name for f in lean.glob("*.safetensors")) == ["00000.safetensors"]
    assert q["tensors"] == len(model)
    empty = shardrop.OptimizerState.load(lean)
    assert empty.names == [] and empty.after == 4
    # A state file is not a folder, and a folder no pull wrote is named as such.
    with pytest.raises(shardrop.Rejected) as e:
        shardrop.OptimizerState.load(src)
    assert e.value.reason == "optimizer_state_invalid" and "shardrop ckpt pull" in str(e.value)
