"""The validator in process: the same score table as `shardrop validate`, and usefulness
measured by a Python callable on decoded updates."""

from __future__ import annotations

import numpy as np

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
    v3 = val.validate(w2 + 1, evaluate=broken)
    row = next(x for x in v3["rows"] if x["peer"] == r.peers["m1"])
    assert "model exploded" in (row["eval_error"] or "")
