"""Naming: the matching rules that turn a stored track's looks into a named person and sightings.

Runs in the parent at search time (the index stage knows no reference photo). In: per track that
may be named, its faces (frame, time, box, score, from the index) and its looks' distances to
every person ([looks, people], cosine DISTANCE = 1 - similarity; CUSTOM_THRESHOLD, lower is
stricter) and embeddings. Out: one summary per named piece of a track: the person, the frames
that count as sightings, and the looks worth a snapshot.

The rules: a look agrees with a person within CUSTOM_THRESHOLD who beats the second best by
MATCH_MARGIN; a track is named when MIN_TRACK_HITS looks agree and more than all other people
together; a track whose look agrees with another person than the name it has so far is split
there (boxes crossed or swapped: someone else now); a frame counts when the looks on both sides
of it vouch for the name.
"""
from __future__ import annotations

import math

import numpy as np

from .settings import Settings


_SAME_FACE_SIMILARITY = 0.5  # cosine: an unsure look this close to a sure one is the same face
MAX_SNAPSHOTS = 8  # snapshots per named track: its agreeing looks, closest first
_SIGHTING_TAIL = 1  # frames before the first look that may still count (a doubtful first frame,
# recognised one frame later); every track gets a look at its last frame (tracks.py)


def person_distances(embeddings: np.ndarray, ref_embeddings: np.ndarray, ref_owners: np.ndarray,
                     person_count: int) -> np.ndarray:
    """Return cosine distances [faces, people]: 1 - similarity to each person's closest photo."""
    similarity = embeddings.astype(np.float64) @ ref_embeddings.astype(np.float64).T
    best = np.full((len(embeddings), person_count), -1.0)
    for person in range(person_count):
        best[:, person] = similarity[:, ref_owners == person].max(axis=1)
    return 1.0 - best


def agreeing_person(distances: np.ndarray, threshold: float, margin: float) -> int | None:
    """Return the person one recognition names: closest within threshold, beating the next by margin."""
    order = np.argsort(distances, kind="stable")
    best = float(distances[order[0]])
    second = float(distances[order[1]]) if len(order) > 1 else math.inf
    if best <= threshold and second - best >= margin:
        return int(order[0])
    return None


def evaluate_evidence(distances: np.ndarray, threshold: float, margin: float, min_hits: int) -> tuple:
    """Return (person index or None, best distance to them, hits) for a track's recognitions.

    distances is [recognitions, people]. A recognition agrees with a person when that person is
    within threshold and ahead of the second best by margin. The track is named when one person
    has at least min_hits agreeing recognitions and more than all other people together.
    """
    votes = [agreeing_person(row, threshold, margin) for row in distances]
    counts = {p: votes.count(p) for p in set(votes) if p is not None}
    if not counts:
        return None, math.inf, 0
    person = max(counts, key=lambda p: (counts[p], -float(distances[:, p].min())))
    hits = counts[person]
    if hits < min_hits or hits <= sum(counts.values()) - hits:
        return None, float(distances[:, person].min()), hits
    return person, float(distances[:, person].min()), hits


def vouching_recognitions(distances: np.ndarray, embeddings: np.ndarray, person: int,
                          settings: Settings) -> list:
    """Return, per look of a track named `person`, whether it vouches for the name.

    A look vouches when it agrees with the person, or when it agrees with nobody (a poor look:
    profile, blur) but its embedding is as close to one of the agreeing looks as the same face's
    embeddings are (cosine >= _SAME_FACE_SIMILARITY; different people stay below 0.3 with the
    shared models). A look at somebody else never vouches.
    """
    votes = [agreeing_person(row, settings.CUSTOM_THRESHOLD, settings.MATCH_MARGIN)
             for row in distances]
    agreeing = np.array([e for e, v in zip(embeddings, votes) if v == person])
    vouches = []
    for embedding, vote in zip(embeddings, votes):
        same_face = len(agreeing) and float((agreeing @ embedding).max()) >= _SAME_FACE_SIMILARITY
        vouches.append(vote == person or (vote is None and bool(same_face)))
    return vouches


def sighting_flags(rec_at: list, confirms: list, tail: int) -> list:
    """Return, per frame of a named track, whether it counts as a sighting of that person.

    rec_at holds, per frame, the index of the recognition made there (or None); confirms says
    per recognition whether it vouches for the track's name. A frame counts when the
    recognitions on both sides of it confirm (one at the frame itself suffices), or, before the
    first and after the last recognition, when that one confirms and the frame is at most
    `tail` frames away. So a face that turns into someone else between two recognitions (same
    place, no gap) is never named beyond the last recognition that really saw the person.
    """
    count = len(rec_at)
    previous, following = [None] * count, [None] * count  # nearest recognition position each side
    last = None
    for i, rec in enumerate(rec_at):
        last = i if rec is not None else last
        previous[i] = last
    last = None
    for i in range(count - 1, -1, -1):
        last = i if rec_at[i] is not None else last
        following[i] = last
    flags = []
    for i in range(count):
        before, after = previous[i], following[i]
        ok_before = before is not None and bool(confirms[rec_at[before]])
        ok_after = after is not None and bool(confirms[rec_at[after]])
        if before is not None and after is not None:
            flags.append(ok_before and ok_after)  # at a recognition itself both sides are it
        elif before is not None:
            flags.append(ok_before and i - before <= tail)
        else:
            flags.append(ok_after and after - i <= tail)
    return flags


def rename_splits(distances: np.ndarray, settings: Settings) -> list:
    """Return the look positions where a track's pieces start: 0, and every look that agrees
    with another person than the name the piece had by then (its evidence so far, as
    evaluate_evidence would name it): the boxes crossed or swapped, so it is someone else from
    there on. One pass, with running votes: an hour-long track costs no more than its looks."""
    threshold, margin, min_hits = settings.CUSTOM_THRESHOLD, settings.MATCH_MARGIN, settings.MIN_TRACK_HITS
    starts, name, votes, closest = [0], None, {}, None
    for i, row in enumerate(distances):
        now = agreeing_person(row, threshold, margin)
        if name is not None and now is not None and now != name:
            starts.append(i)
            name, votes, closest = None, {}, None
        closest = row.copy() if closest is None else np.minimum(closest, row)
        if now is not None:
            votes[now] = votes.get(now, 0) + 1
        if name is None and votes:
            person = max(votes, key=lambda p: (votes[p], -float(closest[p])))
            hits = votes[person]
            if hits >= min_hits and hits > sum(votes.values()) - hits:
                name = person
    return starts


def name_track(faces: dict, looks, people: list, settings: Settings) -> list:
    """Return the summaries of one stored track's pieces (rename_splits) that are named, and of
    the others too with debug_rec.

    faces: the track's faces in frame order (frame_idx, time_s, box [n, 4], score); looks: its
    TrackLooks (search.py), looks in frame order, each at one of the faces.
    """
    at_face = np.searchsorted(faces["frame_idx"], looks.frame_idx)
    starts = rename_splits(looks.distances, settings)
    bounds = [int(at_face[s]) if k else 0 for k, s in enumerate(starts)] + [len(faces["frame_idx"])]
    summaries = []
    for k, first_look in enumerate(starts):
        last_look = starts[k + 1] if k + 1 < len(starts) else len(looks.frame_idx)
        piece = slice(first_look, last_look)
        summary = name_piece(faces, slice(bounds[k], bounds[k + 1]), at_face[piece] - bounds[k],
                             looks, piece, people, settings)
        if summary is not None:
            summaries.append(summary)
    return summaries


def name_piece(faces: dict, rows: slice, look_rows: np.ndarray, looks, piece: slice,
               people: list, settings: Settings) -> dict | None:
    """Return the summary of one piece of a track (faces[rows], its looks looks[piece] at
    look_rows among them), or None when it is not named (and debug_rec is off)."""
    distances, embeddings = looks.distances[piece], looks.embeddings[piece]
    person, best, hits = evaluate_evidence(distances, settings.CUSTOM_THRESHOLD, settings.MATCH_MARGIN,
                                           settings.MIN_TRACK_HITS)
    if person is None and not settings.debug_rec:
        return None
    frame_idx, time_s = faces["frame_idx"][rows], faces["time_s"][rows]
    boxes, scores = faces["box"][rows], faces["score"][rows]
    rec_at = [None] * len(frame_idx)
    for i, row in enumerate(look_rows):
        rec_at[int(row)] = i
    frames = []
    if person is not None:
        confirms = vouching_recognitions(distances, embeddings, person, settings)
        flags = sighting_flags(rec_at, confirms, _SIGHTING_TAIL)
        frames = [[int(frame_idx[i]), float(time_s[i]), [round(float(v), 1) for v in boxes[i]],
                   round(float(scores[i]), 4),
                   None if rec_at[i] is None else round(float(distances[rec_at[i], person]), 4)]
                  for i in range(len(frame_idx)) if flags[i]]
    summary = {"track": looks.track_id, "name": None if person is None else people[person],
               "person": person, "best_distance": round(best, 4), "hits": hits,
               "recognitions": len(distances), "frames": frames,
               "snapshot_looks": [] if person is None else snapshot_looks(
                   distances, person, look_rows, frame_idx, time_s, boxes, settings)}
    if settings.debug_rec:
        summary["debug_rec"] = [[int(f), float(t), {p: round(float(d), 4) for p, d in zip(people, row)}]
                                for f, t, row in zip(looks.frame_idx[piece], looks.time_s[piece], distances)]
    return summary


def snapshot_looks(distances: np.ndarray, person: int, look_rows: np.ndarray, frame_idx: np.ndarray,
                   time_s: np.ndarray, boxes: np.ndarray, settings: Settings) -> list:
    """Return (frame_idx, time_s, box, distance) of the looks worth a snapshot: those that agree
    with the person, closest first, at most MAX_SNAPSHOTS, in frame order."""
    agreeing = [i for i, row in enumerate(distances)
                if agreeing_person(row, settings.CUSTOM_THRESHOLD, settings.MATCH_MARGIN) == person]
    chosen = sorted(sorted(agreeing, key=lambda i: float(distances[i, person]))[:MAX_SNAPSHOTS])
    return [(int(frame_idx[look_rows[i]]), float(time_s[look_rows[i]]),
             [float(v) for v in boxes[look_rows[i]]], float(distances[i, person])) for i in chosen]


def track_faces(faces: dict) -> dict:
    """Return {track_id: row indices of its faces in frame order} for an index's faces."""
    order = np.lexsort((faces["frame_idx"], faces["track_id"]))
    track_ids = faces["track_id"][order]
    bounds = np.flatnonzero(np.r_[True, np.diff(track_ids) != 0, True])
    return {int(track_ids[a]): order[a:b] for a, b in zip(bounds[:-1], bounds[1:])}


def name_video(faces: dict, track_looks: list, people: list, settings: Settings) -> list:
    """Return the summaries of every named track piece of one video (name_track), from its
    index's faces (FACE_COLUMNS arrays, box as [n, 4]) and its TrackLooks."""
    rows_of = track_faces(faces) if track_looks else {}
    summaries = []
    for looks in track_looks:
        rows = rows_of.get(looks.track_id)
        if rows is None:
            continue
        own = {name: faces[name][rows] for name in ("frame_idx", "time_s", "box", "score")}
        summaries += name_track(own, looks, people, settings)
    return summaries
