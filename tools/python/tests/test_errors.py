"""Every failure is a shardrop.Error with the library's class and reason code."""

from __future__ import annotations

import glob
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shardrop
from conftest import SHAPES, update, wait_closed


def refused(fn, reason):
    with pytest.raises(shardrop.Refused) as e:
        fn()
    assert e.value.reason == reason, (e.value.reason, str(e.value))
    assert e.value.kind == "refused"
    return e.value


def test_publish_refusals_carry_reason_codes(folder_run, tmp_path):
    r = folder_run
    run = shardrop.Run.open(r.registry, operator=r.peers["op"])
    miner = run.miner(r.keys["m1"])
    wait_closed(run, 0)
    closed = refused(lambda: miner.publish(update(1), window=0), "window_closed")
    # In windows and seconds, with the next step (not epoch milliseconds).
    assert "s ago" in str(closed) and "is open now" in str(closed), str(closed)
    early = refused(lambda: miner.publish(update(1), window=run.window_now() + 100), "window_not_open")
    assert "opens in" in str(early) and "wait=True" in str(early), str(early)
    bad = update(1)
    bad["a.weight"] = np.zeros((2, 2), np.float32)
    shape = refused(lambda: miner.publish(bad), "model_mismatch")
    assert "[2, 2]" in str(shape) and f"{list(SHAPES['a.weight'])}" in str(shape), str(shape)
    missing = update(1)
    del missing["b.bias"]
    lacks = refused(lambda: miner.publish(missing), "model_mismatch")
    assert "lacks tensor \"b.bias\"" in str(lacks), str(lacks)
    stranger = run.miner(r.keys["stranger"])
    refused(lambda: stranger.publish(update(1)), "not_registered")
    assert miner.state_window is None, "a refused publish must not advance the state"


def test_one_state_folder_has_one_publisher(folder_run, tmp_path):
    r = folder_run
    run = shardrop.Run.open(r.registry, operator=r.peers["op"])
    st = tmp_path / "state"
    first = run.miner(r.keys["m1"], state=str(st))
    with pytest.raises(shardrop.Error) as e:
        run.miner(r.keys["m1"], state=str(st))
    assert e.value.kind == "conflict", e.value.kind
    assert "another miner in this one" in str(e.value)
    assert str(e.value).count(str(st)) == 1, str(e.value)
    del first
    import gc

    gc.collect()
    assert not (st / "state.lock").exists(), "the lock file goes with the lock"
    run.miner(r.keys["m1"], state=str(st))


def test_a_pinned_operator_that_did_not_sign_is_rejected(folder_run):
    r = folder_run
    with pytest.raises(shardrop.Error) as e:
        shardrop.Run.open(r.registry, operator=r.peers["m1"])
    assert e.value.kind == "rejected" and e.value.reason, str(e.value)
    assert isinstance(e.value, shardrop.Rejected)
    assert e.value.object and "registry" in e.value.object


def test_a_forged_aggregate_raises_rejected_naming_it(folder_run):
    r = folder_run
    run = shardrop.Run.open(r.registry)
    assert run.wait_aggregate(0) is False
    r.aggregate(0)
    assert run.wait_aggregate(0, timeout=1.0) is True
    [path] = glob.glob(str(r.tmp / "stores" / "agg" / "**" / "0000000000.agg"), recursive=True)
    raw = bytearray(open(path, "rb").read())
    raw[-1] ^= 0x01
    open(path, "wb").write(bytes(raw))
    with pytest.raises(shardrop.Rejected) as e:
        run.wait_aggregate(0)
    assert e.value.reason and e.value.object and e.value.object.endswith("0000000000.agg")
    theta = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    before = {k: v.copy() for k, v in theta.items()}
    with pytest.raises(shardrop.Rejected):
        run.apply_(theta, 0, shardrop.OptimizerState())
    for k in theta:
        assert np.array_equal(theta[k], before[k]), "a rejected aggregate changed the parameters"


def test_bad_tensors_are_caller_errors(folder_run):
    run = shardrop.Run.open(folder_run.registry)
    miner = run.miner(folder_run.keys["m1"])
    cases = {
        "int": {**update(1), "b.bias": np.zeros(300, np.int32)},
        "strided": {**update(1), "a.weight": np.zeros((32, 64), np.float32).T},
        "no dlpack": {**update(1), "b.bias": [0.0] * 300},
    }
    for what, u in cases.items():
        with pytest.raises(shardrop.Error) as e:
            miner.publish(u)
        assert e.value.kind == "caller", what
        assert e.value.reason is None
    # Dtypes by the names torch and numpy give them; parameters are not called updates.
    with pytest.raises(shardrop.Error) as e:
        miner.publish({**update(1), "b.bias": np.zeros(300, np.float64)})
    assert "is float64; updates are float32" in str(e.value), str(e.value)
    wide = {k: np.zeros(s, np.float64) for k, s in SHAPES.items()}
    with pytest.raises(shardrop.Error) as e:
        run.apply_(wide, 0)
    assert "is float64; parameters are updated in f32" in str(e.value), str(e.value)
    frozen = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    frozen["a.weight"].flags.writeable = False
    with pytest.raises(shardrop.Error) as e:
        run.apply_(frozen, 0)
    assert "read-only" in str(e.value)
    # Two views of one buffer: applying in place would give the shared part both updates.
    buf = np.zeros(64 * 32, np.float32)
    aliased = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    aliased["a.weight"] = buf.reshape(64, 32)
    aliased["b.bias"] = buf[:300]
    with pytest.raises(shardrop.Error) as e:
        run.apply_(aliased, 0)
    assert e.value.kind == "caller"
    assert "share memory" in str(e.value), str(e.value)
    half = {k: np.zeros(s, np.float16) for k, s in SHAPES.items()}
    with pytest.raises(shardrop.Error) as e:
        run.apply_(half, 0)
    assert "f32" in str(e.value)
    with pytest.raises(shardrop.Error):
        run.miner(folder_run.keys["m1"], device="cuda:0")


def test_library_events_reach_python_logging(folder_run, caplog):
    run = shardrop.Run.open(folder_run.registry)
    miner = run.miner(folder_run.keys["m2"])
    with caplog.at_level("INFO", logger="shardrop"):
        miner.publish(update(3), window=run.window_now() + 1, wait=True)
    assert any(
        rec.name.startswith("shardrop") and "waiting for the window to open" in rec.getMessage()
        for rec in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_ctrl_c_interrupts_a_wait(folder_run):
    code = textwrap.dedent(
        f"""
        import shardrop, sys
        run = shardrop.Run.open({folder_run.registry!r})
        print("ready", flush=True)
        try:
            run.wait_aggregate(10**6, timeout=120)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(7)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    started = time.monotonic()
    p.send_signal(signal.SIGINT)
    try:
        rc = p.wait(timeout=20)
    finally:
        p.kill()
    assert rc == 7, "the wait did not raise KeyboardInterrupt"
    assert time.monotonic() - started < 20
