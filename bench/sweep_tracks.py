"""Sweep the face-track settings on the shared clips: recognitions needed vs recall and precision.

    python bench/sweep_tracks.py     # about 2 minutes on a 2-core CPU machine

Detects every frame once, then replays main.py's VideoTracker over the same detections for each
setting value (one setting changed at a time from main.py's defaults), with embeddings cached per
face, so each row costs the tracker only. Prints recognitions (the expensive part), recall,
precision and named tracks, and writes bench/sweep_tracks.json. This is how the defaults of
MIN_FACE_SIZE, MATCH_MARGIN, MIN_TRACK_HITS and RECOGNITION_INTERVAL were chosen.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

# ──────────────────────────────────────────────────────────────────────────────────────────────
# SETTINGS
# ──────────────────────────────────────────────────────────────────────────────────────────────
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TESTDATA = SHARED / "testdata"
BASE_FLAGS = ["--model-root", str(SHARED), "--model-pack", "buffalo_sc_int8",
              "--custom-threshold", "0.70"]
SWEEP = {  # setting -> values tried (the others stay at main.py's defaults)
    "MIN_FACE_SIZE": [0, 20, 32, 48],
    "MATCH_MARGIN": [0.0, 0.05, 0.1, 0.15],
    "MIN_TRACK_HITS": [1, 2, 3, 4],
    "RECOGNITION_INTERVAL": [1, 3, 5, 10, 20],
}
RESULTS = REPO / "bench" / "sweep_tracks.json"
# ──────────────────────────────────────────────────────────────────────────────────────────────

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import main  # noqa: E402
import scoring  # noqa: E402
from findpeople.settings import flag_name  # noqa: E402
from findpeople.decode import decode_frames, probe_video  # noqa: E402
from findpeople.detect import align_face, detect_faces, embed_faces  # noqa: E402
from findpeople.models import load_face_models  # noqa: E402
from findpeople.index import faces_with_boxes, records_table, table_index  # noqa: E402
from findpeople.naming import name_video  # noqa: E402
from findpeople.references import load_references, reference_matrix  # noqa: E402
from findpeople.search import video_track_looks  # noqa: E402
from findpeople.tracks import VideoTracker, thumbnail  # noqa: E402
from findpeople.worker import WorkerContext  # noqa: E402


class CachedTracker(VideoTracker):
    """A VideoTracker whose recognizer answers from a cache keyed by (video, frame, face index)."""

    cache: dict = {}

    def __init__(self, info, context, emit):
        super().__init__(info, context, emit)
        self.seq, self.calls = 0, 0

    def look(self, image, kps, d):
        """Return (cache key, aligned crop) of face d in this frame."""
        key = (self.info.idx, self.seq, d)
        return key, (None if key in self.cache else align_face(image, kps[d]))

    def recognise_looks(self, looks):
        """Return the embeddings of the looks, computing each face only once."""
        self.calls += len(looks)
        for key, crop in looks:
            if key not in self.cache:
                self.cache[key] = embed_faces(self.context.models, [crop], 1)[0]
        return np.stack([self.cache[key] for key, _ in looks])


def named_tracks(messages: list, settings, embeddings, owners, people: list) -> list:
    """Return the named track summaries of one clip's ("track", video_idx, record) messages, as a
    run finds them: index table, every look matched with the photos, the naming rules."""
    index = table_index(records_table([record for _, _, record in messages], {"counts": {}}))
    looks = video_track_looks(index, Path("clip.parquet"), embeddings, owners, len(people),
                              settings.CUSTOM_THRESHOLD)
    return name_video(faces_with_boxes(index.faces), looks, people, settings)


def load_clips(settings, models) -> list:
    """Return per clip (info, frames [(frame_idx, time_s, image, boxes, kps, thumb)])."""
    clips = []
    for idx, path in enumerate(sorted((TESTDATA / "videos").glob("*.mp4"))):
        info = probe_video(path, idx, path.stem)
        frames = []
        for frame_idx, time_s, image in decode_frames(info, 1):
            boxes, kps = detect_faces(models, [image], settings)[0]
            frames.append((frame_idx, time_s, image, boxes, kps, thumbnail(image)))
        clips.append((info, frames))
    return clips


def replay(clips: list, settings, models, references) -> dict:
    """Run the tracker over every clip; return recognitions, named tracks and quality."""
    truth = json.loads((TESTDATA / "ground_truth.json").read_text())
    embeddings, owners = reference_matrix(references)
    people = [r.name for r in references]
    recognitions, named, counts = 0, 0, []
    for info, frames in clips:
        context = WorkerContext(settings, None, [info], models, None, None)
        messages = []
        tracker = CachedTracker(info, context, messages.append)
        for seq, (frame_idx, time_s, image, boxes, kps, thumb) in enumerate(frames):
            tracker.seq = seq
            tracker.step(seq, frame_idx, time_s, image, boxes, kps, thumb)
        tracker.finish()
        recognitions += tracker.calls
        found = {}
        for track in named_tracks(messages, settings, embeddings, owners, people):
            named += 1
            found.setdefault(track["name"], set()).update(f[0] for f in track["frames"])
        times = {frame_idx: time_s for frame_idx, time_s, *_ in frames}
        counts.append(scoring.score_video(times, found, truth[Path(info.path).name]))
    quality = scoring.summarize(scoring.merge_counts(*counts))
    total = scoring.merge_counts(*counts)
    tp = sum(c["tp"] for c in total.values())
    fp = sum(c["fp"] for c in total.values())
    fn = sum(c["fn"] for c in total.values())
    return {"recognitions": recognitions, "named_tracks": named,
            "recall": round(tp / (tp + fn), 3) if tp + fn else None,
            "precision": round(tp / (tp + fp), 3) if tp + fp else None,
            "per_person": {p: {k: q[k] for k in ("tp", "fp", "fn")} for p, q in quality.items()}}


def main_sweep() -> list:
    """Return one row per setting value tried."""
    workdir = REPO / "bench" / "_work" / "sweep"
    base = main.load_settings(BASE_FLAGS + ["--output", str(workdir)])
    models = load_face_models(base, "cpu", 2)
    refs = REPO / "bench" / "_work" / "refs"
    if not refs.is_dir():
        raise SystemExit("run bench/bench.py once first: it links the reference photos")
    references, _, _ = load_references(refs, models, base)
    clips = load_clips(base, models)
    faces = sum(len(boxes) for _, frames in clips for _, _, _, boxes, _, _ in frames)
    print(f"{faces} faces detected in {sum(len(f) for _, f in clips)} frames: the naive loop "
          f"recognises every one of them")
    rows = []
    for name, values in SWEEP.items():
        for value in values:
            settings = main.load_settings(BASE_FLAGS + ["--output", str(workdir),
                                                        flag_name(name), str(value)])
            row = {"setting": name, "value": value,
                   **replay(clips, settings, models, references)}
            rows.append(row)
            print(f"{name:<22} {value!s:>6}  recognitions {row['recognitions']:>5}  "
                  f"recall {row['recall']}  precision {row['precision']}  "
                  f"named tracks {row['named_tracks']}", flush=True)
    return rows


if __name__ == "__main__":
    rows = main_sweep()
    RESULTS.write_text(json.dumps(rows, indent=1))
    print(f"wrote {RESULTS}")
