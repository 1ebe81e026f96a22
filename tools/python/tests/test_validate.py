"""The validator in process: the same score table as `shardrop validate`, and usefulness
measured by a Python callable on decoded updates."""

from __future__ import annotations

import numpy as np
import pytest

import shardrop
from conftest import SHAPES, cli, update


def test_validator_tables_match_the_cli_and_python_measures_usefulness(folder_run):
    r = folder_run
    run = shardrop.Run.open(r.registry)
    m1, m2 = run.miner(r.keys["m1"]), run.miner(r.keys["m2"])
    w = run.window_now() + 1
    m1.publish(update(1), window=w, wait=True)
    m2.publish(update(2), window=w)
    val = run.validator(r.keys["val"])
    assert val.peer == r.peers["val"]
    v = val.validate(w)
    rows = {row["peer"]: row for row in v["rows"]}
    assert rows[r.peers["m1"]]["verdict"] == "accepted" and rows[r.peers["m2"]]["verdict"] == "accepted"
    assert all(row["usefulness"] is None for row in v["rows"])
    # The CLI, with the same key for the same window, finds the table already there, which
    # it accepts only when it is byte-identical to the one it would publish.
    c = cli("validate", "--registry", r.registry, "--key", r.keys["val"], "--window", str(w))
    assert c["already_published"] is True and c["scores"] == v["scores"]

    w2 = w + 1
    m1.publish(update(3), window=w2, wait=True)
    m2.publish(update(4), window=w2)
    seen, prepared = {}, []

    def evaluate(peer, upd, scale, window):
        assert window == w2
        seen[peer] = ({k: a.shape for k, a in upd.items()}, scale)
        norm = float(sum(np.square(a, dtype=np.float64).sum() for a in upd.values()))
        return 2.0, 2.0 - norm

    v2 = val.validate(w2, evaluate=evaluate, prepare=prepared.append, name="torch-test")
    assert prepared == [w2]
    assert v2["evaluator"] == "torch-test"
    assert set(seen) == {r.peers["m1"], r.peers["m2"]}
    for peer, (shapes, scale) in seen.items():
        assert shapes == {k: tuple(s) for k, s in SHAPES.items()}
        assert abs(scale - run.lr_at(w2) / 2) < 1e-6
        row = next(x for x in v2["rows"] if x["peer"] == peer)
        assert row["loss_before"] == 2.0 and row["loss_after"] < 2.0
        assert row["usefulness"] is not None and row["usefulness"] > 0

    def broken(peer, upd, scale, window):
        raise RuntimeError("model exploded")

    m1.publish(update(5), window=w2 + 1, wait=True)
    # The validator's broken model is its own failure: by default nothing is published
    # (a weight of 0 for an honest miner could not be taken back) ...
    with pytest.raises(shardrop.Refused) as e:
        val.validate(w2 + 1, evaluate=broken)
    assert e.value.reason == "eval_failed" and "model exploded" in str(e.value)
    # ... and a rerun may publish, here carrying the miner's standing over.
    v3 = val.validate(w2 + 1, evaluate=broken, on_eval_error="carry")
    row = next(x for x in v3["rows"] if x["peer"] == r.peers["m1"])
    assert "model exploded" in (row["eval_error"] or "")
    with pytest.raises(shardrop.Error):
        val.validate(w2 + 1, evaluate=broken, on_eval_error="ignore")


def test_shards_then_publish_gives_the_cli_table_byte_for_byte(folder_run):
    import sys

    from eval_norm import __file__ as eval_script
    from eval_norm import losses

    r = folder_run
    run = shardrop.Run.open(r.registry)
    m1, m2 = run.miner(r.keys["m1"]), run.miner(r.keys["m2"])
    val = run.validator(r.keys["val"])
    cmd = f"{sys.executable} {eval_script}"
    w = run.window_now() + 1
    m1.publish(update(11), window=w, wait=True)
    m2.publish(update(12), window=w)
    shards = val.shards(w)
    assert shards.window == w and len(shards) == 2
    seen = list(shards)
    assert {s.peer for s in seen} == {r.peers["m1"], r.peers["m2"]}
    usefulness = {}
    for s in seen:
        assert s.verdict == "accepted" and s.eligible and not s.copier and s.error is None
        assert {k: a.shape for k, a in s.update.items()} == {k: tuple(v) for k, v in SHAPES.items()}
        assert abs(s.scale - run.lr_at(w) / 2) < 1e-6
        assert all(a.dtype == np.float32 for a in s.update.values())
        usefulness[s.peer] = losses(s.update, s.scale)
    v = val.publish(w, usefulness, name=f"command: {cmd}")
    rows = {x["peer"]: x for x in v["rows"]}
    for peer, (before, after) in usefulness.items():
        assert rows[peer]["loss_before"] == before and rows[peer]["loss_after"] == after
        assert rows[peer]["usefulness"] == before - after and rows[peer]["score"] is not None
    # The CLI measuring with the same function as a command finds the table (and weights)
    # already there: it accepts only byte-identical ones.
    c = cli("validate", "--registry", r.registry, "--key", r.keys["val"], "--window", str(w),
            "--eval-cmd", cmd)
    assert c["already_published"] is True and c["scores"] == v["scores"], c

    # Next window: m2 absent; usefulness given as plain numbers; the CLI's table differs.
    w2 = w + 1
    m1.publish(update(13), window=w2, wait=True)
    shards = list(val.shards(w2))
    by_peer = {s.peer: s for s in shards}
    assert by_peer[r.peers["m2"]].verdict == "missing" and by_peer[r.peers["m2"]].update is None
    assert by_peer[r.peers["m1"]].update is not None
    with pytest.raises(shardrop.Error) as e:
        val.publish(w2, {r.peers["stranger"]: 1.0})
    assert e.value.kind == "caller" and "not a miner" in str(e.value)
    with pytest.raises(shardrop.Error):
        val.publish(w2, {r.peers["m1"]: float("nan")})
    v2 = val.publish(w2, {r.peers["m1"]: 0.125, r.peers["m2"]: 5.0}, name=f"command: {cmd}")
    row = next(x for x in v2["rows"] if x["peer"] == r.peers["m1"])
    assert row["usefulness"] == 0.125 and row["loss_before"] is None and row["weight"] > 0
    miss = next(x for x in v2["rows"] if x["peer"] == r.peers["m2"])
    assert miss["usefulness"] is None and miss["weight"] == 0
    c = cli("validate", "--registry", r.registry, "--key", r.keys["val"], "--window", str(w2),
            "--eval-cmd", cmd, ok=False)
    assert c["_rc"] != 0, "another table for the same window must be refused"
