"""Fixtures: runs made by the CLI (the same binary the package's logic is shared with), on a
local folder and, when tools/test started one, on the local S3 server (SHARDROP_TEST_S3)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

REPO = Path(__file__).resolve().parents[3]
BIN = os.environ.get("SHARDROP_BIN", str(REPO / "target" / "debug" / "shardrop"))

def cli(*args: str, ok: bool = True) -> dict:
    """Runs the shardrop CLI with --json; returns its document (and its exit code as
    ``_rc``). ``ok`` requires exit 0."""
    p = subprocess.run([BIN, *args, "--json"], capture_output=True, text=True)
    if ok and p.returncode != 0:
        raise AssertionError(f"shardrop {' '.join(args)}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    doc = json.loads(p.stdout) if p.stdout.strip() else {}
    if isinstance(doc, dict):
        doc["_rc"] = p.returncode
    return doc


def write_safetensors(path: Path, tensors: dict) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def read_safetensors(path: Path) -> dict:
    return load_file(str(path))


SHAPES = {"a.weight": (64, 32), "b.bias": (300,), "c.proj": (16, 40)}


def update(seed: int, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.01).astype(dtype) for k, s in SHAPES.items()}


class CliRun:
    """A run made with `shardrop run init`: an operator, an aggregator, two miners and a
    validator, each with its own area under `base`."""

    def __init__(self, tmp: Path, base: str, optimizer: str, window_secs: int, shapes: dict = SHAPES):
        self.tmp, self.base = tmp, base
        self.keys, self.peers = {}, {}
        for who in ("op", "agg", "m1", "m2", "val", "stranger"):
            self.keys[who] = str(tmp / f"{who}.key")
            self.peers[who] = cli("keygen", "--out", self.keys[who])["peer_id"]
        self.model = tmp / "model.safetensors"
        self.theta0 = {k: np.zeros(s, np.float32) + 0.5 for k, s in shapes.items()}
        write_safetensors(self.model, self.theta0)
        opt = ["--outer-optimizer", optimizer, "--outer-lr", "0.7"]
        if optimizer != "sgd":
            opt += ["--momentum", "0.9"]
        name = f"py{uuid.uuid4().hex[:8]}"
        self.registry = cli(
            "run", "init", "--run", name, "--key", self.keys["op"], "--store", f"{base}/op",
            "--model", str(self.model), "--window-secs", str(window_secs), "--grace-secs", "1",
            "--chunk", "256", "--k", "8", *opt,
        )["registry"]
        for role, who in (("aggregator", "agg"), ("miner", "m1"), ("miner", "m2"), ("validator", "val")):
            cli("run", "add", "--registry", self.registry, "--key", self.keys["op"], "--role", role,
                "--peer", self.peers[who], "--store", f"{base}/{who}")

    def aggregate(self, window: int) -> dict:
        return cli("aggregate", "--registry", self.registry, "--key", self.keys["agg"], "--window", str(window))


@pytest.fixture(params=["folder", "s3"])
def store_base(request, tmp_path):
    if request.param == "folder":
        return "file://" + str(tmp_path / "stores")
    s3 = os.environ.get("SHARDROP_TEST_S3")
    if not s3:
        if os.environ.get("SHARDROP_S3_REQUIRED"):
            pytest.fail("SHARDROP_TEST_S3 missing while SHARDROP_S3_REQUIRED is set")
        pytest.skip("no local S3 server (tools/test starts one)")
    return f"{s3}/py-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def nesterov_run(tmp_path, store_base):
    return CliRun(tmp_path, store_base, "nesterov", 3)


@pytest.fixture
def folder_run(tmp_path):
    return CliRun(tmp_path, "file://" + str(tmp_path / "stores"), "nesterov", 3)


def wait_closed(run, window: int) -> None:
    """Sleeps (by this machine's clock, which is the folder store's) until `window` closed."""
    end = (run.genesis_ms + (window + 1) * run.window_secs * 1000 + run.grace_secs * 1000) / 1000
    time.sleep(max(0.0, end - time.time() + 0.2))
