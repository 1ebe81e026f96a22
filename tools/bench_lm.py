#!/usr/bin/env python3
"""Learning benchmark: does training through shardrop learn like the papers' runs?

R workers train a small byte-level transformer language model on a public-domain text
(tools/data/shakespeare.txt), H inner AdamW steps per round, for N rounds, three ways on
the same data, the same initial model and the same batches:

- dense DiLoCo: the workers' pseudo-gradients are averaged in full (f32) and applied with
  an outer Nesterov SGD step (lr 0.7, momentum 0.9), as in the DiLoCo paper;
- shardrop: every round each worker publishes its pseudo-gradient with `shardrop publish
  --wait` (top-k + 2-bit values + error feedback, signed) into a window of a run on a local
  folder, an aggregator runs `shardrop aggregate --follow`, and each worker applies the
  signed aggregate with `shardrop apply --wait --optimizer-state` (the run's outer
  optimizer); every worker's parameters are checked to be bit-identical every round;
- no communication: each worker trains alone for the same steps.

It prints the validation loss at every checkpoint and at the end, the bytes each worker sends
per round, the time spent in shardrop against the time spent training, writes the results
as JSON and a plot (SVG). Not part of the test command: it needs PyTorch.

    python tools/bench_lm.py --shardrop target/release/shardrop --out bench-lm

On 2 CPU cores the default (4 workers, 20 inner steps, 40 rounds, 0.83 M parameters) takes
about 20 minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "data" / "shakespeare.txt"


# --- the model -------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class ByteGPT(nn.Module):
    """A GPT over bytes (vocabulary 256), tied input and output embeddings."""

    def __init__(self, d: int = 128, layers: int = 4, heads: int = 4, context: int = 64):
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        # GPT-2's initialisation: small weights, so the first loss is about ln 256.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x) @ self.tok.weight.T


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))


# --- data ------------------------------------------------------------------------------


class Data:
    def __init__(self, workers: int, context: int, batch: int, seed: int):
        raw = torch.frombuffer(bytearray(CORPUS.read_bytes()), dtype=torch.uint8).long()
        cut = int(len(raw) * 0.9)
        self.train, self.val = raw[:cut], raw[cut:]
        self.context, self.batch = context, batch
        # Each worker draws from its own contiguous part of the training text.
        part = len(self.train) // workers
        self.parts = [self.train[i * part : (i + 1) * part] for i in range(workers)]
        self.seed = seed
        g = torch.Generator().manual_seed(seed + 999)
        self.val_batches = [self._batch(self.val, g) for _ in range(24)]

    def _batch(self, text: torch.Tensor, g: torch.Generator):
        starts = torch.randint(0, len(text) - self.context - 1, (self.batch,), generator=g)
        x = torch.stack([text[s : s + self.context] for s in starts])
        y = torch.stack([text[s + 1 : s + self.context + 1] for s in starts])
        return x, y

    def stream(self, worker: int):
        """The worker's batches: the same sequence in every method."""
        g = torch.Generator().manual_seed(self.seed * 1000 + worker)
        while True:
            yield self._batch(self.parts[worker], g)


@torch.no_grad()
def val_loss(model: nn.Module, data: Data) -> float:
    model.eval()
    total = sum(loss_of(model, x, y).item() for x, y in data.val_batches)
    model.train()
    return total / len(data.val_batches)


# --- safetensors (f32 only), without the package --------------------------------------


def save_st(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        b = tensors[name].detach().to(torch.float32).contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)


def load_st(path: Path) -> dict[str, torch.Tensor]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        buf = bytearray(raw[8 + n + b : 8 + n + e])
        out[name] = torch.frombuffer(buf, dtype=torch.float32).reshape(t["shape"]).clone()
    return out


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def set_params(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])


# --- the three ways --------------------------------------------------------------------


class Workers:
    """R models with their own inner AdamW state and batch streams."""

    def __init__(self, a, data: Data, init: dict[str, torch.Tensor]):
        self.a, self.data = a, data
        self.models, self.opts, self.streams = [], [], []
        for i in range(a.workers):
            m = ByteGPT(context=a.context)
            set_params(m, init)
            self.models.append(m)
            self.opts.append(torch.optim.AdamW(m.parameters(), lr=a.inner_lr, betas=(0.9, 0.95), weight_decay=0.1))
            self.streams.append(data.stream(i))

    def train_all_from(self, start: dict[str, torch.Tensor]) -> float:
        """Every worker's round from the shared parameters `start`; returns the seconds."""
        t0 = time.perf_counter()
        for i in range(self.a.workers):
            set_params(self.models[i], start)
            self.train_round(i)
        return time.perf_counter() - t0

    def train_round(self, i: int) -> None:
        m, opt, s = self.models[i], self.opts[i], self.streams[i]
        for _ in range(self.a.inner_steps):
            x, y = next(s)
            opt.zero_grad(set_to_none=True)
            loss_of(m, x, y).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()


def checkpoints(a) -> list[int]:
    return sorted({r for r in range(a.eval_every, a.rounds + 1, a.eval_every)} | {a.rounds})


def run_nocomm(a, data, init):
    w = Workers(a, data, init)
    curve, t_train = [(0, val_loss(w.models[0], data))], 0.0
    for r in range(1, a.rounds + 1):
        t0 = time.perf_counter()
        for i in range(a.workers):
            w.train_round(i)
        t_train += time.perf_counter() - t0
        if r in checkpoints(a):
            curve.append((r, sum(val_loss(m, data) for m in w.models) / a.workers))
            log(f"  no-comm   round {r:3d}: val loss {curve[-1][1]:.4f}")
    return {"curve": curve, "bytes_per_round": 0, "train_s": t_train, "comm_s": 0.0}


def run_dense(a, data, init):
    w = Workers(a, data, init)
    glob = ByteGPT(context=a.context)
    set_params(glob, init)
    outer = torch.optim.SGD(glob.parameters(), lr=a.dense_lr, momentum=a.dense_momentum, nesterov=True)
    curve, t_train, t_comm = [(0, val_loss(glob, data))], 0.0, 0.0
    numel = sum(p.numel() for p in glob.parameters())
    for r in range(1, a.rounds + 1):
        start = params_of(glob)
        t_train += w.train_all_from(start)
        t0 = time.perf_counter()
        outer.zero_grad(set_to_none=False)
        for n, p in glob.named_parameters():
            deltas = [start[n] - dict(w.models[i].named_parameters())[n].detach() for i in range(a.workers)]
            p.grad = torch.stack(deltas).mean(0)
        outer.step()
        t_comm += time.perf_counter() - t0
        if r in checkpoints(a):
            curve.append((r, val_loss(glob, data)))
            log(f"  dense     round {r:3d}: val loss {curve[-1][1]:.4f}")
    return {"curve": curve, "bytes_per_round": 4 * numel, "train_s": t_train, "comm_s": t_comm}


class Shardrop:
    """A run on a local folder, driven through the CLI as a training loop would."""

    def __init__(self, a, root: Path, model_file: Path):
        self.a, self.root, self.bin = a, root, a.shardrop
        keys = root / "keys"
        keys.mkdir(parents=True)
        self.op = keys / "operator.key"
        self.agg = keys / "aggregator.key"
        self.miners = [keys / f"worker{i}.key" for i in range(a.workers)]
        peers = {k: self.cli("keygen", "--out", str(k))["peer_id"] for k in [self.op, self.agg, *self.miners]}
        store = root / "store"
        outer = a.outer.split(":")
        init = ["--outer-optimizer", outer[0], "--outer-lr", outer[1]]
        if len(outer) > 2:
            init += ["--momentum", outer[2]]
        init += ["--beta", str(a.beta)]
        self.reg = self.cli(
            "run", "init", "--run", "bench", "--key", str(self.op), "--store", str(store / "operator"),
            "--model", str(model_file), "--window-secs", str(a.window_secs), "--grace-secs", "1", *init,
        )["registry"]
        self.cli("run", "add", "--registry", self.reg, "--key", str(self.op), "--role", "aggregator",
                 "--peer", peers[self.agg], "--store", str(store / "aggregator"))
        for i, k in enumerate(self.miners):
            self.cli("run", "add", "--registry", self.reg, "--key", str(self.op), "--role", "miner",
                     "--peer", peers[k], "--store", str(store / f"worker{i}"))
        shown = self.cli("run", "show", "--registry", self.reg)
        self.genesis_ms, self.window_ms = shown["genesis_ms"], shown["window_secs"] * 1000
        self.close_ms = self.window_ms + shown["grace_secs"] * 1000
        # The aggregator: every window from 0 on, empty ones included, as a deployment runs it.
        self.agg_log = open(root / "aggregator.log", "w")
        self.agg_proc = subprocess.Popen(
            [self.bin, "aggregate", "--registry", self.reg, "--key", str(self.agg), "--window", "0", "--follow", "--json"],
            stdout=self.agg_log, stderr=subprocess.STDOUT,
        )
        self.after = None  # the last window in the parameters (None: genesis)

    def cli(self, *args: str) -> dict:
        out = subprocess.run([self.bin, *args, "--json"], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"shardrop {' '.join(args[:2])}: exit {out.returncode}: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def window_for_round(self) -> int:
        """The open window if the publishes (about 1.5 s) fit before it closes, else the next."""
        now = time.time() * 1000
        w = int((now - self.genesis_ms) // self.window_ms)
        if now + 2500 > self.genesis_ms + w * self.window_ms + self.close_ms:
            w += 1
        if self.after is not None and w <= self.after:
            w = self.after + 1
        return w

    def round(self, deltas: list[dict[str, torch.Tensor]], theta_file: Path) -> tuple[Path, int]:
        w = self.window_for_round()
        procs = []
        for i, d in enumerate(deltas):
            upd = self.root / f"update{i}.safetensors"
            save_st(upd, d)
            procs.append(subprocess.Popen(
                [self.bin, "publish", "--registry", self.reg, "--key", str(self.miners[i]), str(upd),
                 "--state", str(self.root / f"ef{i}"), "--window", str(w), "--wait", "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        sizes = []
        for p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"publish: exit {p.returncode}: {err.strip()}")
            sizes.append(json.loads(out)["bytes"])
        # Every worker applies the signed aggregate itself; their parameters must agree.
        digests, outs = set(), []
        for i in range(len(deltas)):
            out = self.root / f"theta{i}-{w}.safetensors"
            self.cli("apply", "--registry", self.reg, "--from", str(theta_file),
                     "--from-window", "genesis" if self.after is None else str(self.after),
                     "--through", str(w), "--wait", "120",
                     "--optimizer-state", str(self.root / f"outer{i}.safetensors"), str(out))
            digests.add(hashlib.blake2b(out.read_bytes()).hexdigest())
            outs.append(out)
        if len(digests) != 1:
            raise RuntimeError(f"window {w}: the workers' parameters differ after apply")
        for o in outs[1:]:
            o.unlink()
        self.after = w
        return outs[0], sum(sizes) // len(sizes)

    def close(self):
        self.agg_proc.terminate()
        self.agg_proc.wait()
        self.agg_log.close()


def run_shardrop(a, data, init, root: Path):
    w = Workers(a, data, init)
    theta = root / "theta-genesis.safetensors"
    save_st(theta, init)
    sd = Shardrop(a, root, theta)
    glob = ByteGPT(context=a.context)
    set_params(glob, init)
    curve, t_train, t_comm, sent = [(0, val_loss(glob, data))], 0.0, 0.0, []
    try:
        for r in range(1, a.rounds + 1):
            start = load_st(theta)
            t_train += w.train_all_from(start)
            t0 = time.perf_counter()
            deltas = [{n: start[n] - p.detach() for n, p in m.named_parameters()} for m in w.models]
            new, size = sd.round(deltas, theta)
            if theta.name != "theta-genesis.safetensors":
                theta.unlink()
            theta = new
            t_comm += time.perf_counter() - t0
            sent.append(size)
            if r in checkpoints(a):
                set_params(glob, load_st(theta))
                curve.append((r, val_loss(glob, data)))
                log(f"  shardrop  round {r:3d}: val loss {curve[-1][1]:.4f} (window {sd.after}, {size} bytes sent per worker)")
    finally:
        sd.close()
    return {"curve": curve, "bytes_per_round": sum(sent) // max(len(sent), 1), "train_s": t_train, "comm_s": t_comm,
            "outer": a.outer}


# --- report ----------------------------------------------------------------------------


def svg(results: dict, path: Path) -> None:
    """A line chart of validation loss against rounds, one line per method."""
    w, h, pad = 640, 400, 56
    pts = [p for r in results.values() for p in r["curve"]]
    x1 = max(p[0] for p in pts) or 1
    lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
    hi = min(hi, lo + 2.5 * (sorted(p[1] for p in pts)[len(pts) // 2] - lo) + 0.1)
    sx = lambda x: pad + (w - 2 * pad) * x / x1
    sy = lambda y: h - pad - (h - 2 * pad) * (min(y, hi) - lo) / (hi - lo or 1)
    colors = {"dense": "#1f77b4", "shardrop": "#d62728", "nocomm": "#7f7f7f"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 16}" text-anchor="middle">outer round</text>',
           f'<text x="16" y="{h / 2}" transform="rotate(-90 16 {h / 2})" text-anchor="middle">validation loss</text>']
    for k in range(5):
        y = lo + (hi - lo) * k / 4
        out.append(f'<text x="{pad - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
        out.append(f'<line x1="{pad}" y1="{sy(y):.1f}" x2="{w - pad}" y2="{sy(y):.1f}" stroke="#ddd"/>')
    for k in range(5):
        x = x1 * k / 4
        out.append(f'<text x="{sx(x):.1f}" y="{h - pad + 16}" text-anchor="middle">{x:.0f}</text>')
    for i, (name, r) in enumerate(results.items()):
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in r["curve"])
        c = colors.get(name, "#2ca02c")
        out.append(f'<polyline points="{line}" fill="none" stroke="{c}" stroke-width="2"/>')
        y = pad + 16 * i
        out.append(f'<line x1="{w - pad - 232}" y1="{y - 4}" x2="{w - pad - 212}" y2="{y - 4}" stroke="{c}" stroke-width="3"/>')
        out.append(f'<text x="{w - pad - 206}" y="{y}" fill="{c}">{r["label"]}</text>')
    out.append(f'<text x="{pad + 4}" y="{pad - 8}" fill="#555">losses above {hi:.2f} drawn at the top edge</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shardrop", default=shutil.which("shardrop") or str(HERE.parent / "target/release/shardrop"))
    ap.add_argument("--out", type=Path, default=Path("bench-lm"))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--inner-lr", type=float, default=2e-3)
    ap.add_argument("--dense-lr", type=float, default=0.7)
    ap.add_argument("--dense-momentum", type=float, default=0.9)
    ap.add_argument("--outer", default="nesterov:0.7:0.9",
                    help="the shardrop run's outer optimizer, KIND:LR[:MOMENTUM] (run init's flags)")
    ap.add_argument("--beta", type=float, default=0.9, help="the shardrop run's error-feedback decay")
    ap.add_argument("--window-secs", type=int, default=3)
    ap.add_argument("--methods", default="dense,shardrop,nocomm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    data = Data(a.workers, a.context, a.batch, a.seed)
    init = params_of(ByteGPT(context=a.context))
    numel = sum(t.numel() for t in init.values())
    log(f"{numel:,} parameters, {a.workers} workers x {a.inner_steps} inner steps x {a.rounds} rounds, "
        f"batch {a.batch}x{a.context} bytes, corpus {CORPUS.name} ({CORPUS.stat().st_size:,} bytes)")
    labels = {"dense": "dense DiLoCo (nesterov 0.7, 0.9)", "shardrop": f"shardrop ({a.outer})", "nocomm": "no communication"}
    results = {}
    started = time.perf_counter()
    for m in a.methods.split(","):
        log(f"{m}:")
        t0 = time.perf_counter()
        if m == "dense":
            r = run_dense(a, data, init)
        elif m == "nocomm":
            r = run_nocomm(a, data, init)
        elif m == "shardrop":
            with tempfile.TemporaryDirectory(dir=a.out) as tmp:
                r = run_shardrop(a, data, init, Path(tmp))
        else:
            raise SystemExit(f"unknown method {m}")
        r["seconds"] = time.perf_counter() - t0
        r["label"] = labels[m]
        results[m] = r
    total = time.perf_counter() - started
    # The table.
    cps = [r for r, _ in next(iter(results.values()))["curve"]]
    print(f"| method | " + " | ".join(f"round {c}" for c in cps) + " | bytes sent per worker per round | time training | time in shardrop |")
    print("|---|" + "---|" * (len(cps) + 3))
    for m, r in results.items():
        losses = " | ".join(f"{l:.3f}" for _, l in r["curve"])
        comm = f"{r['comm_s']:.0f} s" if m == "shardrop" else ("-" if m == "nocomm" else f"{r['comm_s']:.1f} s (in memory)")
        print(f"| {r['label']} | {losses} | {r['bytes_per_round']:,} | {r['train_s']:.0f} s | {comm} |")
    summary = {"parameters": numel, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
               "results": results, "seconds": total, "torch": torch.__version__}
    if "shardrop" in results and "dense" in results:
        s, d = results["shardrop"], results["dense"]
        summary["final_vs_dense"] = s["curve"][-1][1] / d["curve"][-1][1] - 1
        summary["bytes_ratio"] = d["bytes_per_round"] / max(s["bytes_per_round"], 1)
        print(f"\nshardrop's final loss is {100 * summary['final_vs_dense']:+.1f} % of dense DiLoCo's, "
              f"sending {summary['bytes_ratio']:.0f}x fewer bytes per worker per round")
    if "shardrop" in results and "nocomm" in results:
        s, n = results["shardrop"]["curve"][1:], results["nocomm"]["curve"][1:]
        summary["beats_nocomm_everywhere"] = all(a_[1] < b[1] for a_, b in zip(s, n))
        print(f"shardrop beats no communication at every checkpoint: {summary['beats_nocomm_everywhere']}")
    print(f"total {total:.0f} s")
    (a.out / "bench-lm.json").write_text(json.dumps(summary, indent=2))
    svg(results, a.out / "bench-lm.svg")
    log(f"wrote {a.out / 'bench-lm.json'} and {a.out / 'bench-lm.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
