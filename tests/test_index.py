"""The index (findpeople/index.py, issue #12): one Parquet file per video that round-trips, that
any tool reads, that is written atomically, and whose problems are named before it is reused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import REPO
from findpeople.index import (
    INDEX_FORMAT, LOOK_ROW_GROUP_ROWS, METADATA_KEY, index_identity, index_path, index_problem,
    index_table, iter_looks, open_index, read_index, read_look_rows, remove_abandoned_parts,
    write_index)


def synthetic_tracks(track_count: int = 6, seed: int = 0, dim: int = 512) -> tuple:
    """Return (faces, looks) of track_count tracks, faces in shuffled order, every other face a look."""
    rng = np.random.default_rng(seed)
    track_id = np.repeat(np.arange(track_count), 10)
    frame_idx = np.tile(np.arange(10), track_count) * 3 + track_id
    shuffle = rng.permutation(len(track_id))
    track_id, frame_idx = track_id[shuffle], frame_idx[shuffle]
    faces = {"track_id": track_id, "frame_idx": frame_idx, "time_s": frame_idx / 25.0,
             "box": rng.uniform(0, 500, (len(track_id), 4)), "score": rng.uniform(0.3, 1, len(track_id))}
    pick = np.flatnonzero(frame_idx % 2 == 0)
    embedding = rng.standard_normal((len(pick), dim))
    looks = {"track_id": track_id[pick], "frame_idx": frame_idx[pick],
             "kps": rng.uniform(0, 500, (len(pick), 5, 2)), "face_size_px": rng.uniform(20, 90, len(pick)),
             "embedding": embedding / np.linalg.norm(embedding, axis=1, keepdims=True)}
    return faces, looks


def identity(**changes) -> dict:
    """Return an index identity as index_identity builds it, with some parts changed."""
    parts = {"video": {"size": 1000, "sampled_sha256": "ab" * 32},
             "models": {"det_500m.onnx": "11" * 32, "w600k_mbf_int8.onnx": "22" * 32},
             "settings": {"DET_SIZE": [640, 640], "FRAME_INTERVAL": 1, "MIN_FACE_SIZE": 32},
             "execution": {"providers": ["CPUExecutionProvider"], "gpus": []}}
    parts.update(changes)
    return json.loads(json.dumps({"format": INDEX_FORMAT, **parts}))


def write_synthetic(path, seed: int = 0, track_count: int = 6, **changes) -> tuple:
    """Write a synthetic index to path; return (faces, looks, metadata written)."""
    faces, looks = synthetic_tracks(track_count, seed)
    metadata = {**identity(**changes), "video_facts": {"name": "v.mp4", "duration_s": 12.5}}
    write_index(path, index_table(faces, looks, metadata))
    return faces, looks, metadata


def test_an_index_reads_back_what_was_written_looks_first_by_track_and_frame(tmp_path):
    """Every face comes back with its track, frame, time, box and score; the looks come first
    (by track, then frame) with their landmarks, size and embedding (float16: within 1e-3)."""
    path = tmp_path / "video.parquet"
    faces, looks, metadata = write_synthetic(path)
    index = read_index(path)
    look_count = len(looks["track_id"])
    keys = list(zip(index.looks["track_id"].tolist(), index.looks["frame_idx"].tolist()))
    assert keys == sorted(zip(looks["track_id"].tolist(), looks["frame_idx"].tolist())), keys[:5]
    assert list(zip(index.faces["track_id"][:look_count], index.faces["frame_idx"][:look_count])) == keys
    order = np.lexsort((looks["frame_idx"], looks["track_id"]))
    error = np.abs(index.looks["embedding"] - looks["embedding"][order]).max()
    assert error < 1e-3, f"float16 embeddings differ by {error}"
    assert np.allclose(index.looks["kps"], looks["kps"][order].reshape(-1, 10), atol=1e-3)
    stored = np.stack([index.faces[c] for c in ("x1", "y1", "x2", "y2")], axis=1)
    got = sorted(zip(index.faces["track_id"].tolist(), index.faces["frame_idx"].tolist(),
                     index.faces["time_s"].tolist(), map(tuple, stored.tolist())))
    want = sorted(zip(faces["track_id"].tolist(), faces["frame_idx"].tolist(), faces["time_s"].tolist(),
                      map(tuple, faces["box"].astype(np.float32).tolist())))
    assert got == want, (got[:3], want[:3])
    assert index.metadata["video_facts"] == metadata["video_facts"]
    assert (index.metadata["look_count"], index.metadata["face_count"]) == (look_count, len(faces["track_id"]))


def test_any_tool_reads_an_index_with_plain_sql(tmp_path):
    """DuckDB counts the faces and looks of an index with plain SQL, and reads its metadata and
    512-value embeddings, without this tool's code."""
    import duckdb
    path = tmp_path / "video.parquet"
    faces, looks, _ = write_synthetic(path)
    connection = duckdb.connect()
    try:
        counts = connection.execute(f"SELECT count(*), count(embedding) FROM '{path}'").fetchall()
        sizes = connection.execute(f"SELECT DISTINCT len(embedding) FROM '{path}' "
                                   f"WHERE embedding IS NOT NULL").fetchall()
        raw = connection.execute(f"SELECT value FROM parquet_kv_metadata('{path}') "
                                 f"WHERE key = '{METADATA_KEY.decode()}'").fetchall()
    finally:
        connection.close()
    assert counts == [(len(faces["track_id"]), len(looks["track_id"]))], counts
    assert sizes == [(512,)], sizes
    assert json.loads(raw[0][0])["look_count"] == len(looks["track_id"]), raw


def test_reading_some_looks_reads_the_same_rows_as_reading_them_all(tmp_path):
    """read_look_rows(start, stop) equals that slice of all looks, across row-group borders."""
    path = tmp_path / "video.parquet"
    write_synthetic(path, track_count=400)  # 2,000 looks: two look row groups
    parquet, metadata = open_index(path)
    everything = read_look_rows(parquet, 0, metadata["look_count"])
    start, stop = LOOK_ROW_GROUP_ROWS - 7, LOOK_ROW_GROUP_ROWS + 5
    part = read_look_rows(parquet, start, stop)
    for name, values in part.items():
        assert np.array_equal(values, everything[name][start:stop]), name
    assert parquet.num_row_groups >= 3, parquet.num_row_groups  # 2 of looks, 1 of other faces


def test_iterating_over_many_indexes_yields_every_look_a_row_group_at_a_time(tmp_path):
    """iter_looks yields every look of every file, never more than one row group at once."""
    paths = [tmp_path / f"v{i}.parquet" for i in range(3)]
    expected = [len(write_synthetic(p, seed=i, track_count=250)[1]["track_id"]) for i, p in enumerate(paths)]
    seen = {p: 0 for p in paths}
    for path, _, looks in iter_looks(paths, ("track_id", "embedding")):
        assert len(looks["track_id"]) <= LOOK_ROW_GROUP_ROWS and looks["embedding"].shape[1] == 512
        seen[path] += len(looks["track_id"])
    assert list(seen.values()) == expected, (seen, expected)


def test_a_look_without_its_face_is_refused(tmp_path):
    """Each look must be one of the faces (same track and frame); anything else is a ValueError."""
    faces, looks = synthetic_tracks()
    looks["frame_idx"] = looks["frame_idx"] + 1
    with pytest.raises(ValueError, match="no face row"):
        index_table(faces, looks, identity())


def truncate(path):
    """Cut the file in half."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def damage_a_look_page(path):
    """Flip bytes inside the first look row group's embedding pages (the footer stays whole)."""
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 8, len(data) // 8 + 64):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def foreign_parquet(path):
    """Replace the index with a Parquet file another program wrote."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"a": [1, 2, 3]}), path)


def other_format(path):
    """Rewrite the index with another format number in its metadata."""
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    metadata = json.loads(table.schema.metadata[METADATA_KEY])
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps({**metadata, "format": 99})}), path)


@pytest.mark.parametrize("spoil, expected, words", [
    (lambda p: p.unlink(), identity(), "no index yet"),
    (truncate, identity(), "truncated or damaged"),
    (lambda p: p.write_text('{"not": "parquet"}'), identity(), "not a Parquet file"),
    (foreign_parquet, identity(), "did not write"),
    (other_format, identity(), "another version"),
    (lambda p: None, identity(models={"det_500m.onnx": "33" * 32, "w600k_mbf_int8.onnx": "22" * 32}),
     "other model files"),
    (lambda p: None, identity(video={"size": 1001, "sampled_sha256": "ab" * 32}), "video file changed"),
    (lambda p: None, identity(settings={"DET_SIZE": [320, 320], "FRAME_INTERVAL": 1, "MIN_FACE_SIZE": 32}),
     "DET_SIZE [640, 640] -> [320, 320]"),
    (lambda p: None, identity(execution={"providers": ["CUDAExecutionProvider"], "gpus": ["H200"]}),
     "this run uses"),
    (damage_a_look_page, identity(), "damaged"),
], ids=["missing", "truncated", "not-parquet", "foreign", "other-format", "other-model",
        "video-changed", "settings-changed", "other-execution", "damaged-page"])
def test_an_index_that_cannot_be_reused_is_named_with_the_reason(tmp_path, spoil, expected, words):
    """index_problem names the file and says why it cannot be reused (issue #12: truncated,
    corrupt, foreign, another model, a changed video, changed settings)."""
    path = tmp_path / "video.parquet"
    write_synthetic(path, track_count=300)
    assert index_problem(path, identity()) is None, index_problem(path, identity())
    spoil(path)
    problem = index_problem(path, expected)
    assert problem is not None and str(path) in problem and words in problem, problem


def test_a_failed_rename_leaves_the_previous_index_and_no_temporary_file(tmp_path, monkeypatch):
    """A write that fails at the last step (os.replace) or in the middle (an exception while the
    rows are written) leaves the previous index whole and no temporary file (issue #12)."""
    import pyarrow.parquet as pq
    path = tmp_path / "video.parquet"
    write_synthetic(path, seed=1)
    before = path.read_bytes()
    faces, looks = synthetic_tracks(seed=2)
    table = index_table(faces, looks, identity())

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device")
    for target, name in ((os, "replace"), (pq.ParquetWriter, "write_table")):
        monkeypatch.setattr(target, name, failing)
        with pytest.raises(OSError, match=str(path)):
            write_index(path, table)
        monkeypatch.undo()
        assert path.read_bytes() == before, f"{name} failing changed the index"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["video.parquet"], list(tmp_path.iterdir())


def test_a_writer_killed_mid_write_leaves_the_previous_index(tmp_path):
    """A process killed (SIGKILL) after writing the rows and before the rename leaves the previous
    index whole; its temporary file is removed once it is old enough to be abandoned."""
    path = tmp_path / "video.parquet"
    write_synthetic(path, seed=1)
    before = path.read_bytes()
    flag = tmp_path / "writing"
    code = textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
        import findpeople.index as index
        from test_index import write_synthetic
        def hang(path):
            open({str(flag)!r}, "w").close()
            time.sleep(600)
        index.fsync_file = hang
        write_synthetic(index.Path({str(path)!r}), seed=2)
    """)
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(600):
            if flag.exists() or child.poll() is not None:
                break
            time.sleep(0.1)
        assert flag.exists(), f"the writer never reached the rename (exit {child.poll()})"
    finally:
        child.kill()
        child.wait(timeout=30)
    assert path.read_bytes() == before
    parts = [p.name for p in tmp_path.glob(".video.parquet.*.part")]
    assert len(parts) == 1, list(tmp_path.iterdir())
    assert remove_abandoned_parts(tmp_path) == [], "a young temporary file may be a live writer's"
    assert [p.name for p in remove_abandoned_parts(tmp_path, older_than_s=-1)] == parts
    assert index_problem(path, identity()) is None


def write_many_times(path: str, seed: int, times: int) -> None:
    """Write the same index path again and again (run in a child process)."""
    from pathlib import Path
    for _ in range(times):
        write_synthetic(Path(path), seed=seed)


def test_two_processes_writing_one_index_end_with_one_whole_file(tmp_path):
    """Two runs that share INDEX_DIR and write the same index at once never corrupt it: the file
    is always one writer's whole index (the last rename wins), and no temporary file is left."""
    import multiprocessing
    path = tmp_path / "video.parquet"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=write_many_times, args=(str(path), seed, 15)) for seed in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
    assert [w.exitcode for w in writers] == [0, 0]
    assert index_problem(path, identity()) is None, index_problem(path, identity())
    stored = read_index(path).looks["embedding"]
    candidates = []
    for seed in (1, 2):
        write_synthetic(tmp_path / f"{seed}.parquet", seed=seed)
        candidates.append(read_index(tmp_path / f"{seed}.parquet").looks["embedding"])
    assert any(np.array_equal(stored, c) for c in candidates), "the index is neither writer's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.parquet", "2.parquet", "video.parquet"]


def test_an_index_is_named_after_the_video_folder_and_knows_what_it_was_made_from(tmp_path, test_settings):
    """index_path puts the index at INDEX_DIR/<video folder>.parquet; index_identity records the
    indexing settings (not the matching ones) with the video and model fingerprints."""
    made = index_identity({"size": 1}, {"m.onnx": "00"}, test_settings, {"providers": []})
    assert index_path(tmp_path, "clip_2") == tmp_path / "clip_2.parquet"
    assert made["settings"]["DET_SIZE"] == list(test_settings.DET_SIZE)
    assert "CUSTOM_THRESHOLD" not in made["settings"] and "MATCH_MARGIN" not in made["settings"]
    assert (made["format"], made["video"], made["models"]) == (INDEX_FORMAT, {"size": 1}, {"m.onnx": "00"})


@pytest.mark.parametrize("face_count", [0, 3], ids=["no-faces", "faces-but-no-looks"])
def test_a_video_without_looks_has_an_empty_but_whole_index(tmp_path, face_count):
    """A video where nobody was seen (or nobody recognised) still gets an index: it reads back
    with its faces and no looks, and nothing is wrong with it."""
    faces = {"track_id": np.zeros(face_count, int), "frame_idx": np.arange(face_count),
             "time_s": np.arange(face_count) / 25.0, "box": np.ones((face_count, 4)),
             "score": np.ones(face_count)}
    looks = {"track_id": np.zeros(0, int), "frame_idx": np.zeros(0, int), "kps": np.zeros((0, 5, 2)),
             "face_size_px": np.zeros(0), "embedding": np.zeros((0, 512))}
    path = tmp_path / "video.parquet"
    write_index(path, index_table(faces, looks, identity()))
    index = read_index(path)
    assert len(index.faces["track_id"]) == face_count and index.looks["embedding"].shape == (0, 512)
    assert index_problem(path, identity()) is None, index_problem(path, identity())


# A real run over a damaged, foreign or outdated index ------------------------------------------
def run_answers(results: dict) -> list:
    """Return the names, ranges and sightings of a results.json, per video."""
    return [(os.path.basename(v["file"]), [(r["name"], r["start"], r["end"]) for r in v["ranges"]],
             [(d["frame"], d["name"], d["distance"]) for d in v["detections"]]) for v in results["videos"]]


@pytest.fixture(scope="module")
def indexed_run(tmp_path_factory, ffmpeg_exe):
    """One run over obama_whcd.mp4 and a faceless test pattern: its command, answers and index."""
    from conftest import TESTDATA, link_all_refs, run_main, search_command, make_video
    base = tmp_path_factory.mktemp("indexed_run")
    videos = base / "videos"
    videos.mkdir()
    os.symlink(TESTDATA / "videos" / "obama_whcd.mp4", videos / "obama_whcd.mp4")
    make_video(ffmpeg_exe, videos / "pattern.mp4", "320x240", "-c:v", "libx264", seconds=1, audio=False)
    refs = link_all_refs(base / "refs")
    code, text = run_main(search_command(videos, refs, base / "out"), base)
    assert code == 0, text[-3000:]
    results = json.loads((base / "out" / "results.json").read_text())
    assert any(v["ranges"] for v in results["videos"]), "the base run found nobody"
    return {"base": base, "videos": videos, "refs": refs, "answers": run_answers(results),
            "index": base / "out_index"}


def rerun_with(indexed_run, name: str, spoil) -> tuple:
    """Copy the base run's index, spoil obama_whcd's index file with spoil(path), run again with
    that index; return (exit code, output, results.json, the index file)."""
    import shutil
    from conftest import run_main, search_command
    base = indexed_run["base"]
    index = base / f"index_{name}"
    shutil.copytree(indexed_run["index"], index)
    path = index / "obama_whcd.parquet"
    spoil(path)
    code, text = run_main(search_command(indexed_run["videos"], indexed_run["refs"], base / f"out_{name}",
                                         index=index), base)
    return code, text, json.loads((base / f"out_{name}" / "results.json").read_text()), path


def truncate(path) -> None:
    """Cut an index file in half (a copy stopped midway, a disk that failed)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def flip_a_page_byte(path) -> None:
    """Change one byte in the middle of the file, inside a data page (a damaged disk sector)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def foreign_parquet(path) -> None:
    """Put a Parquet file this tool did not write in the index's place."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"name": ["a", "b"], "value": [1, 2]}), path)


def other_models(path) -> None:
    """Rewrite the index as if another model pack had made it (its metadata's model hashes)."""
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    metadata = json.loads(table.schema.metadata[METADATA_KEY])
    metadata["models"] = {name: "0" * 64 for name in metadata["models"]}
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()}), path)


@pytest.mark.parametrize("spoil, words", [
    (truncate, "truncated or damaged"),
    (flip_a_page_byte, "damaged"),
    (foreign_parquet, "a Parquet file this tool did not write"),
    (other_models, "other model files"),
], ids=["truncated", "damaged-page", "foreign", "other-models"])
def test_a_bad_index_is_named_rebuilt_and_the_answers_stay_the_same(indexed_run, spoil, words):
    """A truncated, damaged or foreign index file, or one made with other models, is reported by
    its path with the reason, that video alone is indexed again (the other index is reused),
    the answers are the base run's, and the file is a current index afterwards."""
    code, text, results, path = rerun_with(indexed_run, spoil.__name__, spoil)
    assert code == 0, text[-3000:]
    said = [line for line in text.splitlines() if "indexed again" in line]
    assert len(said) == 1 and str(path) in said[0] and words in said[0], said or text[-2000:]
    assert "1 video(s) reused, 1 to index" in text, text[-2000:]
    assert run_answers(results) == indexed_run["answers"]
    assert results["stats"]["processed_frames"] > 0
    parquet, metadata = open_index(path)
    parquet.close()
    assert metadata["video_facts"]["name"] == "obama_whcd.mp4"


def test_an_index_whose_video_changed_is_rebuilt_for_the_new_content(indexed_run, ffmpeg_exe, tmp_path):
    """The same video name with other content (a new version of the file): its index is named as
    outdated ("its video file changed") and made again from the new content."""
    import shutil
    from conftest import make_video, run_main, search_command
    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(ffmpeg_exe, videos / "obama_whcd.mp4", "320x240", "-c:v", "libx264", seconds=1, audio=False)
    os.symlink(indexed_run["base"] / "videos" / "pattern.mp4", videos / "pattern.mp4")
    index = tmp_path / "index"
    shutil.copytree(indexed_run["index"], index)
    code, text = run_main(search_command(videos, indexed_run["refs"], tmp_path / "out", index=index),
                          tmp_path)
    assert code == 0, text[-3000:]
    assert f"{index / 'obama_whcd.parquet'}: its video file changed since it was indexed" in text, text[-2000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(not v["ranges"] for v in results["videos"]), "a test pattern has nobody in it"
    assert open_index(index / "obama_whcd.parquet")[1]["video"]["size"] == (videos / "obama_whcd.mp4").stat().st_size
