#!/usr/bin/env python3
"""Publishing an update from memory: the Python package against the CLI path a user has
without it (write the update to safetensors, run `shardrop publish`), same update, same run,
same window, side by side, printed as ratios.

Each method runs in a fresh child process that builds the same update (seeded, not timed),
then publishes it as a separate miner into consecutive windows (the first has no
error-feedback state yet; later ones carry it: in memory for the package, in the state folder
for the CLI); each publish is timed from its window's opening, holding the update, to the
shard stored (and the state saved, for the CLI). Both paths include the protocol's
commit-then-wait (about 1 s: `schemas/round.md`, "Duplicates"). Peak memory is the whole machine's share:
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
    """Measured publishes, in its own process: one per window for `--windows` consecutive
    windows, each timed from the moment its window opens; prints a JSON line."""
    upd = make_update(args.gib, args.tensors)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    genesis_s, window_s = args.genesis_ms / 1000, args.window_secs
    if args.method == "package":
        import shardrop

        run = shardrop.Run.open(args.registry)
        miner = run.miner(args.key)
    else:
        from safetensors.numpy import save_file
    times, sizes = [], []
    for w in range(args.window, args.window + args.windows):
        time.sleep(max(0.0, genesis_s + w * window_s + 0.05 - time.time()))
        t0 = time.perf_counter()
        if args.method == "package":
            rep = miner.publish(upd, window=w)
        else:
            f = Path(args.work) / "update.safetensors"
            save_file(upd, str(f))
            p = subprocess.run(
                [args.shardrop, "publish", "--registry", args.registry, "--key", args.key, str(f),
                 "--state", str(Path(args.work) / "state"), "--window", str(w), "--json"],
                capture_output=True, text=True, check=True,
            )
            rep = json.loads(p.stdout)
            f.unlink()
        times.append(time.perf_counter() - t0)
        sizes.append(rep["bytes"])
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cli = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if args.method == "cli" else 0
    print(json.dumps({
        "method": args.method, "seconds": times, "bytes": sizes,
        "peak_mib": (own + cli) / 1024, "own_peak_mib": own / 1024,
        "cli_peak_mib": cli / 1024, "update_mib": base_rss / 1024,
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
    ap.add_argument("--windows", type=int, default=2, help="consecutive windows each method publishes")
    ap.add_argument("--genesis-ms", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--window-secs", type=int, help=argparse.SUPPRESS)
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
    window_secs = 15
    init = sh(args.shardrop, "run", "init", "--run", "bench", "--key", keys["op"], "--store",
              f"file://{tmp}/stores/op", "--model", str(model), "--window-secs", str(window_secs),
              "--grace-secs", "5")
    reg = init["registry"]
    genesis_ms = sh(args.shardrop, "run", "show", "--registry", reg)["genesis_ms"]
    model.unlink()
    for who in keys:
        if who.endswith(".peer") or who in ("op", "agg"):
            continue
        sh(args.shardrop, "run", "add", "--registry", reg, "--key", keys["op"], "--role", "miner",
           "--peer", keys[who + ".peer"], "--store", f"file://{tmp}/stores/{who}")
    rows = []
    # Each child's first window is the next one to open after it starts making its update.
    next_window = lambda: int((time.time() * 1000 - genesis_ms) // (window_secs * 1000)) + 2
    for i in range(args.repeats):
        for method in ("cli", "package"):
            work = tmp / f"{method}{i}"
            work.mkdir()
            p = subprocess.run(
                [sys.executable, __file__, "--child", "--method", method, "--registry", reg,
                 "--key", keys[f"{method}{i}"], "--window", str(next_window()), "--work", str(work),
                 "--shardrop", args.shardrop, "--gib", str(args.gib), "--tensors", str(args.tensors),
                 "--windows", str(args.windows), "--genesis-ms", str(genesis_ms),
                 "--window-secs", str(window_secs)],
                capture_output=True, text=True,
            )
            if p.returncode != 0:
                sys.exit(f"{method}: {p.stderr}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(r)
            secs = ", ".join(f"{x:.2f}" for x in r["seconds"])
            print(f"{method:8s} repeat {i}: windows {secs} s, peak {r['peak_mib']:.0f} MiB "
                  f"(own {r['own_peak_mib']:.0f}, shardrop publish {r['cli_peak_mib']:.0f}), shard {r['bytes'][0]} B", flush=True)
    print(f"\n{args.gib:g} GiB f32 update in {args.tensors} tensors, best of {args.repeats} repeats:")
    out = {"gib": args.gib, "rows": rows}
    for label, k in (("first window (no state yet)", 0), ("later windows (state carried)", -1)):
        best = {m: min(r["seconds"][k] for r in rows if r["method"] == m) for m in ("cli", "package")}
        speed = best["cli"] / best["package"]
        out[label] = {"cli_s": best["cli"], "package_s": best["package"], "speedup": speed}
        print(f"  {label}: cli path {best['cli']:.2f} s, package {best['package']:.2f} s -> {speed:.2f}x faster (goal >= 3x)")
    peak = {m: max(r["peak_mib"] for r in rows if r["method"] == m) for m in ("cli", "package")}
    mem = peak["package"] / peak["cli"]
    out["peak_mib"], out["memory_ratio"] = peak, mem
    print(f"  peak memory: cli path {peak['cli']:.0f} MiB (writer + shardrop publish), package {peak['package']:.0f} MiB"
          f" -> {mem:.2f}x (goal <= 0.5)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
