"""Benchmark: search a big archive's index for 10 people (issue #12, "Index once, search many").

    python bench/search_scale.py --hours 100     # about 2 minutes on a 2-core CPU machine
    python bench/search_scale.py --hours 1000    # about 25 minutes to build, 17 GiB under /tmp

Builds a synthetic index in the real format (findpeople/index.py: one Parquet file per hour of
video) of about 2,000 tracks and 16,000 looks per hour: every track is a random face (a random
unit vector) seen in 1 to 15 looks with the look-to-look similarity of real tracks; among them,
PLANTED_TRACKS_PER_PERSON tracks of each of 10 people whose looks resemble that person's reference
photos as real named tracks do (both measured on the shared clips by bench/index_real_tracks.py).
While building it notes every track that has a look within THRESHOLD of a person (brute force).
Then, in a fresh process, "the index is opened": the template cache is built or checked
(findpeople.search.open_templates, timed apart as open_s) and its pages read once; a warm-up search
is discarded and SEARCHES timed searches run with the production code (search_templates, then
naming.evaluate_evidence names the tracks). The last line is
    search_s=<median seconds> planted_found=<k>/<n> false_tracks=<m> peak_rss_mib=<MiB>
where false_tracks counts tracks named that are not planted (or named as someone else), and the
lines above it say whether the search returned exactly the brute-force set of tracks.
The data is kept in --work (reused by the next run with the same --hours) until --clean.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# ──────────────────────────────────────────────────────────────────────────────────────────────
# SETTINGS
# ──────────────────────────────────────────────────────────────────────────────────────────────
REPO = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/findpeople_search_scale")  # synthetic indexes, one folder per --hours
DIM = 512  # embedding values (ArcFace)
TRACKS_PER_HOUR = 2000  # one synthetic video file per hour
LOOK_RANGE = (1, 15)  # looks per track, uniform: mean 8, so 16,000 looks per hour
FACES_PER_LOOK = 4  # faces in processed frames that were not recognised, per look (never read)
PEOPLE = 10
PHOTOS_PER_PERSON = 2
PLANTED_TRACKS_PER_PERSON = 20
PLANTED_LOOK_RANGE = (5, 15)  # looks per planted track: enough for MIN_TRACK_HITS agreeing ones
LOOK_SIMILARITY = 0.67  # mean cosine between two looks of one track (shared clips: 0.67-0.69)
TRUE_SIMILARITY = 0.46  # mean cosine between a planted look and its person's photo (shared clips'
# named tracks with buffalo_sc_int8: mean 0.42, 90th percentile 0.46: a clear shot)
THRESHOLD = 0.60  # CUSTOM_THRESHOLD, cosine distance (main.py's default); --threshold changes it
MATCH_MARGIN = 0.05  # main.py's default
MIN_TRACK_HITS = 2  # main.py's default
UNIQUE_HOURS = 100  # hours generated; past them an hour is a hard link to one of the generated
# hours without a planted track (a distinct file, indexed, cached and searched as its own video),
# which keeps a 1,000-hour build at about half an hour here
PLANTED_HOURS = 50  # the planted tracks are spread over the first 50 hours
SEARCHES = 3  # timed searches after the warm-up; search_s is their median
BUILD_PROCESSES = 2
SEED = 12
# ──────────────────────────────────────────────────────────────────────────────────────────────

sys.path.insert(0, str(REPO))
from findpeople.index import index_path, index_table, write_index  # noqa: E402


def unit_rows(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Return rows random unit vectors [rows, DIM] float32."""
    values = rng.standard_normal((rows, DIM), dtype=np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def mix(base: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
    """Return unit vectors with cosine ~weight to each base row (base*weight + random*rest)."""
    mixed = weight * base + np.sqrt(1 - weight ** 2) * unit_rows(rng, len(base))
    return mixed / np.linalg.norm(mixed, axis=1, keepdims=True)


def people_and_photos(rng: np.random.Generator) -> tuple:
    """Return (identities [PEOPLE, DIM], photos [PEOPLE*PHOTOS_PER_PERSON, DIM], photo owners).

    A photo and a look are each an identity mixed with noise: look = mix(mix(identity, a), b),
    photo = mix(identity, a), so look-to-look ~ b^2 and photo-to-look ~ a^2 b.
    """
    identities = unit_rows(rng, PEOPLE)
    owners = np.repeat(np.arange(PEOPLE), PHOTOS_PER_PERSON)
    photos = mix(identities[owners], identity_weight(), rng)
    return identities, photos, owners


def identity_weight() -> float:
    """Return a: the cosine of a track centre (or photo) to its person's identity."""
    return float(np.sqrt(TRUE_SIMILARITY / np.sqrt(LOOK_SIMILARITY)))


def synthetic_video(hour: int, planted: dict, identities: np.ndarray, photos: np.ndarray,
                    owners: np.ndarray) -> tuple:
    """Return (faces, looks, tracks with a look within THRESHOLD) of one synthetic hour;
    planted: {track number: person}."""
    rng = np.random.default_rng([SEED, hour])
    counts = rng.integers(LOOK_RANGE[0], LOOK_RANGE[1] + 1, TRACKS_PER_HOUR)
    centres = unit_rows(rng, TRACKS_PER_HOUR)
    if planted:
        tracks = np.array(sorted(planted))
        counts[tracks] = rng.integers(PLANTED_LOOK_RANGE[0], PLANTED_LOOK_RANGE[1] + 1, len(tracks))
        centres[tracks] = mix(identities[[planted[t] for t in tracks]], identity_weight(), rng)
    track_id = np.repeat(np.arange(TRACKS_PER_HOUR, dtype=np.int32), counts)
    embeddings = mix(centres[track_id], float(np.sqrt(LOOK_SIMILARITY)), rng)
    near = brute_force_truth(track_id, embeddings.astype(np.float16).astype(np.float32), photos, owners)
    first_frame = rng.integers(0, 25 * 3600 - 2000, TRACKS_PER_HOUR)
    steps = rng.integers(1, 5, len(track_id)) * (FACES_PER_LOOK + 1)
    offsets = np.cumsum(steps) - np.repeat(np.cumsum(steps)[np.cumsum(counts) - counts], counts)
    look_frames = first_frame[track_id] + offsets
    looks = {"track_id": track_id, "frame_idx": look_frames, "embedding": embeddings,
             "kps": rng.uniform(0, 1000, (len(track_id), 5, 2)).astype(np.float32),
             "face_size_px": rng.uniform(32, 200, len(track_id)).astype(np.float32)}
    face_frames = (look_frames[:, None] + np.arange(FACES_PER_LOOK + 1)[None, :]).reshape(-1)
    face_tracks = np.repeat(track_id, FACES_PER_LOOK + 1)
    corner = rng.uniform(0, 1700, (len(face_frames), 2)).astype(np.float32)
    faces = {"track_id": face_tracks, "frame_idx": face_frames, "time_s": face_frames / 25.0,
             "box": np.concatenate([corner, corner + 80], axis=1),
             "score": rng.uniform(0.3, 0.95, len(face_frames)).astype(np.float32)}
    return faces, looks, near


def brute_force_truth(track_id: np.ndarray, embeddings: np.ndarray, photos: np.ndarray,
                      owners: np.ndarray) -> list:
    """Return [track, person named or -1] of every track with a look within THRESHOLD, matching
    every look (the stored float16 values) with naming.person_distances and evaluate_evidence."""
    from findpeople.naming import evaluate_evidence, person_distances
    close = np.unique(track_id[(embeddings @ photos.T).max(axis=1) >= 1 - THRESHOLD - 1e-4])
    truth = []
    for track in close:
        rows = person_distances(embeddings[track_id == track], photos, owners, PEOPLE)
        if rows.min() <= THRESHOLD:
            person = evaluate_evidence(rows, THRESHOLD, MATCH_MARGIN, MIN_TRACK_HITS)[0]
            truth.append([int(track), -1 if person is None else int(person)])
    return truth


def build_hour(job: tuple) -> tuple:
    """Write one synthetic hour's index; return (file name, brute_force_truth)."""
    folder, hour, planted, identities, photos, owners, threshold = job
    set_threshold(threshold)  # a spawned process starts from the settings block
    faces, looks, near = synthetic_video(hour, planted, identities, photos, owners)
    name = hour_name(hour).removesuffix(".parquet")
    metadata = {"format": 1, "video": {"synthetic": hour}, "models": {}, "settings": {},
                "execution": {}, "video_facts": {"name": f"{name}.mp4", "output_name": name,
                                                 "duration_s": 3600.0, "fps": 25.0}}
    write_index(index_path(folder, name), index_table(faces, looks, metadata))
    return hour_name(hour), near


def plant(hours: int, rng: np.random.Generator) -> dict:
    """Return {hour: {track number: person}} for the planted tracks, spread at random."""
    planted = {}
    slots = rng.choice(hours * TRACKS_PER_HOUR, PEOPLE * PLANTED_TRACKS_PER_PERSON, replace=False)
    for i, slot in enumerate(slots):
        planted.setdefault(int(slot) // TRACKS_PER_HOUR, {})[int(slot) % TRACKS_PER_HOUR] = i % PEOPLE
    return planted


def hour_name(hour: int) -> str:
    """Return the index file name of a synthetic hour."""
    return f"hour_{hour:05d}.parquet"


def source_hour(hour: int) -> int:
    """Return the generated hour an hour's file is (itself below UNIQUE_HOURS; past it, one of
    the hours PLANTED_HOURS..UNIQUE_HOURS-1, which hold no planted track)."""
    if hour < UNIQUE_HOURS:
        return hour
    return PLANTED_HOURS + (hour - UNIQUE_HOURS) % (UNIQUE_HOURS - PLANTED_HOURS)


def generate(hours: list, folder: Path, planted: dict, people: tuple) -> dict:
    """Write the generated hours' files in folder (linking them from an earlier --hours build
    with the same seed and threshold when there is one); return {file name: truth}."""
    earlier = folder.parent.parent / f"hours_{UNIQUE_HOURS}" / folder.name
    if earlier != folder and (earlier / "truth.json").is_file():
        near = {}
        for f, t, p in json.loads((earlier / "truth.json").read_text())["near"]:
            near.setdefault(f, []).append([t, p])
        for hour in hours:
            os.link(earlier / hour_name(hour), folder / hour_name(hour))
        return {hour_name(h): near.get(hour_name(h), []) for h in hours}
    jobs = [(folder, h, planted.get(h, {}), *people, THRESHOLD) for h in hours]
    with multiprocessing.get_context("spawn").Pool(BUILD_PROCESSES) as pool:
        return dict(pool.imap_unordered(build_hour, jobs, chunksize=4))


def build(hours: int, folder: Path) -> dict:
    """Build the synthetic index of `hours` hours in folder; return what the search must find."""
    rng = np.random.default_rng(SEED)
    people = people_and_photos(rng)
    planted = plant(min(hours, PLANTED_HOURS), rng)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    near = generate(list(range(min(hours, UNIQUE_HOURS))), folder, planted, people)
    for hour in range(UNIQUE_HOURS, hours):  # the same file under another name: a distinct video
        os.link(folder / hour_name(source_hour(hour)), folder / hour_name(hour))
        near[hour_name(hour)] = near[hour_name(source_hour(hour))]
    build_s = time.perf_counter() - started
    from findpeople.search import update_templates
    started = time.perf_counter()
    update_templates(folder)  # part of indexing: the search cache of every file
    truth = {"photos": people[1].tolist(), "owners": people[2].tolist(),
             "planted": [[hour_name(h), t, p] for h, tracks in planted.items() for t, p in tracks.items()],
             "near": [[name, t, p] for name, tracks in sorted(near.items()) for t, p in tracks],
             "build_s": build_s, "cache_s": time.perf_counter() - started}
    (folder / "truth.json").write_text(json.dumps(truth))
    return truth


def folder_bytes(folder: Path) -> int:
    """Return the bytes of the files in folder."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def peak_rss_mib() -> float:
    """Return this process's peak resident memory in MiB: VmHWM on Linux (getrusage's maxrss
    would include the parent's size when it forked this process), else maxrss (-1 on Windows)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    try:
        import resource
    except ImportError:  # Windows
        return -1.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def named_tracks(found: list) -> dict:
    """Return {(index file name, track): person} for the tracks the naming rules name."""
    from findpeople.naming import evaluate_evidence
    named = {}
    for track in found:
        person = evaluate_evidence(track.distances, THRESHOLD, MATCH_MARGIN, MIN_TRACK_HITS)[0]
        if person is not None:
            named[(track.index_file.name, track.track_id)] = person
    return named


def search_child(folder: Path) -> None:
    """Open the index in folder, search it, print the results as JSON (run in a fresh process)."""
    from findpeople.search import open_templates, search_templates
    truth = json.loads((folder / "truth.json").read_text())
    photos, owners = np.array(truth["photos"], np.float32), np.array(truth["owners"])
    started = time.perf_counter()
    templates = open_templates(folder)
    open_s = time.perf_counter() - started
    times, named, found = [], {}, []
    for _ in range(SEARCHES + 1):
        started = time.perf_counter()
        found = search_templates(templates, photos, owners, PEOPLE, THRESHOLD)
        named = named_tracks(found)
        times.append(time.perf_counter() - started)
    print(json.dumps({"open_s": open_s, "warmup_s": times[0], "search_s": times[1:],
                      "tracks": len(templates.track_id), "returned": [[t.index_file.name, t.track_id]
                                                                      for t in found],
                      "named": [[f, t, p] for (f, t), p in named.items()],
                      "peak_rss_mib": peak_rss_mib(),
                      "load": [round(x, 1) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}))


def versions() -> str:
    """Return the machine and library versions."""
    import pyarrow
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"numpy {np.__version__}, pyarrow {pyarrow.__version__}")


def report(hours: int, folder: Path, truth: dict, result: dict) -> None:
    """Print the measurements, then the summary line last."""
    planted = {(f, t): p for f, t, p in truth["planted"]}
    named = {(f, t): p for f, t, p in result["named"]}
    near = {(f, t) for f, t, _ in truth["near"]}
    nameable = {(f, t): p for f, t, p in truth["near"] if p >= 0}
    returned = {tuple(x) for x in result["returned"]}
    found = sum(named.get(key) == person for key, person in planted.items())
    false = sum(planted.get(key) != person for key, person in named.items())
    print(f"[bench] {versions()}")
    cache = folder / "search_cache"
    print(f"[bench] {hours} h: {result['tracks']} tracks; index {folder_bytes(folder) / 2**30:.2f} GiB, "
          f"search cache {folder_bytes(cache) / 2**30:.2f} GiB on disk; built in {truth['build_s']:.0f} s, "
          f"search cache in {truth['cache_s']:.0f} s; opened (cache checked, mapped, template pages "
          f"read) in {result['open_s']:.2f} s; warm-up search {result['warmup_s']:.3f} s; load average "
          f"{result['load']}")
    print(f"[bench] brute force names {len(nameable)} tracks, {sum(nameable.get(k) == p for k, p in planted.items())}"
          f" of the {len(planted)} planted ones as their person")
    print(f"[bench] searches: {', '.join(f'{s:.3f}' for s in result['search_s'])} s; tracks with a "
          f"look within {THRESHOLD}: brute force {len(near)}, search returned {len(returned)}, "
          f"missed {len(near - returned)}, extra {len(returned - near)}")
    print(f"search_s={float(np.median(result['search_s'])):.3f} planted_found={found}/{len(planted)} "
          f"false_tracks={false} peak_rss_mib={result['peak_rss_mib']:.0f}")


def set_threshold(threshold: float) -> None:
    """Use another CUSTOM_THRESHOLD (the truth is built for it: its own folder)."""
    global THRESHOLD
    THRESHOLD = threshold


def main() -> int:
    """Build (or reuse) the synthetic index, search it in a fresh process, print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=int, default=100)
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="CUSTOM_THRESHOLD")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--clean", action="store_true", help="remove the synthetic index afterwards")
    parser.add_argument("--search-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threshold(args.threshold)
    if args.search_child:
        search_child(args.search_child)
        return 0
    folder = args.work / f"hours_{args.hours}" / f"threshold_{THRESHOLD:.2f}"
    truth_file = folder / "truth.json"
    truth = json.loads(truth_file.read_text()) if truth_file.is_file() else build(args.hours, folder)
    child = subprocess.run([sys.executable, __file__, "--search-child", str(folder),
                            "--threshold", str(THRESHOLD)],
                           capture_output=True, text=True, check=False)
    if child.returncode != 0:
        print(child.stderr, file=sys.stderr)
        return 1
    report(args.hours, folder, truth, json.loads(child.stdout.splitlines()[-1]))
    if args.clean:
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
