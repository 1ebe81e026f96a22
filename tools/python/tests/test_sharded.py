"""A miner whose parameters are split over ranks by dimension-0 slices (FSDP2 style),
simulated in one process: every rank encodes its slices, one rank publishes, and the shard is
the one `shardrop publish` makes of the whole update; the ranks' error-feedback buffers are
the slices of the whole buffers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import shardrop
from conftest import CliRun, cli, write_safetensors

# chunk 256 (CliRun): e.weight has a short last chunk split across ranks; n.bias cannot be
# split on a chunk boundary (given whole by rank 0); z.two has fewer rows than 4 ranks.
SHARDED = {"e.weight": (7, 128), "n.bias": (300,), "w.big": (64, 256), "z.two": (2, 256)}
WHOLE_ON_RANK0 = {"n.bias"}


def full_update(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {k: (rng.standard_normal(s) * 0.01).astype(np.float32) for k, s in SHARDED.items()}
    out["z.two"] = out["z.two"].astype(np.float16)
    return out


def rank_slices(u: dict, rank: int, world: int) -> tuple[dict, dict]:
    """What rank `rank` holds of the whole update `u`, and the first row of each slice."""
    mine, rows = {}, {}
    for name, t in u.items():
        if name in WHOLE_ON_RANK0:
            if rank == 0:
                mine[name] = t
            continue
        a, b = shardrop.dim0_rows(t.shape[0], rank, world)
        mine[name], rows[name] = t[a:b], a
    return mine, rows


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_ranks_publish_the_unsharded_shard(tmp_path, world):
    r = CliRun(tmp_path, "file://" + str(tmp_path / "stores"), "nesterov", 3, shapes=SHARDED)
    run = shardrop.Run.open(r.registry)
    ranks = [
        run.miner(r.keys["m1"] if rank == 0 else None, state=str(tmp_path / f"rank{rank}"))
        for rank in range(world)
    ]
    assert ranks[0].peer == r.peers["m1"] and ranks[1].peer is None
    st_cli = tmp_path / "st_cli"
    for i in range(2):
        u = full_update(10 * world + i)
        w = run.window_now() + 1
        parts = []
        for rank, m in enumerate(ranks):
            mine, rows = rank_slices(u, rank, world)
            parts.append(m.encode_part(mine, w, rows=rows))
            assert m.state_window == w
        # The same window again gives the same part (the state has moved past it).
        assert ranks[-1].encode_part(rank_slices(u, world - 1, world)[0], w,
                                     rows=rank_slices(u, world - 1, world)[1]) == parts[-1]
        with pytest.raises(shardrop.Error) as e:
            ranks[1].publish_parts(parts)
        assert e.value.kind == "caller" and "without a key" in str(e.value)
        p = ranks[0].publish_parts(list(reversed(parts)), wait=True)
        assert p["window"] == w and not p["already_published"]
        again = ranks[0].publish_parts(parts)
        assert again["already_published"] and again["object"] == p["object"]
        # The CLI, given the whole update and the whole state from before this window,
        # finds the stored shard byte-identical to its own encoding (else it refuses).
        f = tmp_path / f"u{i}.safetensors"
        write_safetensors(f, u)
        c = cli("publish", "--registry", r.registry, "--key", r.keys["m1"], str(f),
                "--state", str(st_cli), "--window", str(w))
        assert c["already_published"] is True and c["object"] == p["object"]
        whole = load_file(str(st_cli / "error-feedback.safetensors"))
        rank_bufs = [load_file(str(tmp_path / f"rank{k}" / "error-feedback.safetensors"))
                     for k in range(world)]
        for name in SHARDED:
            joined = np.concatenate([b[name] for b in rank_bufs if name in b])
            assert joined.tobytes() == whole[name].tobytes(), name
            assert np.any(joined != 0), name
    # A part from another update for a window already published is a conflict, never a
    # second shard.
    u = full_update(999)
    w = p["window"]
    other = [shardrop.Run.open(r.registry).miner(None) for _ in range(world)]
    parts = [m.encode_part(*[rank_slices(u, k, world)[0], w],
                           rows=rank_slices(u, k, world)[1]) for k, m in enumerate(other)]
    with pytest.raises(shardrop.Error) as e:
        ranks[0].publish_parts(parts)
    assert e.value.kind == "conflict", e.value


def test_bad_slices_and_parts_are_refused_with_their_reason(tmp_path):
    r = CliRun(tmp_path, "file://" + str(tmp_path / "stores"), "nesterov", 3, shapes=SHARDED)
    run = shardrop.Run.open(r.registry)
    u = full_update(1)
    m0 = run.miner(r.keys["m1"], state=str(tmp_path / "r0"))
    # n.bias split in two: 150 elements do not end on a chunk (256).
    with pytest.raises(shardrop.Error) as e:
        m0.encode_part({"n.bias": u["n.bias"][:150]}, 5, rows={"n.bias": 0})
    assert e.value.reason == "slice_misaligned" and "n.bias" in str(e.value), e.value
    assert "256" in str(e.value)
    assert m0.state_window is None, "a refused part leaves the state alone"
    with pytest.raises(shardrop.Error) as e:
        m0.encode_part({"w.big": u["w.big"][:8]}, 5, rows={"w.big": 60})
    assert e.value.reason == "shape_mismatch"
    with pytest.raises(shardrop.Error) as e:
        m0.encode_part({"w.big": u["w.big"]}, 5, rows={"ghost": 0})
    assert e.value.kind == "caller"
    # Rank 0's part alone leaves rows of every split tensor uncovered.
    mine, rows = rank_slices(u, 0, 2)
    p0 = m0.encode_part(mine, 5, rows=rows)
    with pytest.raises(shardrop.Error) as e:
        m0.publish_parts([p0], window=5)
    assert e.value.reason == "parts_mismatch" and "in no part" in str(e.value), e.value
    with pytest.raises(shardrop.Error) as e:
        m0.publish_parts([p0, p0], window=5)
    assert e.value.reason == "parts_mismatch" and "in two parts" in str(e.value)
    with pytest.raises(shardrop.Error) as e:
        m0.publish_parts([b"not a part"], window=5)
    assert e.value.reason == "parts_mismatch"
    # Encoding an earlier window than the state accounts for would count an update twice.
    with pytest.raises(shardrop.Refused) as e:
        m0.encode_part(mine, 4, rows=rows)
    assert e.value.reason == "state_ahead"
    # The kept part survives a restart of the rank (saved beside the state).
    del m0
    m0 = run.miner(r.keys["m1"], state=str(tmp_path / "r0"))
    assert m0.state_window == 5
    assert m0.encode_part(mine, 5, rows=rows) == p0


def test_dim0_rows_is_torch_chunk():
    assert [shardrop.dim0_rows(7, k, 4) for k in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert [shardrop.dim0_rows(2, k, 4) for k in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError):
        shardrop.dim0_rows(4, 4, 4)


def test_a_rank_reopened_after_a_kill_hands_on_its_part(tmp_path):
    """The crash protocol (the library's `MinerState`): a rank killed after it saved its
    part and state finds the part again, without counting the update twice; one killed
    between writing the part and saving the state re-encodes the same bytes."""
    import gc

    r = CliRun(tmp_path, "file://" + str(tmp_path / "stores"), "sgd", 3, shapes=SHARDED)
    run = shardrop.Run.open(r.registry)
    u = full_update(5)
    w = run.window_now() + 1
    mine, rows = rank_slices(u, 1, 2)
    folder = tmp_path / "rank1"
    m = run.miner(None, state=str(folder))
    before = tmp_path / "before"
    m.save_state(str(before))  # the state as it was before this window
    part = m.encode_part(mine, w, rows=rows)
    del m
    gc.collect()  # drops the folder's lock, as a killed process would
    m = run.miner(None, state=str(folder))
    assert m.state_window == w
    assert m.encode_part(mine, w, rows=rows) == part
    del m
    gc.collect()
    # Killed after the part was written, before the state was: the old state is there.
    for f in before.iterdir():
        shutil.copy(f, folder / f.name)
    m = run.miner(None, state=str(folder))
    assert m.state_window is None
    assert m.encode_part(mine, w, rows=rows) == part
