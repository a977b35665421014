"""Measure real face tracks for the index search: look-to-look similarity, the template slack,
and what float16 embeddings change.

    python bench/index_real_tracks.py     # about 2 minutes on a 2-core CPU machine

Runs main.py's detector, tracker and recognizer over the shared clips (every track kept, named or
not), writes each clip's track records as a real index (findpeople/index.py) under a temporary
folder, names them as a search does (findpeople/naming.py), reads them back, and prints:
  1. look-to-look cosine similarity within a track (what bench/search_scale.py plants), and the
     similarity of a named track's looks to its person's photos;
  2. the template slack: for every track with 2 or more looks and every query (each reference
     photo in refs/, refs_alt/, refs_distractors/, refs_same_event/, and every look of every other
     track), how far the best look's similarity exceeds the template's (findpeople.search), in
     absolute terms and as a ratio of the look's distance from the template (SLACK_PER_SPREAD);
  3. the largest change of a distance when the looks are stored as float16 instead of float32.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

# ──────────────────────────────────────────────────────────────────────────────────────────────
# SETTINGS
# ──────────────────────────────────────────────────────────────────────────────────────────────
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TESTDATA = SHARED / "testdata"
REF_FOLDERS = ("refs", "refs_alt", "refs_distractors", "refs_same_event")
RECOGNITION_INTERVALS = (1, 5)  # processed frames: every frame (most looks), and main.py's default
WORK = Path(tempfile.gettempdir()) / "findpeople_real_tracks"  # the clips' indexes (kept, small)
BASE_FLAGS = ["--model-root", str(SHARED), "--model-pack", "buffalo_sc_int8", "--providers", "cpu",
              "--custom-threshold", "0.70"]
# ──────────────────────────────────────────────────────────────────────────────────────────────

sys.path.insert(0, str(REPO))
import main  # noqa: E402  (importing main does nothing)
from findpeople.decode import decode_frames, probe_video  # noqa: E402
from findpeople.detect import detect_faces  # noqa: E402
from findpeople.index import (  # noqa: E402
    faces_with_boxes, index_metadata, read_index, records_table, table_index, write_index)
from findpeople.models import load_face_models  # noqa: E402
from findpeople.naming import name_video, person_distances  # noqa: E402
from findpeople.references import load_references, reference_matrix  # noqa: E402
from findpeople.search import track_templates, video_track_looks  # noqa: E402
from findpeople.tracks import VideoTracker, thumbnail  # noqa: E402
from findpeople.worker import WorkerContext  # noqa: E402


class RecordingTracker(VideoTracker):
    """A VideoTracker that keeps every ended track's record and its looks' float32 embeddings
    (the records carry them as float16, as the index stores them)."""

    def __init__(self, info, context):
        super().__init__(info, context, self.keep)
        self.records, self.exact = [], {}

    def keep(self, message) -> None:
        """Keep an ended track's record."""
        self.records.append(message[2])

    def end_tracks(self, tracks) -> None:
        """End the tracks as usual, one at a time, keeping each one's float32 embeddings."""
        for track in tracks:
            super().end_tracks([track])
            self.exact[track.track_id] = np.array([look[3] for look in track.looks], np.float32)


def track_persons(index, settings, references) -> dict:
    """Return {track_id: person index} of the tracks the references name in one video's index (a
    track split into pieces naming different people is left out)."""
    embeddings, owners = reference_matrix(references)
    people = [r.name for r in references]
    looks = video_track_looks(index, Path("clip.parquet"), embeddings, owners, len(people),
                              settings.CUSTOM_THRESHOLD)
    named = {}
    for summary in name_video(faces_with_boxes(index.faces), looks, people, settings):
        if summary["person"] is not None:  # (an unnamed piece is listed with debug_rec)
            named.setdefault(summary["track"], set()).add(summary["person"])
    return {track: persons.pop() for track, persons in named.items() if len(persons) == 1}


def index_clips(settings, models, references, folder: Path) -> list:
    """Track every clip, write its index under folder; return [(index path, {track: person},
    float32 embeddings in the index's look order)]."""
    written = []
    for idx, path in enumerate(sorted((TESTDATA / "videos").glob("*.mp4"))):
        info = probe_video(path, idx, path.stem)
        tracker = RecordingTracker(info, WorkerContext(settings, None, [info], models, None, None))
        for seq, (frame_idx, time_s, image) in enumerate(decode_frames(info, 1)):
            boxes, kps = detect_faces(models, [image], settings)[0]
            tracker.step(seq, frame_idx, time_s, image, boxes, kps, thumbnail(image))
        tracker.finish()
        table = records_table(tracker.records, index_metadata({"format": 1}, info))
        target = folder / f"{info.output_name}.parquet"
        write_index(target, table)
        exact = [tracker.exact[t] for t in sorted(tracker.exact) if len(tracker.exact[t])]
        written.append((target, track_persons(table_index(table), settings, references),
                        np.concatenate(exact) if exact else np.zeros((0, 512), np.float32)))
    return written


def query_vectors(models, settings) -> np.ndarray:
    """Return every reference photo's embedding (all reference folders) [photos, 512]."""
    found = []
    for name in REF_FOLDERS:
        references, _, _ = load_references(TESTDATA / name, models, settings)
        found += [r.embeddings for r in references]
    return np.concatenate(found).astype(np.float32)


def template_excess(tracks: list, photos: np.ndarray) -> list:
    """Return per query kind ("photo", "look") rows of (best look similarity, its excess over the
    template's similarity, the track's spread) for every track with 2 or more looks and every
    query (a look is never a query for its own track)."""
    rows = {"photo": [], "look": []}
    for i, looks in enumerate(tracks):
        if len(looks) < 2:
            continue
        made = track_templates(np.zeros(len(looks), np.int32), looks)
        template = (made["codes"][0].astype(np.float32) - 128) * made["scale"][0]
        others = np.concatenate([tracks[j] for j in range(len(tracks)) if j != i])
        for kind, queries in (("photo", photos), ("look", others)):
            best = (queries @ looks.T).max(axis=1)
            rows[kind].append(np.stack([best, best - queries @ template,
                                        np.full(len(best), made["spread"][0])], axis=1))
    return {kind: np.concatenate(found) for kind, found in rows.items()}


def slack_stats(excess: dict, needed: float) -> str:
    """Return, per query kind, the pairs whose best look reaches `needed` (a match at threshold
    1 - needed) and the largest excess and excess/spread among them."""
    parts = []
    for kind, rows in excess.items():
        match = rows[rows[:, 0] >= needed]
        if len(match) == 0:
            parts.append(f"{kind}: 0 matching pairs")
            continue
        parts.append(f"{kind}: {len(match)} matching pairs of {len(rows)}, excess max "
                     f"{match[:, 1].max():.3f}, excess/spread max {(match[:, 1] / match[:, 2]).max():.3f}")
    return "; ".join(parts)


def similarity_stats(tracks: list) -> dict:
    """Return percentiles of look-to-look cosine similarity within tracks."""
    values = np.concatenate([(looks @ looks.T)[np.triu_indices(len(looks), 1)]
                             for looks in tracks if len(looks) >= 2])
    adjacent = np.concatenate([np.sum(looks[1:] * looks[:-1], axis=1)
                               for looks in tracks if len(looks) >= 2])
    return {"pairs": len(values), "mean": float(values.mean()),
            "p5": float(np.percentile(values, 5)), "p50": float(np.median(values)),
            "min": float(values.min()), "adjacent_mean": float(adjacent.mean())}


def report(interval: int, written: list, references, photos: np.ndarray) -> None:
    """Print the measurements of one recognition interval."""
    tracks, true_sims = [], []
    embeddings, owners = reference_matrix(references)
    for path, persons, _ in written:
        index = read_index(path)
        ids, looks = index.looks["track_id"], index.looks["embedding"]
        for track_id in np.unique(ids):
            mine = looks[ids == track_id]
            tracks.append(mine)
            person = persons.get(int(track_id))
            if person is not None:
                true_sims.append(1 - person_distances(mine, embeddings, owners, len(references))[:, person])
    sims = similarity_stats(tracks)
    excess = template_excess(tracks, photos)
    truth = np.concatenate(true_sims) if true_sims else np.zeros(1)
    print(f"RECOGNITION_INTERVAL={interval}: {len(tracks)} tracks, {sum(map(len, tracks))} looks")
    print(f"  look-to-look similarity: {sims}")
    print(f"  named tracks' looks vs their person's closest photo: mean {truth.mean():.3f}, "
          f"p10 {np.percentile(truth, 10):.3f}, p90 {np.percentile(truth, 90):.3f}, max {truth.max():.3f}")
    everything = np.concatenate(list(excess.values()))
    print(f"  template excess over all pairs: max {everything[:, 1].max():.3f}, excess/spread max "
          f"{(everything[:, 1] / everything[:, 2]).max():.3f}; spread median "
          f"{np.median(everything[:, 2]):.3f}")
    for needed in (0.3, 0.4):
        print(f"  template excess, pairs with a look at similarity >= {needed}: {slack_stats(excess, needed)}")


def float16_error(written: list, photos: np.ndarray) -> float:
    """Return the largest |distance(float16 look) - distance(float32 look)| over looks x photos."""
    worst = 0.0
    for path, _, exact in written:
        stored = read_index(path).looks["embedding"]  # float16 values, as float32
        worst = max(worst, float(np.abs(stored @ photos.T - exact @ photos.T).max(initial=0)))
    return worst


def run() -> None:
    """Measure and print."""
    import onnxruntime
    import pyarrow
    print(f"numpy {np.__version__}, pyarrow {pyarrow.__version__}, onnxruntime {onnxruntime.__version__}")
    settings = main.load_settings(BASE_FLAGS)
    models = load_face_models(settings, "cpu", 1)
    photos = query_vectors(models, settings)
    references, _, _ = load_references(TESTDATA / "refs", models, settings)
    print(f"{len(photos)} reference photos as queries")
    WORK.mkdir(parents=True, exist_ok=True)
    np.save(WORK / "photos.npy", photos)
    for interval in RECOGNITION_INTERVALS:
        flags = BASE_FLAGS + ["--recognition-interval", str(interval), "--output", str(WORK / "output")]
        settings = main.load_settings(flags)
        written = index_clips(settings, models, references, WORK / f"ri{interval}")
        report(interval, written, references, photos)
        print(f"  float16 storage: largest distance change {float16_error(written, photos):.2e}")


if __name__ == "__main__":
    run()
