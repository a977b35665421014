"""Unnamed people: the face tracks no reference named, grouped into people across every video.

Runs in the parent after a search. In: each searched video's index file and the ids of its
tracks a reference named. Out: `UnnamedPerson` groups (a stable id, tracks, screen time, videos
and time ranges, the best face) for results.json, index.html and `--name-person`, and a face
crop per group in OUTPUT_DIR/unnamed_people/.

How: a track is left out when it is too small or too short to be reliable (UNNAMED_MIN_FACE_SIZE,
UNNAMED_MIN_LOOKS); each other track is its template (the normalised mean of its looks'
embeddings), and the templates are grouped by average-linkage hierarchical clustering on cosine
distance, cut at GROUP_DISTANCE (scipy.cluster.hierarchy), run on each set of tracks linked by
pairs closer than the cut (found by blocked products: time grows with the square of the tracks
kept, memory with the largest set). Groups of fewer than UNNAMED_MIN_TRACKS tracks are dropped.
"""
from __future__ import annotations

import hashlib
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInput
from .settings import Settings
from .outputs import padded_box, safe_file_name, write_bytes_atomic
from .references import label_key, list_reference_photos, reference_label
from .tracks import frontal_score
from .index import open_index, read_look_rows


# Cosine distance between track templates (average linkage) under which two tracks are one
# person. On the shared clips (buffalo_sc_int8) Barack Obama's tracks in two videos were 0.55
# apart, and no two tracks of different people came closer than 0.65.
GROUP_DISTANCE = 0.60
CROP_PADDING_PERCENTAGE = 60  # the face crop saved per group: room around the face for a detector
SNAPSHOT_FOLDER = "unnamed_people"  # OUTPUT_DIR/unnamed_people/<id>.jpg


@dataclass
class TrackSummary:
    """One unnamed track that is large and long enough to be grouped."""

    video: int  # position in the run's videos
    track_id: int
    template: np.ndarray  # [dim] normalised mean of its looks
    first_s: float  # its first look's time
    last_s: float  # its last look's time
    best: tuple  # (quality, time_s, box [4]) of its largest, most frontal look


@dataclass
class UnnamedPerson:
    """A group of unnamed tracks: one person nobody named."""

    id: str
    tracks: list = field(default_factory=list)  # TrackSummary, in (video, track) order
    snapshot: str | None = None  # OUTPUT_DIR-relative path of its best face crop

    def ranges(self, video: int, frame_s: float, gap_s: float) -> list:
        """Return [(start_s, end_s)] of its tracks in one video, those closer than gap_s merged."""
        spans = sorted((t.first_s, t.last_s + frame_s) for t in self.tracks if t.video == video)
        merged = []
        for start, end in spans:
            if merged and start - merged[-1][1] < gap_s:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return [tuple(r) for r in merged]


def video_tracks(path: Path, video: int, named: set, settings: Settings) -> list:
    """Return the TrackSummary of every track in an index file that is not in named and has at
    least UNNAMED_MIN_LOOKS looks, its largest at least UNNAMED_MIN_FACE_SIZE px."""
    parquet, metadata = open_index(path)
    with closing(parquet):
        looks = read_look_rows(parquet, 0, metadata["look_count"],
                               ("track_id", "time_s", "kps", "face_size_px", "embedding",
                                "x1", "y1", "x2", "y2"))  # looks come first: their face rows
    if len(looks["track_id"]) == 0:
        return []
    bounds = np.flatnonzero(np.r_[True, np.diff(looks["track_id"]) != 0, True])
    found = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        track_id, sizes = int(looks["track_id"][a]), looks["face_size_px"][a:b]
        if track_id in named or b - a < settings.UNNAMED_MIN_LOOKS \
                or sizes.max() < settings.UNNAMED_MIN_FACE_SIZE:
            continue
        template = looks["embedding"][a:b].astype(np.float64).mean(axis=0)
        quality = [float(sizes[i]) * (0.5 + frontal_score(looks["kps"][a + i].reshape(5, 2)))
                   for i in range(b - a)]
        i = a + int(np.argmax(quality))
        box = [float(looks[k][i]) for k in ("x1", "y1", "x2", "y2")]
        found.append(TrackSummary(video, track_id, template / np.linalg.norm(template),
                                  float(looks["time_s"][a]), float(looks["time_s"][b - 1]),
                                  (max(quality), float(looks["time_s"][i]), box)))
    return found


def group_tracks(tracks: list, min_tracks: int, video_keys: list | None = None) -> list:
    """Return the UnnamedPerson groups of these tracks (average linkage, cosine distance, cut at
    GROUP_DISTANCE) with at least min_tracks tracks each.

    Two groups can only merge below the cut if some pair of their tracks is closer than it, so
    the clustering runs on each connected component of the "closer than the cut" graph
    (close_pairs) alone: the same groups as over all tracks at once, in memory that grows with
    the largest component instead of with all tracks squared."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    if not tracks:
        return []
    video_keys = video_keys or [str(v) for v in range(max(t.video for t in tracks) + 1)]
    templates = np.stack([t.template for t in tracks]).astype(np.float32)
    first, second = close_pairs(templates, 1.0 - GROUP_DISTANCE)
    graph = coo_matrix((np.ones(len(first)), (first, second)), shape=(len(tracks),) * 2)
    _, component = connected_components(graph, directed=False)
    order = np.argsort(component, kind="stable")
    bounds = np.flatnonzero(np.r_[True, np.diff(component[order]) != 0, True])
    groups = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        members = order[a:b]
        labels = np.ones(len(members), int) if len(members) == 1 else fcluster(
            linkage(templates[members].astype(np.float64), method="average", metric="cosine"),
            t=GROUP_DISTANCE, criterion="distance")
        for label in np.unique(labels):
            chosen = [tracks[i] for i in members[labels == label]]
            if len(chosen) >= min_tracks:
                groups.append(UnnamedPerson(group_id(chosen, video_keys), chosen))
    return unique_ids(groups)


def close_pairs(templates: np.ndarray, min_similarity: float, block: int = 2048) -> tuple:
    """Return (i, j) with i < j of the templates whose cosine similarity is at least
    min_similarity, a block of rows at a time (float32 products: memory block x tracks)."""
    found_i, found_j = [], []
    for start in range(0, len(templates), block):
        similarity = templates[start:start + block] @ templates.T
        rows, cols = np.nonzero(similarity >= min_similarity - 1e-6)
        keep = cols > rows + start
        found_i.append(rows[keep] + start)
        found_j.append(cols[keep])
    return np.concatenate(found_i), np.concatenate(found_j)


def group_id(members: list, video_keys: list) -> str:
    """Return a group's id: P and 8 hex digits of its first track's video content and track id
    (by that key): the same from one search to the next while that track stays in the group,
    whatever other videos are added or removed."""
    first = min(f"{video_keys[t.video]}:{t.track_id}" for t in members)
    return "P" + hashlib.sha1(first.encode()).hexdigest()[:8]


def unique_ids(people: list) -> list:
    """Give a group whose id another group already has (two first tracks whose keys hash alike)
    a suffix: -2, -3, ..., in the order of their first tracks' keys."""
    seen = {}
    for person in sorted(people, key=lambda p: p.id):
        seen[person.id] = seen.get(person.id, 0) + 1
        if seen[person.id] > 1:
            person.id = f"{person.id}-{seen[person.id]}"
    return people


def screen_time_s(person: UnnamedPerson, videos: list, gap_s: float) -> float:
    """Return how long a group is on screen, its ranges summed over every video."""
    return sum(end - start for v, info in enumerate(videos)
               for start, end in person.ranges(v, frame_seconds(info), gap_s))


def frame_seconds(info) -> float:
    """Return one frame's duration in s (25 fps when the video has no rate)."""
    return 1 / info.fps if info.fps > 0 else 0.04


def unnamed_people(index_files: list, named: list, videos: list, settings: Settings,
                   video_keys: list | None = None) -> tuple:
    """Return (the unnamed people of a run's searched videos, most screen time first; problems).

    index_files[v] and named[v] (a set of track ids) belong to videos[v] (VideoInfo); a video
    without an index file (None) is left out, and so is one whose index cannot be read (a
    problem naming it). video_keys[v]: what identifies the video's content, for stable ids."""
    tracks, problems = [], []
    for v, (path, named_ids) in enumerate(zip(index_files, named)):
        if path is None:
            continue
        try:
            tracks += video_tracks(path, v, named_ids, settings)
        except BadInput as error:  # a damaged index: that video's faces are not grouped
            problems.append(f"{error} (its unnamed faces were not grouped)")
    keys = video_keys or [Path(v.path).name for v in videos]
    people = group_tracks(tracks, settings.UNNAMED_MIN_TRACKS, keys)
    gap_s = settings.MERGE_GAP_TOLERANCE
    return sorted(people, key=lambda p: (-screen_time_s(p, videos, gap_s), p.id)), problems


def people_report(people: list, videos: list, settings: Settings) -> list:
    """Return results.json's "unnamed_people": id, tracks, screen time, snapshot, and per video
    its file and time ranges."""
    gap_s = settings.MERGE_GAP_TOLERANCE
    report = []
    for person in people:
        shown = sorted({t.video for t in person.tracks})
        report.append({"id": person.id, "tracks": len(person.tracks),
                       "screen_time_s": round(screen_time_s(person, videos, gap_s), 3),
                       "snapshot": person.snapshot,
                       "videos": [{"file": videos[v].path, "ranges": [
                           {"start": round(s, 3), "end": round(e, 3)}
                           for s, e in person.ranges(v, frame_seconds(videos[v]), gap_s)]}
                           for v in shown]})
    return report


def save_best_faces(people: list, videos: list, output_dir: Path, frames_at) -> list:
    """Write each group's best face (its best track's best look, padded) as
    OUTPUT_DIR/unnamed_people/<id>.jpg and set its snapshot; return the problems (a video
    whose frame could not be decoded again)."""
    import cv2
    problems, wanted = [], {}
    for person in people:
        best = max(person.tracks, key=lambda t: t.best[0])
        wanted.setdefault(best.video, []).append((person, best.best))
    for v, items in wanted.items():
        try:
            frames = frames_at(videos[v], [look[1] for _, look in items])
        except Exception as error:
            problems.append(f"{videos[v].path}: the best faces of unnamed people could not be "
                            f"decoded again ({type(error).__name__}: {error})")
            continue
        for person, (_, time_s, box) in items:
            image = frames.get(time_s)
            if image is None:
                continue
            x1, y1, x2, y2 = padded_box(box, CROP_PADDING_PERCENTAGE, image.shape[1], image.shape[0])
            ok, data = cv2.imencode(".jpg", image[y1:y2 + 1, x1:x2 + 1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            if ok:
                write_bytes_atomic(output_dir / SNAPSHOT_FOLDER / f"{person.id}.jpg", data.tobytes())
                person.snapshot = f"{SNAPSHOT_FOLDER}/{person.id}.jpg"
    remove_other_faces(output_dir / SNAPSHOT_FOLDER, {p.id for p in people})
    return problems


def remove_other_faces(folder: Path, kept: set) -> None:
    """Remove the face crops of groups an earlier search found and this one did not (only files
    named as this module names them: P and 8 hex digits)."""
    import re
    if folder.is_dir():
        for path in folder.iterdir():
            if re.fullmatch(r"P[0-9a-f]{8}(-\d+)?\.jpg", path.name) and path.stem not in kept:
                path.unlink(missing_ok=True)


def read_last_people(output_dir: Path) -> list:
    """Return "unnamed_people" of the last search's results.json in OUTPUT_DIR; raise BadInput
    when there is none (no search yet, or one from before this feature)."""
    import json
    path = Path(output_dir) / "results.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"no search in {output_dir} yet ({path} is missing): run python main.py "
                       f"first") from None
    except (OSError, ValueError) as error:
        raise BadInput(f"{path} cannot be read ({error}): run python main.py again") from None
    if not isinstance(report, dict) or not isinstance(report.get("unnamed_people"), list):
        raise BadInput(f"{path} lists no unnamed people (its search was interrupted, or made by "
                       f"an older version): run python main.py again")
    return report["unnamed_people"]


def people_table(people: list) -> str:
    """Return the unnamed people as a table: id, screen time, tracks, videos (and how to name one)."""
    if not people:
        return "no unnamed people: every face large and long enough to group was named"
    lines = [f"{'id':<8} {'screen time':>11} {'tracks':>6}  videos"]
    for person in people:
        videos = ", ".join(f"{Path(v['file']).name} ({len(v['ranges'])})" for v in person["videos"])
        lines.append(f"{person['id']:<8} {person['screen_time_s']:>10.1f}s {person['tracks']:>6}  {videos}")
    lines.append(f"name one: python main.py --name-person {people[0]['id']}=First_Last")
    return "\n".join(lines)


def parse_name_spec(spec: str) -> tuple:
    """Return (id, name) of --name-person ID=Name; raise BadInput for a malformed one or a name
    that cannot be a file name."""
    person_id, _, name = spec.partition("=")
    person_id, name = person_id.strip(), name.strip()
    if not person_id or not name:
        raise BadInput(f"--name-person {spec!r}: write it as ID=Name, e.g. --name-person "
                       f"P1a2b3c4d=Barack_Obama (python main.py --people lists the ids)")
    if safe_file_name(name) != name or name in (".", "..") or name.startswith(".") \
            or name != name.strip(". "):
        raise BadInput(f"--name-person: {name!r} cannot be a file name: use letters, digits, "
                       f"'_' and '-' (e.g. First_Last)")
    return person_id, name


def same_person_label(reference_dir: Path, name: str) -> str | None:
    """Return the label of the person in reference_dir that Name.jpg would add photos to (see
    references.scan_reference_folder), or None."""
    if not reference_dir.is_dir():
        return None
    wanted = label_key(reference_label(Path(f"{name}.jpg"), Path(".")))
    return next((label for label in list_reference_photos(reference_dir)
                 if label_key(label) == wanted), None)


def save_person_photo(output_dir: Path, reference_dir: Path, spec: str) -> Path:
    """Copy unnamed person ID's best face (from the last search) to REFERENCE_DIR/Name.jpg;
    return its path. Raise BadInput, changing nothing, for an unknown id, a bad name, an
    existing photo of that name, or a face crop that is missing."""
    import shutil
    person_id, name = parse_name_spec(spec)
    people = {p["id"]: p for p in read_last_people(output_dir)}
    if person_id not in people:
        known = ", ".join(sorted(people)) or "none"
        raise BadInput(f"--name-person: no unnamed person {person_id} in the last search "
                       f"(known: {known}); python main.py --people lists them")
    target = Path(reference_dir) / f"{name}.jpg"
    same = same_person_label(Path(reference_dir), name)
    if target.exists() or same is not None:
        raise BadInput(f"--name-person: {reference_dir} already has photos of {same or name} "
                       f"(labels that differ only in case, spaces, '_', '-' or a _2 suffix are "
                       f"one person): choose another name, or add the photo by hand")
    crop = Path(output_dir) / str(people[person_id].get("snapshot") or "")
    if not people[person_id].get("snapshot") or not crop.is_file():
        raise BadInput(f"--name-person: the best face of {person_id} ({crop}) is missing: run "
                       f"python main.py again, then name it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(crop, target)
    return target
