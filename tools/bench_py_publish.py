#!/usr/bin/env python3
"""Publishing an update from memory: the Python package against the CLI path a user has
without it (write the update to safetensors, run `shardrop publish`), same update, same run,
same window, side by side, printed as ratios.

Each method runs in a fresh child process that builds the same update (seeded, not timed),
then publishes it for one window as a separate miner; its time runs from holding the update
to the shard stored (the state saved, for the CLI). Peak memory is the whole machine's share:
the child's peak RSS plus, for the CLI path, the `shardrop publish` process's own peak.

    python tools/bench_py_publish.py --shardrop target/release/shardrop --gib 1

Needs numpy, safetensors and the package (`pip install ./tools/python`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_update(gib: float, tensors: int):
    import numpy as np

    n = int(gib * (1 << 30) / 4 / tensors)
    n -= n % 4096
    rng = np.random.default_rng(0)
    return {f"layer.{i:02d}.weight": rng.standard_normal(n, dtype=np.float32) * 0.01 for i in range(tensors)}


def child(args) -> None:
    """One measured publish, in its own process; prints a JSON line."""
    upd = make_update(args.gib, args.tensors)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.method == "package":
        import shardrop

        run = shardrop.Run.open(args.registry)
        miner = run.miner(args.key)
        rep = miner.publish(upd, window=args.window)
        child_peak = 0
    else:
        from safetensors.numpy import save_file

        f = Path(args.work) / "update.safetensors"
        save_file(upd, str(f))
        p = subprocess.run(
            [args.shardrop, "publish", "--registry", args.registry, "--key", args.key, str(f),
             "--state", str(Path(args.work) / "state"), "--window", str(args.window), "--json"],
            capture_output=True, text=True, check=True,
        )
        rep = json.loads(p.stdout)
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        f.unlink()
    secs = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "method": args.method, "seconds": secs, "bytes": rep["bytes"], "dense_bytes": rep["dense_bytes"],
        "peak_mib": (own + child_peak) / 1024, "own_peak_mib": own / 1024,
        "cli_peak_mib": child_peak / 1024, "update_mib": base_rss / 1024,
    }))


def sh(*a: str) -> dict:
    p = subprocess.run(list(a) + ["--json"], capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shardrop", default="target/release/shardrop")
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json-out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--registry", help=argparse.SUPPRESS)
    ap.add_argument("--key", help=argparse.SUPPRESS)
    ap.add_argument("--window", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.shardrop = os.path.abspath(args.shardrop)
    import numpy as np
    from safetensors.numpy import save_file

    tmp = Path(tempfile.mkdtemp(prefix="bench-py-publish-"))
    keys = {}
    for who in ["op", "agg"] + [f"{m}{i}" for m in ("cli", "package") for i in range(args.repeats)]:
        keys[who] = str(tmp / f"{who}.key")
        keys[who + ".peer"] = sh(args.shardrop, "keygen", "--out", keys[who])["peer_id"]
    model = tmp / "model.safetensors"
    upd = make_update(args.gib, args.tensors)
    save_file({k: np.zeros(1, np.float32).repeat(v.size) for k, v in upd.items()}, str(model))
    del upd
    window_secs = 600
    reg = sh(args.shardrop, "run", "init", "--run", "bench", "--key", keys["op"], "--store",
             f"file://{tmp}/stores/op", "--model", str(model), "--window-secs", str(window_secs),
             "--grace-secs", "60")["registry"]
    model.unlink()
    for who in keys:
        if who.endswith(".peer") or who in ("op", "agg"):
            continue
        sh(args.shardrop, "run", "add", "--registry", reg, "--key", keys["op"], "--role", "miner",
           "--peer", keys[who + ".peer"], "--store", f"file://{tmp}/stores/{who}")
    rows = []
    window = 0
    for i in range(args.repeats):
        for method in ("cli", "package"):
            work = tmp / f"{method}{i}"
            work.mkdir()
            p = subprocess.run(
                [sys.executable, __file__, "--child", "--method", method, "--registry", reg,
                 "--key", keys[f"{method}{i}"], "--window", str(window), "--work", str(work),
                 "--shardrop", args.shardrop, "--gib", str(args.gib), "--tensors", str(args.tensors)],
                capture_output=True, text=True,
            )
            if p.returncode != 0:
                sys.exit(f"{method}: {p.stderr}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{method:8s} run {i}: {r['seconds']:.2f} s, peak {r['peak_mib']:.0f} MiB "
                  f"(own {r['own_peak_mib']:.0f}, cli {r['cli_peak_mib']:.0f}), shard {r['bytes']} B", flush=True)
    best = {m: min((r for r in rows if r["method"] == m), key=lambda r: r["seconds"]) for m in ("cli", "package")}
    speed = best["cli"]["seconds"] / best["package"]["seconds"]
    mem = best["package"]["peak_mib"] / best["cli"]["peak_mib"]
    same = best["cli"]["bytes"] == best["package"]["bytes"]
    print(f"\n{args.gib:g} GiB f32 update in {args.tensors} tensors, best of {args.repeats}:")
    print(f"  cli path (save_file + shardrop publish): {best['cli']['seconds']:.2f} s, peak {best['cli']['peak_mib']:.0f} MiB")
    print(f"  package (miner.publish from memory):      {best['package']['seconds']:.2f} s, peak {best['package']['peak_mib']:.0f} MiB")
    print(f"  speed-up {speed:.2f}x (goal >= 3x); memory ratio {mem:.2f} (goal <= 0.5); shard sizes equal: {same}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "speedup": speed, "memory_ratio": mem}, indent=1))


if __name__ == "__main__":
    main()
