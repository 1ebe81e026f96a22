"""PyTorch tensors through DLPack: bf16 updates, in-place apply on parameters. Runs where
torch is importable (not in CI, which installs numpy only)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (CI runs numpy only)")
from safetensors.torch import save_file as save_torch  # noqa: E402

import shardrop  # noqa: E402
from conftest import SHAPES, cli, read_safetensors, update  # noqa: E402


def test_bf16_torch_update_matches_the_cli_and_apply_writes_torch_memory(folder_run, tmp_path):
    r = folder_run
    run = shardrop.Run.open(r.registry)
    st = tmp_path / "st"
    miner = run.miner(r.keys["m1"], state=str(st))
    upd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in update(8).items()}
    w = run.window_now() + 1
    p = miner.publish(upd, window=w, wait=True)
    # The same bf16 bits through a file and the CLI find the same shard.
    f = tmp_path / "u.safetensors"
    save_torch(upd, str(f))
    c = cli("publish", "--registry", r.registry, "--key", r.keys["m1"], str(f), "--state",
            str(tmp_path / "cli-state"), "--window", str(w))
    assert c["already_published"] is True and c["object"] == p["object"]
    assert (st / "error-feedback.safetensors").read_bytes() == (
        tmp_path / "cli-state" / "error-feedback.safetensors"
    ).read_bytes()

    for x in range(0, w + 1):
        r.aggregate(x)
    out = tmp_path / "out.safetensors"
    cli("apply", "--registry", r.registry, "--from", str(r.model), "--from-window", "genesis",
        "--through", str(w), "--optimizer-state", str(tmp_path / "o.safetensors"), str(out))
    want = read_safetensors(out)
    model = torch.nn.ParameterDict({k.replace(".", "_"): torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in r.theta0.items()})
    params = {k: model[k.replace(".", "_")].data for k in SHAPES}
    run.catch_up(params, "genesis", w, shardrop.OptimizerState())
    for k in SHAPES:
        assert model[k.replace(".", "_")].detach().numpy().tobytes() == want[k].tobytes(), k
    shutil.rmtree(st)


def test_non_contiguous_torch_tensor_is_refused(folder_run):
    run = shardrop.Run.open(folder_run.registry)
    miner = run.miner(folder_run.keys["m2"])
    upd = {k: torch.from_numpy(v) for k, v in update(1).items()}
    upd["a.weight"] = torch.zeros(32, 64).t()
    with pytest.raises(shardrop.Error) as e:
        miner.publish(upd)
    assert "contiguous" in str(e.value) and e.value.kind == "caller"


def _sharded_rank(rank: int, world: int, registry: str, key: str, window: int, port: int, out: str):
    """One rank of a sharded miner under torch.distributed (gloo, loopback): encodes its
    FSDP2-style slices, gathers the parts on rank 0, which publishes."""
    import json

    import torch.distributed as dist

    from test_sharded import WHOLE_ON_RANK0, full_update, rank_slices

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        run = shardrop.Run.open(registry)
        miner = run.miner(key if rank == 0 else None)
        mine, rows = rank_slices(full_update(77), rank, world)
        local = {k: torch.from_numpy(v.copy()) for k, v in mine.items()}
        part = miner.encode_part(local, window, rows=rows)
        parts = [None] * world if rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        if rank == 0:
            rep = miner.publish_parts(parts, window=window, wait=True)
            with open(out, "w") as f:
                json.dump(rep, f)
        assert WHOLE_ON_RANK0
    finally:
        dist.destroy_process_group()


def test_torch_distributed_ranks_publish_one_shard(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    from test_sharded import SHARDED, full_update
    from conftest import CliRun, write_safetensors

    r = CliRun(tmp_path, "file://" + str(tmp_path / "stores"), "nesterov", 3, shapes=SHARDED)
    run = shardrop.Run.open(r.registry)
    w = run.window_now() + 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "report.json"
    mp.spawn(_sharded_rank, args=(2, r.registry, r.keys["m1"], w, port, str(out)), nprocs=2)
    rep = json.loads(out.read_text())
    assert rep["window"] == w and not rep["already_published"]
    f = tmp_path / "whole.safetensors"
    write_safetensors(f, full_update(77))
    c = cli("publish", "--registry", r.registry, "--key", r.keys["m1"], str(f), "--state",
            str(tmp_path / "whole-state"), "--window", str(w))
    assert c["already_published"] is True and c["object"] == rep["object"]
