"""Benchmark: what indexing through Ray costs on one machine, against the local pipeline.

    python bench/ray_overhead.py             # 3 rounds, about 8 minutes on a 2-core machine
    python bench/ray_overhead.py --rounds 1

Each round runs the whole search (`python main.py`, fresh output and index folders) on the
three shared clips three ways, in a rotating order so that a slow moment hits each in turn:
  local:    the local pipeline (RAY_ADDRESS empty);
  ray-new:  --ray local: starts a Ray instance, indexes the videos on indexer actors, stops it;
  ray-up:   --ray <address> of a one-node cluster started before the rounds (`ray start --head`,
            as many CPUs as the machine), the way a cluster is used: already running.
Prints per run the wall time, the index stage, Ray's connect-and-check time and per video the
driver's view of its task (start to first frames: the first video of an indexer waits for the
pipeline's start and model loading, the second for the first one's frames to be decoded). Then
the medians, spreads and ratios to the local run of the same round, and what Ray adds to each
video on the running cluster: one actor call, and one carrying a clip's tracks back. Needs Ray
(requirements-ray.txt); at the end `ray stop --force` stops every Ray instance of this user on
the machine. Writes bench/_work/ray_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ──────────────────────────────────────────────────────────────────────────────────────────────
# SETTINGS
# ──────────────────────────────────────────────────────────────────────────────────────────────
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VIDEOS = SHARED / "testdata" / "videos"
REFS = SHARED / "testdata" / "refs"
MODEL_PACK = "buffalo_sc_int8"
FLAGS = ["--model-root", str(SHARED), "--model-pack", MODEL_PACK, "--custom-threshold", "0.70",
         "--providers", "cpu", "--num-cpu-loaders", "1", "--gpu-worker-threads", "2",
         "--batch-size", "4", "--max-buffer-slots", "16"]
VARIANTS = ("local", "ray-new", "ray-up")
OUT = REPO / "bench" / "_work" / "ray_overhead.json"
# ──────────────────────────────────────────────────────────────────────────────────────────────


def run_once(variant: str, address: str, work: Path) -> dict:
    """Run main.py once for this variant in a fresh folder; return its times."""
    folder = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=work))
    ray_flags = {"local": [], "ray-new": ["--ray", "local"], "ray-up": ["--ray", address]}[variant]
    command = [sys.executable, str(REPO / "main.py"), "--videos", str(VIDEOS), "--refs", str(REFS),
               "--output", str(folder / "out"), "--index-dir", str(folder / "index"), *FLAGS, *ray_flags]
    # An explicit address never turns Ray's token authentication on by itself (ray start did).
    env = {**os.environ, "RAY_AUTH_MODE": "token"} if variant == "ray-up" else None
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=folder, timeout=1800, env=env)
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    stats = json.loads((folder / "out" / "results.json").read_text())["stats"]
    cluster = stats.get("cluster") or {}
    ranges = [(Path(v["file"]).name, [(r["name"], r["start"], r["end"]) for r in v["ranges"]])
              for v in json.loads((folder / "out" / "results.json").read_text())["videos"]]
    kept = REPO / "bench" / "_work" / "ray_overhead_index"  # for call_overhead's payload size
    if not kept.exists():
        shutil.copytree(folder / "index", kept)
    shutil.rmtree(folder, ignore_errors=True)
    return {"variant": variant, "wall_s": round(wall_s, 3), "index_s": stats["index_s"],
            "connect_s": cluster.get("connect_s"), "videos": cluster.get("videos", []),
            "models_ready_s": stats.get("models_ready_s"), "ranges": sorted(ranges)}


def start_cluster(work: Path) -> tuple:
    """Start a one-node Ray cluster (`ray start --head`) with its own temporary folder; return
    (its address, the environment to stop it with)."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    temp = Path(tempfile.mkdtemp(prefix="rayb-"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": str(temp)}
    done = subprocess.run([ray, "start", "--head", f"--num-cpus={os.cpu_count()}", "--num-gpus=0",
                           "--include-dashboard=false", "--disable-usage-stats",
                           f"--temp-dir={temp}", "--port=0"],
                          capture_output=True, text=True, env=env, timeout=300)
    text = done.stdout + done.stderr
    address = next((line.split("--address=")[1].split()[0].strip("'\"") for line in text.splitlines()
                    if "--address=" in line), None)
    if done.returncode != 0 or address is None:
        raise SystemExit(f"ray start failed:\n{text[-3000:]}")
    return address, [ray, "stop", "--force"], env


def call_overhead(address: str, calls: int = 200) -> dict:
    """Time what Ray adds per video on the running cluster, apart from the pipeline: a call to an
    actor that returns at once (each video is one such call), and one that returns tracks of the
    size of a shared clip's index (the payload a video's call carries back)."""
    os.environ["RAY_AUTH_MODE"] = "token"  # read when ray is imported
    import numpy as np
    import ray
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Echo:
            def nothing(self):
                return None

            def payload(self, size: int):
                return np.zeros(size, dtype=np.uint8)

        echo = Echo.remote()
        ray.get(echo.nothing.remote())
        size = max(p.stat().st_size for p in (REPO / "bench" / "_work" / "ray_overhead_index").glob("*.parquet"))
        times = {"call_s": [], "payload_s": []}
        for _ in range(calls):
            started = time.perf_counter()
            ray.get(echo.nothing.remote())
            times["call_s"].append(time.perf_counter() - started)
            started = time.perf_counter()
            ray.get(echo.payload.remote(size))
            times["payload_s"].append(time.perf_counter() - started)
        return {"payload_bytes": size, **{k: spread(v) for k, v in times.items()}}
    finally:
        ray.shutdown()


def summary(runs: list) -> dict:
    """Return per variant the median and range of wall and index times, and the per-round ratio
    of each Ray variant's wall time to the local run's."""
    out = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        walls = [r["wall_s"] for r in mine]
        startups = [v["startup_s"] for r in mine for v in r["videos"] if v["startup_s"] is not None]
        waits = [v["wait_s"] for r in mine for v in r["videos"] if v["wait_s"] is not None]
        out[variant] = {"wall_s": spread(walls), "index_s": spread([r["index_s"] for r in mine]),
                        "connect_s": spread([r["connect_s"] for r in mine if r["connect_s"] is not None]),
                        "task_startup_s": spread(startups), "task_wait_s": spread(waits)}
    locals_by_round = [r["wall_s"] for r in runs if r["variant"] == "local"]
    for variant in VARIANTS[1:]:
        ratios = [r["wall_s"] / base for r, base in
                  zip([r for r in runs if r["variant"] == variant], locals_by_round)]
        out[variant]["wall_ratio_to_local"] = spread(ratios)
    return out


def spread(values: list) -> dict | None:
    """Return {median, min, max} of values, or None for none."""
    if not values:
        return None
    return {"median": round(statistics.median(values), 5), "min": round(min(values), 5),
            "max": round(max(values), 5), "n": len(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = REPO / "bench" / "_work" / "ray_overhead"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(REPO / "bench" / "_work" / "ray_overhead_index", ignore_errors=True)
    work.mkdir(parents=True)
    address, stop, env = start_cluster(work)
    runs = []
    try:
        for round_idx in range(args.rounds):
            order = VARIANTS[round_idx % 3:] + VARIANTS[:round_idx % 3]
            for variant in order:
                run = run_once(variant, address, work)
                run["round"] = round_idx
                runs.append(run)
                startups = ", ".join(f"{v['startup_s']}" for v in run["videos"])
                print(f"round {round_idx} {variant:8s} wall {run['wall_s']:6.1f} s  index stage "
                      f"{run['index_s']:6.1f} s  connect {run['connect_s'] or 0:4.1f} s  "
                      f"task start->first frames: {startups or '-'}", flush=True)
        calls = call_overhead(address)
        print(f"per video: actor call {calls['call_s']['median'] * 1000:.1f} ms, with a "
              f"{calls['payload_bytes'] / 1e6:.2f} MB payload {calls['payload_s']['median'] * 1000:.1f} ms "
              f"(median of {calls['call_s']['n']})", flush=True)
    finally:
        subprocess.run(stop, capture_output=True, env=env, timeout=120)
    same = all(r["ranges"] == runs[0]["ranges"] for r in runs)
    result = {"runs": runs, "summary": summary(runs), "calls": calls, "same_ranges_in_every_run": same,
              "cpus": os.cpu_count()}
    OUT.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    print(f"same ranges in every run: {same}; written {OUT}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
