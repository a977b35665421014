"""The search (findpeople/search.py, issue #12): track templates find every track that has a look
within the threshold of a person, its distance rows are those of naming.person_distances, and the
template cache follows the index files."""
from __future__ import annotations

import os

import numpy as np
import pytest

import findpeople.search as search
from conftest import TESTDATA, TEST_THRESHOLD
from findpeople.decode import decode_frames, probe_video
from findpeople.detect import detect_faces
from findpeople.index import index_table, read_index, write_index
from findpeople.references import load_references, reference_matrix
from findpeople.search import (
    CACHE_DIR_NAME, TEMPLATE_CACHE_NAME, candidate_rows, open_templates,
    search_templates, track_templates, update_templates)
from findpeople.naming import person_distances
from findpeople.tracks import VideoTracker, thumbnail


def unit(rows: np.ndarray) -> np.ndarray:
    """Return the rows L2-normalised."""
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def archive_video(rng: np.random.Generator, photos: np.ndarray, track_count: int = 40) -> tuple:
    """Return (faces, looks) of a video whose tracks are random faces, and some tracks with ONE
    look close to a photo among looks far from it (the case a template's mean hides)."""
    counts = rng.integers(1, 9, track_count)
    track_id = np.repeat(np.arange(track_count), counts)
    centres = unit(rng.standard_normal((track_count, 512)))
    embedding = unit(0.8 * centres[track_id] + 0.6 * unit(rng.standard_normal((len(track_id), 512))))
    for track in rng.choice(np.flatnonzero(counts >= 4), 3, replace=False):
        first = np.flatnonzero(track_id == track)[0]
        embedding[first] = unit(photos[track % len(photos)] + 0.5 * unit(rng.standard_normal((1, 512))))
    frame_idx = np.arange(len(track_id)) * 2
    faces = {"track_id": np.concatenate([track_id, track_id]),
             "frame_idx": np.concatenate([frame_idx, frame_idx + 1]),
             "time_s": np.concatenate([frame_idx, frame_idx + 1]) / 25.0,
             "box": np.tile([10.0, 10.0, 90.0, 90.0], (2 * len(track_id), 1)),
             "score": np.full(2 * len(track_id), 0.9)}
    looks = {"track_id": track_id, "frame_idx": frame_idx, "kps": np.zeros((len(track_id), 5, 2)),
             "face_size_px": np.full(len(track_id), 80.0), "embedding": embedding}
    return faces, looks


@pytest.fixture()
def archive(tmp_path):
    """An index folder of 4 synthetic videos, and 3 people with 2 photos each."""
    rng = np.random.default_rng(5)
    photos = unit(rng.standard_normal((6, 512)))
    owners = np.repeat(np.arange(3), 2)
    for video in range(4):
        faces, looks = archive_video(rng, photos)
        write_index(tmp_path / f"video{video}.parquet", index_table(faces, looks, {"format": 1}))
    return tmp_path, photos, owners


def brute_force(folder, photos: np.ndarray, owners: np.ndarray, threshold: float) -> dict:
    """Return {(file name, track): distance rows} of every track with a look within threshold,
    matching every stored look."""
    found = {}
    for path in sorted(folder.glob("*.parquet")):
        looks = read_index(path).looks
        for track in np.unique(looks["track_id"]):
            rows = person_distances(looks["embedding"][looks["track_id"] == track], photos, owners,
                                    int(owners.max()) + 1)
            if rows.min() <= threshold:
                found[(path.name, int(track))] = rows
    return found


def test_the_search_returns_exactly_the_tracks_with_a_look_within_the_threshold(archive):
    """Every track with a look within CUSTOM_THRESHOLD of a person is returned, with the distance
    row of each of its looks as naming.person_distances gives them, and no other track."""
    folder, photos, owners = archive
    expected = brute_force(folder, photos, owners, 0.6)
    found = search_templates(open_templates(folder), photos, owners, 3, 0.6)
    got = {(t.index_file.name, t.track_id): t.distances for t in found}
    assert sorted(got) == sorted(expected) and len(expected) >= 12, (sorted(got), sorted(expected))
    for key, rows in expected.items():
        assert np.allclose(got[key], rows), key


def test_without_the_spread_slack_a_template_would_miss_a_single_close_look(archive, monkeypatch):
    """The slack is what finds a track whose mean is far from the person but one look is close:
    with SLACK_PER_SPREAD at 0 some such track is missed (so the test above can fail)."""
    folder, photos, owners = archive
    expected = brute_force(folder, photos, owners, 0.6)
    monkeypatch.setattr(search, "SLACK_PER_SPREAD", 0.0)
    found = search_templates(open_templates(folder), photos, owners, 3, 0.6)
    missed = set(expected) - {(t.index_file.name, t.track_id) for t in found}
    assert missed, "every planted look was found without the slack: the test data is too easy"


def test_a_track_whose_only_look_is_just_within_the_threshold_is_found(tmp_path):
    """A look at similarity 1 - threshold + 1e-4 to a photo is found although its int8 template
    may round below the threshold: the rounding slack (scale |r|_1 / 2) covers it."""
    rng = np.random.default_rng(8)
    photo = unit(rng.standard_normal((1, 512)))
    other = unit(rng.standard_normal((300, 512)))
    other = unit(other - (other @ photo.T) * photo)  # orthogonal to the photo
    cosine = 1 - 0.6 + 1e-4
    looks = unit(cosine * photo + np.sqrt(1 - cosine ** 2) * other)
    faces = {"track_id": np.arange(300), "frame_idx": np.zeros(300, int), "time_s": np.zeros(300),
             "box": np.tile([0.0, 0.0, 50.0, 50.0], (300, 1)), "score": np.ones(300)}
    write_index(tmp_path / "v.parquet", index_table(faces, {
        "track_id": np.arange(300), "frame_idx": np.zeros(300, int), "kps": np.zeros((300, 10)),
        "face_size_px": np.full(300, 50.0), "embedding": looks}, {"format": 1}))
    expected = brute_force(tmp_path, photo, np.zeros(1, int), 0.6)
    found = search_templates(open_templates(tmp_path), photo, np.zeros(1, int), 1, 0.6)
    assert len(expected) > 250, len(expected)  # float16 storage moves a few below the line
    assert sorted((t.index_file.name, t.track_id) for t in found) == sorted(expected)


@pytest.mark.parametrize("look_count", [1, 2, 7])
def test_a_template_is_the_normalised_mean_of_its_looks_within_8_bit_rounding(look_count):
    """track_templates: scale x (codes - 128) is the normalised mean of the looks within scale/2
    per value, code_l1 is the sum of |codes - 128|, and spread is the largest Euclidean distance
    of a look from the template."""
    rng = np.random.default_rng(look_count)
    looks = unit(rng.standard_normal((look_count, 512))).astype(np.float32)
    made = track_templates(np.zeros(look_count, np.int32), looks)
    mean = looks.mean(axis=0) / np.linalg.norm(looks.mean(axis=0))
    codes = made["codes"][0].astype(np.int32) - 128
    error = np.abs(codes * made["scale"][0] - mean).max()
    assert error <= made["scale"][0] / 2 + 1e-7, (error, made["scale"][0])
    assert made["code_l1"][0] == np.abs(codes).sum() and np.abs(codes).max() == 127
    spread = np.linalg.norm(looks - mean, axis=1).max()
    assert abs(made["spread"][0] - spread) < 1e-5, (made["spread"][0], spread)
    assert (made["look_start"][0], made["look_count"][0]) == (0, look_count)


def test_the_integer_product_is_exact_and_the_rounding_bound_holds():
    """ONNX Runtime's MatMulInteger gives exactly NumPy's integer product (extreme codes too), and
    |photo . template - st sr (t-128).(r-128)| <= st sr (|t-128|_1/2 + |r-128|_1/2 + dim/4) for
    every template and photo: the rounding part of the slack is a proof, not a measurement."""
    rng = np.random.default_rng(3)
    looks = unit(rng.standard_normal((2000, 512))).astype(np.float32)
    looks[:4] = unit(np.sign(rng.standard_normal((4, 512))))  # every value at +-127 after scaling
    made = track_templates(np.arange(2000, dtype=np.int32), looks)
    photos = unit(rng.standard_normal((50, 512))).astype(np.float32)
    photos[:2] = unit(np.ones((2, 512)))
    codes, scale, l1 = search.quantise_photos(photos)
    feeds = {"codes": made["codes"], "photos": codes, "photo_add": np.zeros(50, np.float32),
             "photo_scale": np.ones(50, np.float32)}
    best, product = search.integer_product_session(2).run(["best", "product"], feeds)
    exact_product = (made["codes"].astype(np.int64) - 128) @ (codes.astype(np.int64) - 128)
    assert np.array_equal(product, exact_product), np.abs(product - exact_product).max()
    assert np.array_equal(best, exact_product.max(axis=1).astype(np.float32)), "best is the largest product"
    exact = looks @ photos.T  # one look per track: the template is the look
    rounded = product * made["scale"][:, None] * scale[None, :]
    bound = (made["code_l1"][:, None] / 2 + l1[None, :] / 2 + 512 / 4) * made["scale"][:, None] * scale
    assert np.all(np.abs(exact - rounded) <= bound + 1e-6), np.abs(exact - rounded).max()


def test_the_search_cache_follows_the_index_files(archive):
    """The cache is rebuilt when a file is added, rewritten or removed (its cached looks go with
    it), and reused otherwise."""
    folder, photos, owners = archive
    open_templates(folder)
    cache = folder / CACHE_DIR_NAME / TEMPLATE_CACHE_NAME
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.parent.iterdir()}
    open_templates(folder)
    assert {p.name: p.stat().st_mtime_ns for p in cache.parent.iterdir()} == stamps, \
        "an unchanged folder rebuilt the cache"
    faces, looks = archive_video(np.random.default_rng(9), photos, track_count=5)
    write_index(folder / "video1.parquet", index_table(faces, looks, {"format": 1}))
    templates = open_templates(folder)
    assert np.sum(templates.file_idx == 1) == 5, "a rewritten index file kept its old templates"
    (folder / "video2.parquet").unlink()
    templates = open_templates(folder)
    assert [p.name for p in templates.files] == ["video0.parquet", "video1.parquet", "video3.parquet"]
    assert np.sum(templates.file_idx == 1) == 5, np.bincount(templates.file_idx)
    cached = sorted(p.name.split(".")[0] for p in cache.parent.glob("*.looks.npy"))
    assert cached == ["video0", "video1", "video3"], sorted(p.name for p in cache.parent.iterdir())
    found = search_templates(templates, photos, owners, 3, 0.6)
    assert sorted((t.index_file.name, t.track_id) for t in found) == \
        sorted(brute_force(folder, photos, owners, 0.6))


def test_a_damaged_index_is_left_out_by_name_and_the_others_are_searched(archive):
    """A truncated index file is named with the reason; the other videos' tracks are still found."""
    folder, photos, owners = archive
    expected = {k for k in brute_force(folder, photos, owners, 0.6) if k[0] != "video2.parquet"}
    data = (folder / "video2.parquet").read_bytes()
    (folder / "video2.parquet").write_bytes(data[:len(data) // 3])
    problems = update_templates(folder)
    assert list(problems) == ["video2.parquet"] and "truncated" in problems["video2.parquet"], problems
    found = search_templates(open_templates(folder), photos, owners, 3, 0.6)
    assert {(t.index_file.name, t.track_id) for t in found} == expected


def test_a_cache_write_that_fails_leaves_the_previous_cache(archive, monkeypatch):
    """The cache is written atomically: a failed rename keeps the previous one, no temporary file."""
    folder, _, _ = archive
    open_templates(folder)
    cache = folder / CACHE_DIR_NAME / TEMPLATE_CACHE_NAME
    before = cache.read_bytes()
    (folder / "video3.parquet").unlink()

    def failing(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match=TEMPLATE_CACHE_NAME):
        update_templates(folder)
    monkeypatch.undo()
    assert cache.read_bytes() == before
    assert not list(cache.parent.glob(".*.part")), list(cache.parent.iterdir())


def test_a_search_over_an_index_changed_since_it_was_opened_names_the_file(archive):
    """Templates opened before an index file was rewritten (and its cache rebuilt) are not matched
    against the new file's looks: the search names the file and asks to search again."""
    folder, photos, owners = archive
    templates = open_templates(folder)
    faces, looks = archive_video(np.random.default_rng(11), photos)
    write_index(folder / "video0.parquet", index_table(faces, looks, {"format": 1}))
    update_templates(folder)
    with pytest.raises(search.IndexProblem, match="video0.parquet: changed"):
        search_templates(templates, photos, owners, 3, 2.0)


def test_real_tracks_with_a_close_look_are_always_candidates(cpu_models, test_settings, tmp_path):
    """On the shared clips' real tracks, for every reference photo (all reference folders) and
    every other track's look as a query, the template filter keeps each track that has a look
    within the threshold: the measured basis of SLACK_PER_SPREAD."""
    from findpeople.worker import WorkerContext
    import main
    settings = main.load_settings(["--model-root", str(TESTDATA.parent), "--model-pack", "buffalo_sc_int8",
                                   "--providers", "cpu", "--output", str(tmp_path)])
    references = [r for name in ("refs", "refs_alt", "refs_distractors", "refs_same_event")
                  for r in load_references(TESTDATA / name, cpu_models, settings)[0]]
    photos, owners = reference_matrix(references)
    tracks = []
    for idx, path in enumerate(sorted((TESTDATA / "videos").glob("*.mp4"))):
        info = probe_video(path, idx, path.stem)
        context = WorkerContext(settings, None, [info], cpu_models, None, None)
        messages = []  # ("track", video_idx, record) of every ended track, named or not
        tracker = VideoTracker(info, context, messages.append)
        for seq, (frame_idx, time_s, image) in enumerate(decode_frames(info, 1)):
            boxes, kps = detect_faces(cpu_models, [image], settings)[0]
            tracker.step(seq, frame_idx, time_s, image, boxes, kps, thumbnail(image))
        tracker.finish()
        tracks += [record["looks"]["embedding"].astype(np.float32) for _, _, record in messages
                   if len(record["looks"]["frame_idx"])]  # the float16 values an index stores
    track_id = np.concatenate([np.full(len(looks), i, np.int32) for i, looks in enumerate(tracks)])
    made = track_templates(track_id, np.concatenate(tracks))
    templates = search.Templates([], [], np.zeros(len(tracks), np.int32), made["track_id"], made["look_start"],
                                 made["look_count"], made["spread"], made["scale"], made["code_l1"],
                                 [made["codes"]], {})
    queries = np.concatenate([photos, *tracks])
    query_track = np.concatenate([np.full(len(photos), -1), track_id])  # a look is not its own query
    misses, close = [], 0
    for q, query in enumerate(queries):
        near = {i for i, looks in enumerate(tracks) if (looks @ query).max() >= 1 - TEST_THRESHOLD
                and i != query_track[q]}
        close += len(near)
        misses += sorted(near - set(candidate_rows(templates, query[None, :], TEST_THRESHOLD).tolist()))
    assert len(tracks) >= 20 and close >= 50, (len(tracks), close)
    assert misses == [], f"tracks with a close look that the filter drops: {misses}"
