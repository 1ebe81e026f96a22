"""The package against the CLI on the same run: the same shard sections and error-feedback
state as `shardrop publish`, the same parameters and momentum as `shardrop apply`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import shardrop
from conftest import SHAPES, cli, read_safetensors, update, write_safetensors


def copy(t: dict) -> dict:
    return {k: v.copy() for k, v in t.items()}


def test_publish_and_apply_match_the_cli(nesterov_run, tmp_path):
    r = nesterov_run
    run = shardrop.Run.open(r.registry)
    assert run.name and set(run.tensors) == set(SHAPES)
    st_py, st_cli = tmp_path / "st_py", tmp_path / "st_cli"
    miner = run.miner(r.keys["m1"], state=str(st_py))
    assert miner.peer == r.peers["m1"]
    windows = []
    for i, u in enumerate([update(1), update(2, np.float16)]):
        # The CLI starts from the state the package had before this window.
        shutil.rmtree(st_cli, ignore_errors=True)
        if st_py.exists():
            shutil.copytree(st_py, st_cli)
            (st_cli / "state.lock").unlink(missing_ok=True)
        w = run.window_now() + 1
        p = miner.publish(u, window=w, wait=True)
        assert p["window"] == w and not p["already_published"] and p["bytes"] > 0
        assert miner.state_window == w
        f = tmp_path / f"u{i}.safetensors"
        write_safetensors(f, u)
        # Same key, window, update and state: the CLI finds its own shard already there,
        # which it accepts only when every section is byte-identical to its encoding.
        c = cli("publish", "--registry", r.registry, "--key", r.keys["m1"], str(f),
                "--state", str(st_cli), "--window", str(w))
        assert c["already_published"] is True and c["object"] == p["object"]
        assert (st_cli / "error-feedback.safetensors").read_bytes() == (
            st_py / "error-feedback.safetensors"
        ).read_bytes()
        windows.append(w)
    # Another update for the same window and state is a conflict: the check above can fail.
    f = tmp_path / "other.safetensors"
    write_safetensors(f, update(99))
    shutil.rmtree(st_cli)
    c = cli("publish", "--registry", r.registry, "--key", r.keys["m1"], str(f), "--state",
            str(tmp_path / "fresh"), "--window", str(windows[-1]), ok=False)
    assert c["_rc"] != 0

    last = windows[-1]
    for w in range(0, last + 1):
        r.aggregate(w)
    out, cst = tmp_path / "out.safetensors", tmp_path / "cli-outer.safetensors"
    cli("apply", "--registry", r.registry, "--from", str(r.model), "--from-window", "genesis",
        "--through", str(last), "--optimizer-state", str(cst), str(out))
    want = read_safetensors(out)
    want_m = read_safetensors(cst)

    # Whole replay from genesis.
    theta, st = copy(r.theta0), shardrop.OptimizerState()
    assert run.catch_up(theta, "genesis", last, st) == last + 1
    for k in SHAPES:
        assert theta[k].tobytes() == want[k].tobytes(), k
        assert not np.array_equal(theta[k], r.theta0[k]), f"{k}: the replay changed nothing"
    assert st.after == last and st.run == run.name
    st.save(str(tmp_path / "py-outer.safetensors"))
    got_m = read_safetensors(tmp_path / "py-outer.safetensors")
    assert got_m.keys() == want_m.keys()
    for k in want_m:
        assert got_m[k].tobytes() == want_m[k].tobytes(), k

    # Window by window, momentum carried in the object, equals the whole replay.
    theta2, st2 = copy(r.theta0), shardrop.OptimizerState()
    for w in range(0, last + 1):
        run.apply_(theta2, w, st2)
    for k in SHAPES:
        assert theta2[k].tobytes() == want[k].tobytes(), k

    # A rank holding one tensor gets exactly that tensor's bits.
    part, st3 = {"a.weight": r.theta0["a.weight"].copy()}, shardrop.OptimizerState()
    run.catch_up(part, "genesis", last, st3)
    assert part["a.weight"].tobytes() == want["a.weight"].tobytes()
    assert st3.names == ["a.weight"]

    # A saved state resumes a replay: the CLI's state file, loaded, continues in Python.
    loaded = shardrop.OptimizerState.load(str(cst))
    assert loaded.after == last and loaded.run == run.name

    # Momentum runs refuse a replay without the momentum, or with another window's.
    with pytest.raises(shardrop.Refused) as e:
        run.apply_(copy(r.theta0), last)
    assert e.value.reason == "optimizer_state_missing" and e.value.kind == "refused"
    # ... naming the next step: a peer with nothing applied yet starts from genesis.
    assert "--from-window genesis" in str(e.value) and "--optimizer-state" in str(e.value)
    with pytest.raises(shardrop.Refused) as e:
        run.apply_(copy(r.theta0), last, loaded)
    assert e.value.reason == "optimizer_state_window"
    assert isinstance(e.value, shardrop.Error)
