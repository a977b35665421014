"""Benchmark: main.py's pipeline against the loop users write first, and the detector alone.

    python bench/bench.py            # about 7 minutes on a 2-core CPU machine
    python bench/bench.py --quick    # 1x input only

On the same videos, references, model pack, detector size and thresholds, in one run:
  1. naive:    decode a frame (OpenCV), insightface FaceAnalysis.get, cosine against every
               reference (largest face per photo), name a face when its distance <= threshold;
  2. pipeline: `python main.py` in a subprocess (its whole process tree is measured);
  3. floor:    main.py's detector alone on every processed frame, frames already decoded;
  4. search:   a second main.py run over the same videos with another reference set and
               --clip-mode fast, reusing the first run's index, against a fresh run (--force)
               with those same settings: whole wall times, and its search stage against the
               fresh run's index stage (results.json stats: search_s, index_s).
Inputs: the three shared clips (1x), and each clip concatenated 20 times (20x, video only) to show
steady-state speed and that memory does not grow with video length.
Prints a table and writes bench/results.json: frames/s of each, pipeline/naive and
pipeline-wall/floor ratios, peak memory (PSS) of the pipeline's process tree, and per-person
frame recall / precision / F1 against ../shared/testdata/ground_truth.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

# ──────────────────────────────────────────────────────────────────────────────────────────────
# SETTINGS
# ──────────────────────────────────────────────────────────────────────────────────────────────
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TESTDATA = SHARED / "testdata"
MODEL_ROOT = SHARED  # holds models/<pack>/
MODEL_PACK = "buffalo_sc_int8"
THRESHOLD = 0.70  # cosine distance fitting buffalo_sc_int8 (see tests/conftest.py)
DET_SIZE = 640  # px, both sides
DET_THRESHOLD = 0.25  # SCRFD score of the pipeline (main.py's default) and of the second naive run
NAIVE_DET_THRESHOLD = 0.5  # SCRFD score of the baseline naive run: insightface's own default
REPEAT = 20  # the long input: each clip this many times in a row
WARMUP_FRAMES = 10  # naive loop and floor: frames run first and not timed
BOUNDARY_MARGIN_S = 0.1  # frames this close to a ground-truth boundary are not scored
PIPELINE_FLAGS = ["--providers", "cpu", "--num-cpu-loaders", "1", "--gpu-worker-threads", "2",
                  "--num-gpu-processes", "1", "--batch-size", "4", "--max-buffer-slots", "16"]
WORK = REPO / "bench" / "_work"  # generated inputs and outputs (git-ignored)
RESULTS = REPO / "bench" / "results.json"
# ──────────────────────────────────────────────────────────────────────────────────────────────

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import main  # noqa: E402  (importing main does nothing)
import scoring  # noqa: E402
from findpeople.decode import decode_frames, frame_time_s, probe_video  # noqa: E402
from findpeople.detect import detect_faces  # noqa: E402
from findpeople.models import load_face_models  # noqa: E402
from findpeople.references import reference_label  # noqa: E402
from findpeople.clips import find_ffmpeg  # noqa: E402


def clip_frame_times(path: Path) -> list:
    """Return each frame's time in seconds from the first video frame (as main.py counts)."""
    info = probe_video(path, 0, path.stem)
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame_time_s(f.pts, info.origin_pts, info.time_base)
                for f in container.decode(stream)]


def make_long_inputs(clips: list, ffmpeg: str) -> list:
    """Return paths of each clip concatenated REPEAT times (video stream, copied, not re-encoded)."""
    folder = WORK / f"long_x{REPEAT}"
    folder.mkdir(parents=True, exist_ok=True)
    outputs = []
    for clip in clips:
        target = folder / f"{clip.stem}_x{REPEAT}.mp4"
        if not target.exists():
            listing = folder / f"{clip.stem}.txt"
            listing.write_text("".join(f"file '{clip}'\n" for _ in range(REPEAT)))
            subprocess.run([ffmpeg, "-nostdin", "-v", "error", "-y", "-f", "concat", "-safe", "0",
                            "-i", str(listing), "-map", "0:v:0", "-c", "copy", str(target)],
                           check=True)
        outputs.append(target)
    return outputs


def reference_folder(subfolders: tuple = ("refs", "refs_distractors"), name: str = "refs") -> Path:
    """Return a folder of links to the photos of these testdata folders (the photos stay in place)."""
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    for sub in subfolders:
        for photo in (TESTDATA / sub).iterdir():  # Name.jpg, or a folder Name/ of photos
            if photo.suffix.lower() != ".jpg" and not photo.is_dir():
                continue
            link = folder / photo.name
            if not link.exists():
                os.symlink(photo, link)
    return folder


# ── 1. the naive loop ────────────────────────────────────────────────────────────────────────
def run_naive(videos: list, refs: Path, det_threshold: float) -> dict:
    """Return {fps, frames, seconds, found: {video: {person: set(frame_idx)}}} of the naive loop."""
    import cv2
    from insightface.app import FaceAnalysis
    app = FaceAnalysis(name=MODEL_PACK, root=str(MODEL_ROOT), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(DET_SIZE, DET_SIZE), det_thresh=det_threshold)
    names, embeddings = [], []
    for photo in sorted(refs.glob("*.jpg")):
        faces = app.get(cv2.imread(str(photo)))
        largest = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        names.append(reference_label(photo, refs))
        embeddings.append(largest.normed_embedding)
    matrix = np.stack(embeddings)
    warm = cv2.VideoCapture(str(videos[0]))
    for _ in range(WARMUP_FRAMES):
        ok, frame = warm.read()
        app.get(frame)
    found, frames, started = {}, 0, time.perf_counter()
    for video in videos:
        capture, per_person, idx = cv2.VideoCapture(str(video)), {}, 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            for face in app.get(frame):
                similarity = matrix @ face.normed_embedding
                best = int(np.argmax(similarity))
                if 1.0 - float(similarity[best]) <= THRESHOLD:
                    per_person.setdefault(names[best], set()).add(idx)
            idx += 1
        frames += idx
        found[video.name] = per_person
    seconds = time.perf_counter() - started
    return {"fps": frames / seconds, "frames": frames, "seconds": seconds, "found": found}


# ── 2. the pipeline ──────────────────────────────────────────────────────────────────────────
def tree_memory_kib(root_pid: int) -> tuple:
    """Return (RSS, PSS) in KiB summed over a process and all its descendants (Linux /proc).

    RSS counts the shared ring once per process that maps it; PSS splits shared pages fairly.
    """
    pids, rss, pss = [root_pid], 0, 0
    while pids:
        pid = pids.pop()
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
            for task in Path(f"/proc/{pid}/task").iterdir():
                pids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return rss, pss


def run_pipeline(video_dir: Path, refs: Path, output: Path, *extra: str, fresh: bool = True,
                 index: Path | None = None) -> dict:
    """Return {fps, wall, peak memory, results} of one main.py run (tree memory sampled at 1 Hz);
    fresh: with --force (nothing an earlier run made is reused); index: its INDEX_DIR (default:
    beside the output folder)."""
    index = index or output.with_name(output.name + "_index")
    cmd = [sys.executable, str(REPO / "main.py"), "--videos", str(video_dir), "--refs", str(refs),
           "--output", str(output), "--index-dir", str(index), "--model-root", str(MODEL_ROOT),
           "--model-pack", MODEL_PACK, "--custom-threshold", str(THRESHOLD), "--det-size",
           str(DET_SIZE), "--det-prob-threshold", str(DET_THRESHOLD), *(["--force"] if fresh else []),
           *PIPELINE_FLAGS, *extra]
    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]  # RSS, PSS

    def sample():
        # Once a second: reading smaps_rollup of every process takes CPU time that the pipeline
        # would lose on 2 cores; memory changes slowly.
        while process.poll() is None:
            rss, pss = tree_memory_kib(process.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(1.0)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = process.communicate()
    wall = time.perf_counter() - started
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"main.py failed ({process.returncode}):\n{err[-3000:]}")
    results = json.loads((output / "results.json").read_text())
    stats = results["stats"]
    return {"fps": stats["frames_per_s_after_models_ready"], "fps_end_to_end": stats["frames_per_s"],
            "frames": stats["processed_frames"], "wall_s": wall, "stats": stats,
            "peak_rss_mib": peak[0] / 1024, "peak_pss_mib": peak[1] / 1024, "results": results}


def pipeline_found(results: dict) -> dict:
    """Return {video file name: {person: set(frame_idx)}} from a results.json."""
    found = {}
    for entry in results["videos"]:
        per_person = found.setdefault(Path(entry["file"]).name, {})
        for d in entry["detections"]:
            per_person.setdefault(d["name"], set()).add(d["frame"])
    return found


# ── 3. the detector-only floor ───────────────────────────────────────────────────────────────
def run_floor(videos: list) -> dict:
    """Return {fps, frames, seconds} of main.py's detector alone on frames already decoded."""
    settings = main.load_settings(["--model-root", str(MODEL_ROOT), "--model-pack", MODEL_PACK,
                                   "--det-size", str(DET_SIZE), "--det-prob-threshold",
                                   str(DET_THRESHOLD)])
    models = load_face_models(settings, "cpu", os.cpu_count() or 2)
    frames = []
    for video in videos:
        info = probe_video(video, 0, video.stem)
        frames += [image for _, _, image in decode_frames(info, 1)]
    detect_faces(models, frames[:WARMUP_FRAMES], settings)
    started = time.perf_counter()
    detect_faces(models, frames, settings)
    seconds = time.perf_counter() - started
    return {"fps": len(frames) / seconds, "frames": len(frames), "seconds": seconds}


# ── scoring and report ───────────────────────────────────────────────────────────────────────
def score(found: dict, clips: list, repeat: int = 1) -> dict:
    """Return per clip and over all clips the per-person recall/precision/F1 (a long input maps
    back to its clip)."""
    truth = json.loads((TESTDATA / "ground_truth.json").read_text())
    per_clip = {}
    for clip in clips:
        times = clip_frame_times(clip)
        frame_times = {i: times[i % len(times)] for i in range(len(times) * repeat)}
        name = clip.name if repeat == 1 else f"{clip.stem}_x{repeat}.mp4"
        per_clip[clip.name] = scoring.score_video(frame_times, found.get(name, {}),
                                                  truth[clip.name], BOUNDARY_MARGIN_S)
    report = {clip: scoring.summarize(counts) for clip, counts in per_clip.items()}
    report["all clips"] = scoring.summarize(scoring.merge_counts(*per_clip.values()))
    return report


def agreement(a: dict, b: dict) -> dict:
    """Return per person the Jaccard overlap of the frames two methods named them on."""
    out = {}
    for video in set(a) | set(b):
        for person in set(a.get(video, {})) | set(b.get(video, {})):
            x, y = a.get(video, {}).get(person, set()), b.get(video, {}).get(person, set())
            out[f"{video}:{person}"] = round(len(x & y) / len(x | y), 3) if x | y else None
    return out


def machine() -> dict:
    """Return the machine, provider and library versions."""
    import cv2
    import insightface
    import onnxruntime
    import av
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "provider": "CPUExecutionProvider", "onnxruntime": onnxruntime.__version__,
            "insightface": insightface.__version__, "opencv": cv2.__version__, "av": av.__version__,
            "numpy": np.__version__}


# ── 4. a second search from the index ────────────────────────────────────────────────────────
def run_second_search() -> dict:
    """Return the wall times of a fresh run and of a run that reuses pipeline_1x's index, both
    with another reference set (refs_alt: other photos of the same people) and --clip-mode fast,
    and the ratios the index is for."""
    refs_b = reference_folder(("refs_alt",), "refs_alt")
    clips = TESTDATA / "videos"
    print("[bench] fresh run, other photos, fast clips ...", flush=True)
    fresh = run_pipeline(clips, refs_b, WORK / "out_fresh_alt", "--clip-mode", "fast")
    print("[bench] second run from pipeline_1x's index, other photos, fast clips ...", flush=True)
    second = run_pipeline(clips, refs_b, WORK / "out_search_alt", "--clip-mode", "fast", fresh=False,
                          index=WORK / "out_1x_index")
    same = [{k: r[k] for k in ("name", "start", "end")} for v in fresh["results"]["videos"] for r in v["ranges"]] == \
        [{k: r[k] for k in ("name", "start", "end")} for v in second["results"]["videos"] for r in v["ranges"]]
    f, s = fresh["stats"], second["stats"]
    return {"fresh_wall_s": round(fresh["wall_s"], 3), "second_wall_s": round(second["wall_s"], 3),
            "fresh_index_s": f["index_s"], "second_search_s": s["search_s"],
            "second_processed_frames": s["processed_frames"], "same_ranges": same,
            "second_stats": {k: s[k] for k in ("models_ready_s", "search_s", "snapshots_s", "clips_s")},
            "ratios": {"second wall / fresh wall": round(second["wall_s"] / fresh["wall_s"], 3),
                       "fresh index stage / second search stage":
                           round(f["index_s"] / max(s["search_s"], 1e-6), 1)}}


def print_table(report: dict) -> None:
    """Print the headline numbers, where the pipeline's time goes, and the quality per clip."""
    r = report
    print("\nmachine:", json.dumps(r["machine"]))
    print(f"\n{'method':<22} {'input':<6} {'frames':>7} {'frames/s':>9}")
    print(f"{'naive loop (det 0.5)':<22} {'1x':<6} {r['naive']['frames']:>7} {r['naive']['fps']:>9.1f}")
    print(f"{'naive loop (det 0.25)':<22} {'1x':<6} {r['naive_det_0.25']['frames']:>7} "
          f"{r['naive_det_0.25']['fps']:>9.1f}")
    print(f"{'detector floor':<22} {'1x':<6} {r['floor']['frames']:>7} {r['floor']['fps']:>9.1f}")
    for key in ("pipeline_1x", f"pipeline_{REPEAT}x"):
        if key in r:
            p = r[key]
            print(f"{'pipeline':<22} {key.split('_')[1]:<6} {p['frames']:>7} {p['fps']:>9.1f}"
                  f"   (end to end {p['fps_end_to_end']:.1f}; peak RSS {p['peak_rss_mib']:.0f} MiB,"
                  f" PSS {p['peak_pss_mib']:.0f} MiB)")
    print("\nratios:", json.dumps(r["ratios"], indent=1))
    for key in ("pipeline_1x", f"pipeline_{REPEAT}x"):
        if key in r:
            print(f"\nwhere the time goes, {key} (CPU seconds per stage; items):")
            for process, stages in r[key]["stats"]["stages"].items():
                for stage, v in stages.items():
                    print(f"  {process:<10} {stage:<18} {v['s']:>8.1f} s  {v['n']:>6}")
            print(f"  clips cut in the background: {r[key]['stats']['clips_s']:.1f} s")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for method in ("naive", "naive_det_0.25", "pipeline_1x", f"pipeline_{REPEAT}x"):
        if method in r["quality"]:
            print(f"\nquality {method}:")
            for clip, people in r["quality"][method].items():
                for person, q in people.items():
                    if q["tp"] + q["fp"] + q["fn"]:
                        print(f"  {clip:<28} {person:<20} recall {fmt(q['recall'])}  precision "
                              f"{fmt(q['precision'])}  f1 {fmt(q['f1'])}  "
                              f"(tp {q['tp']} fp {q['fp']} fn {q['fn']})")
    print("\nagreement naive vs pipeline (Jaccard of named frames):",
          json.dumps(r["agreement_naive_vs_pipeline_1x"]))
    print("\nsearch from the index (other photos, fast clips):", json.dumps(r["search"], indent=1))


def main_bench(quick: bool) -> dict:
    """Run all three methods and return the report."""
    clips = sorted((TESTDATA / "videos").glob("*.mp4"))
    refs = reference_folder()
    ffmpeg = find_ffmpeg(str(REPO / "ffmpeg"))
    report = {"machine": machine(), "settings": {
        "model_pack": MODEL_PACK, "threshold": THRESHOLD, "det_size": DET_SIZE,
        "det_threshold": DET_THRESHOLD, "naive_det_threshold": NAIVE_DET_THRESHOLD,
        "repeat": REPEAT, "pipeline_flags": PIPELINE_FLAGS}}
    print("[bench] naive loop on 1x (insightface's detector threshold 0.5) ...", flush=True)
    naive = run_naive(clips, refs, NAIVE_DET_THRESHOLD)
    print(f"[bench] naive loop on 1x (detector threshold {DET_THRESHOLD}, as the pipeline) ...", flush=True)
    naive_low = run_naive(clips, refs, DET_THRESHOLD)
    print("[bench] detector floor on 1x ...", flush=True)
    floor = run_floor(clips)
    print("[bench] pipeline on 1x ...", flush=True)
    pipe1 = run_pipeline(TESTDATA / "videos", refs, WORK / "out_1x")
    report["naive"] = {k: v for k, v in naive.items() if k != "found"}
    report["naive_det_0.25"] = {k: v for k, v in naive_low.items() if k != "found"}
    report["floor"] = floor
    report["pipeline_1x"] = {k: v for k, v in pipe1.items() if k != "results"}
    report["quality"] = {"naive": score(naive["found"], clips),
                         "naive_det_0.25": score(naive_low["found"], clips),
                         "pipeline_1x": score(pipeline_found(pipe1["results"]), clips)}
    report["agreement_naive_vs_pipeline_1x"] = agreement(naive["found"], pipeline_found(pipe1["results"]))
    report["search"] = run_second_search()
    report["ratios"] = {
        "pipeline_fps / naive_fps (1x, models ready to last frame)": round(pipe1["fps"] / naive["fps"], 2),
        "pipeline_fps / naive_det_0.25_fps (1x)": round(pipe1["fps"] / naive_low["fps"], 2),
        "pipeline time, models ready to last frame / floor (1x)": round(floor["fps"] / pipe1["fps"], 2),
        "pipeline whole wall time / floor (1x, start-up and clips included)":
            round(pipe1["wall_s"] / floor["seconds"], 2)}
    if not quick:
        long_inputs = make_long_inputs(clips, ffmpeg)
        print(f"[bench] pipeline on {REPEAT}x ...", flush=True)
        pipe_long = run_pipeline(long_inputs[0].parent, refs, WORK / f"out_{REPEAT}x")
        key = f"pipeline_{REPEAT}x"
        report[key] = {k: v for k, v in pipe_long.items() if k != "results"}
        report["quality"][key] = score(pipeline_found(pipe_long["results"]), clips, REPEAT)
        report["ratios"].update({
            f"pipeline_fps {REPEAT}x / naive_fps 1x": round(pipe_long["fps"] / naive["fps"], 2),
            f"pipeline time, models ready to last frame / floor ({REPEAT}x)":
                round(floor["fps"] / pipe_long["fps"], 2),
            f"pipeline whole wall time / floor ({REPEAT}x)":
                round(pipe_long["wall_s"] / (floor["seconds"] * REPEAT), 2),
            f"peak_rss {REPEAT}x / 1x": round(pipe_long["peak_rss_mib"] / pipe1["peak_rss_mib"], 3),
            f"peak_pss {REPEAT}x / 1x": round(pipe_long["peak_pss_mib"] / pipe1["peak_pss_mib"], 3)})
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1x input only")
    report = main_bench(parser.parse_args().quick)
    print_table(report)
    RESULTS.write_text(json.dumps(report, indent=1, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    print(f"\n[bench] wrote {RESULTS}")
