"""The whole search (findpeople/run.py) on the shared clips, end to end in a subprocess: who is
found, the clips, the debug outputs, and what stops a run before any work."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import MODEL_PACK, MODEL_ROOT, REPO, TESTDATA, run_main, search_command, video_folder
from findpeople.folders import list_videos
from findpeople.resume import read_made
from findpeople.run import videos_outside_output


GROUND_TRUTH = json.loads((TESTDATA / "ground_truth.json").read_text())


DISTRACTORS = {"Kit_Harington", "Rose_Leslie"}


def video_entry(search, name: str) -> dict:
    return next(v for v in search["results"]["videos"] if Path(v["file"]).name == name)


def test_the_run_succeeds_and_reports_the_provider(search):
    """Exit code 0, a complete results.json, and the provider in use is printed."""
    done = search["done"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert search["results"]["complete"] is True
    assert "runs on CPUExecutionProvider" in done.stdout, done.stdout[-2000:]


def test_obama_is_found_on_at_least_90_percent_of_processed_frames(search):
    """Barack_Obama is matched on >= 90 % of the processed frames of obama_whcd.mp4."""
    entry = video_entry(search, "obama_whcd.mp4")
    frames = {d["frame"] for d in entry["detections"] if d["name"] == "Barack_Obama"}
    share = len(frames) / entry["processed_frame_count"]
    assert entry["processed_frame_count"] == 60
    assert share >= 0.90, f"found on {len(frames)} of {entry['processed_frame_count']} frames"


def test_lin_manuel_miranda_is_found_in_his_medium_shot(search):
    """Lin_Manuel_Miranda is matched inside 2.736-7.040 s of the Hamilton clip."""
    entry = video_entry(search, "short_hamilton_clip.mp4")
    times = [d["time"] for d in entry["detections"] if d["name"] == "Lin_Manuel_Miranda"]
    inside = [t for t in times if 2.736 <= t <= 7.040]
    assert len(inside) >= 30, f"{len(inside)} sightings inside the shot; all: {times[:20]}..."


def test_no_distractor_and_nobody_in_the_crowd(search):
    """No distractor is named anywhere and nobody is named in the negative-control crowd clip."""
    for entry in search["results"]["videos"]:
        named = {d["name"] for d in entry["detections"]}
        assert not named & DISTRACTORS, f"{entry['file']}: distractors {named & DISTRACTORS}"
    crowd = video_entry(search, "crowd_royal_opera_house.mp4")
    assert crowd["detections"] == [] and crowd["ranges"] == [], crowd["ranges"]


def test_every_named_frame_shows_that_person(search):
    """Every detection lies within 0.1 s of the person's ground-truth ranges (frame precision 1.0)."""
    for entry in search["results"]["videos"]:
        truth = GROUND_TRUTH[Path(entry["file"]).name]
        wrong = [(d["name"], d["time"]) for d in entry["detections"]
                 if not any(a - 0.1 <= d["time"] <= b + 0.1 for a, b in truth.get(d["name"], []))]
        assert not wrong, f"{entry['file']}: named where absent: {wrong[:10]}"


def test_reports_list_both_distance_and_similarity(search):
    """Detections and ranges carry distance and similarity = 1 - distance; CSV has a row per range."""
    ranges = [r for v in search["results"]["videos"] for r in v["ranges"]]
    assert ranges, "nothing found at all"
    for entry in search["results"]["videos"]:
        for d in entry["detections"]:
            assert d["similarity"] == pytest.approx(1 - d["distance"], abs=1e-3), d
            assert {"frame", "time", "name", "distance", "similarity", "bbox", "det_score"} <= set(d)
    rows = (search["out"] / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(ranges), rows


def test_snapshots_show_recognised_frames_of_every_named_track(search):
    """Every named face track has a snapshot, each at a frame where that person was recognised."""
    for entry in search["results"]["videos"]:
        folder = search["out"] / entry["output_folder"]
        recognised = {(d["frame"], d["name"]) for d in entry["detections"] if d["recognized"]}
        shots = {(int(p.name.split("_")[1]), p.stem.split("s_", 1)[1]) for p in folder.glob("frame_*.jpg")}
        assert shots <= recognised, f"{entry['file']}: snapshots of unrecognised frames {shots - recognised}"
        tracks = {(d["track"], d["name"]) for d in entry["detections"]}
        shot_tracks = {(d["track"], d["name"]) for d in entry["detections"]
                       if (d["frame"], d["name"]) in shots}
        assert shot_tracks == tracks, f"{entry['file']}: tracks without a snapshot {tracks - shot_tracks}"


def ffprobe_streams(path: Path) -> list:
    done = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type",
                           "-of", "json", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"ffprobe cannot read {path}: {done.stderr}"
    return [s["codec_type"] for s in json.loads(done.stdout)["streams"]]


def source_frames(path: str) -> list:
    import av
    with av.open(path) as container:
        stream = container.streams.video[0]
        return [(float((f.pts - stream.start_time) * stream.time_base),
                 f.to_ndarray(format="bgr24").astype(np.int16)) for f in container.decode(stream)]


def first_clip_frame(path: Path) -> np.ndarray:
    import av
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="bgr24").astype(np.int16)


def test_every_clip_plays_with_audio_and_starts_within_one_frame(search):
    """Each clip has video and audio (ffprobe) and its first frame is the range's start frame (+-1)."""
    checked = 0
    for entry in search["results"]["videos"]:
        if not entry["ranges"]:
            continue
        frames = source_frames(entry["file"])
        for r in entry["ranges"]:
            clip = search["out"] / r["clip"]
            assert clip.is_file() and not clip.with_name(clip.name + ".part").exists()
            assert sorted(ffprobe_streams(clip)) == ["audio", "video"], clip
            first = first_clip_frame(clip)
            errors = [np.abs(first - image).mean() for _, image in frames]
            shown = int(np.argmin(errors))
            expected = next(i for i, (t, _) in enumerate(frames) if t >= r["start"] - 1e-3)
            assert abs(shown - expected) <= 1, f"{clip.name}: starts at frame {shown}, not {expected}"
            checked += 1
    assert checked >= 3, f"only {checked} clips"


def test_debug_outputs_show_raw_detections_and_every_recognition(tmp_path, all_refs_dir):
    """debug_det saves each processed frame with its raw detections; debug_rec logs each
    recognition's distance to every person, to the console and to debug_rec.tsv."""
    videos = tmp_path / "videos"
    videos.mkdir()
    os.symlink(TESTDATA / "videos" / "obama_whcd.mp4", videos / "obama_whcd.mp4")
    out, debug_dir = tmp_path / "out", tmp_path / "dbg"
    cmd = search_command(videos, all_refs_dir, out, "--frame-interval", "6", "--debug-det",
                         "--debug-det-dir", str(debug_dir), "--debug-rec")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    frames = sorted(p.name for p in (debug_dir / "obama_whcd").glob("frame_*.jpg"))
    assert frames == [f"frame_{i:07d}.jpg" for i in range(0, 60, 6)], frames
    lines = (out / "debug_rec.tsv").read_text().splitlines()
    assert lines, "no recognition logged"
    for line in lines:
        fields = line.split("\t")
        people = dict(f.split("=") for f in fields[5:])
        assert set(people) == {p.stem for p in all_refs_dir.glob("*.jpg")}, line
        assert fields[4] in ("Barack_Obama", "-"), line
    assert "[debug_rec]" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["videos"][0]["processed_frame_count"] == 10


def test_frames_on_device_names_the_same_frames_as_the_cpu_path(search, tmp_path, all_refs_dir):
    """FRAMES_ON_DEVICE on (here the 'device' is the CPU: the same graphs, IO binding and batched
    detector a GPU runs) names Barack_Obama on the same frames of obama_whcd.mp4 as the default
    CPU path, with distances within 0.02 (the int8 recognizer moves by ~0.01 for a pixel one grey
    level off: see test_device_looks_embed_like_the_cpu_path), and says that frames go to the
    device once."""
    videos = tmp_path / "videos"
    videos.mkdir()
    os.symlink(TESTDATA / "videos" / "obama_whcd.mp4", videos / "obama_whcd.mp4")
    cmd = search_command(videos, all_refs_dir, tmp_path / "out", "--frames-on-device", "on",
                         "--trt-cache-dir", str(tmp_path / "cache"))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "frames go to the CPU once" in done.stdout, done.stdout[-2000:]
    device = json.loads((tmp_path / "out" / "results.json").read_text())["videos"][0]
    default = video_entry(search, "obama_whcd.mp4")
    by_frame = {(d["frame"], d["name"]): d["distance"] for d in default["detections"]}
    got = {(d["frame"], d["name"]): d["distance"] for d in device["detections"]}
    assert set(got) == set(by_frame), f"only device {set(got) - set(by_frame)}, only CPU {set(by_frame) - set(got)}"
    worst = max(abs(got[k] - by_frame[k]) for k in got)
    assert worst <= 0.02, f"distances differ by up to {worst:.4f}"


# Environment: models, ffmpeg, the output folder, a full disk (issue #5) -----------------------
@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_model_file_stops_the_run_naming_it(tmp_path, damage):
    """A pack whose recognizer is random bytes, cut off halfway, or empty: exit code 2 before any
    search, and the message names the file and says to download the pack again."""
    pack = tmp_path / "models" / "models" / "broken_pack"
    pack.mkdir(parents=True)
    source = MODEL_ROOT / "models" / MODEL_PACK
    os.symlink(source / "det_500m.onnx", pack / "det_500m.onnx")
    data = (source / "w600k_mbf_int8.onnx").read_bytes()
    damaged = {"garbage": os.urandom(len(data)), "truncated": data[:len(data) // 2], "empty": b""}
    (pack / "w600k_mbf_int8.onnx").write_bytes(damaged[damage])
    cmd = search_command(TESTDATA / "videos", TESTDATA / "refs", tmp_path / "out")
    cmd[cmd.index("--model-root") + 1] = str(tmp_path / "models")
    cmd[cmd.index("--model-pack") + 1] = "broken_pack"
    code, text = run_main(cmd, tmp_path)
    assert code == 2, text[-3000:]
    assert f"{pack / 'w600k_mbf_int8.onnx'}: not a valid ONNX model" in text, text[-3000:]
    assert "download the pack again" in text and "Traceback" not in text, text[-3000:]


def test_without_any_ffmpeg_the_search_still_runs_and_reports_clips_not_cut(main_module, tmp_path):
    """No ffmpeg in FFMPEG_DIR, none on PATH, and imageio-ffmpeg missing: every video is still
    indexed, searched and reported, the ranges have no clip, the problem is listed, and the exit
    code is 1. made.json lists no clip, so a later run with ffmpeg reuses the index (decodes
    nothing) and cuts the clips."""
    shim, empty = tmp_path / "shim", tmp_path / "empty"
    shim.mkdir()
    empty.mkdir()
    (shim / "imageio_ffmpeg.py").write_text('raise ImportError("imageio-ffmpeg is not installed (test)")\n')
    videos = video_folder(tmp_path, "obama_whcd.mp4")
    out = tmp_path / "out"
    code, text = run_main(search_command(videos, TESTDATA / "refs", out, "--ffmpeg-dir", str(empty)),
                          tmp_path, {"PATH": str(empty), "PYTHONPATH": str(shim)})
    assert code == 1, text[-3000:]
    assert "ffmpeg: NOT FOUND" in text and "clips were not cut" in text, text[-3000:]
    results = json.loads((out / "results.json").read_text())
    entry = results["videos"][0]
    assert results["ffmpeg"] is None and entry["detections"] and entry["ranges"], entry["ranges"]
    assert [r["clip"] for r in entry["ranges"]] == [None] * len(entry["ranges"])
    assert not list(out.rglob("*.mp4")), "no ffmpeg, yet a clip exists"
    made = read_made(out / "obama_whcd")
    assert made and not [name for name in made if name.startswith("clips/")], made
    code, text = run_main(search_command(videos, TESTDATA / "refs", out), tmp_path)
    assert code == 0 and "1 video(s) reused, 0 to index" in text, text[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["stats"]["processed_frames"] == 0, results["stats"]
    clips = [r["clip"] for r in results["videos"][0]["ranges"]]
    assert clips and all(clip and (out / clip).is_file() for clip in clips), clips


@pytest.mark.parametrize("which", ["output", "index"])
@pytest.mark.parametrize("where", ["below a file", "a file"])
def test_a_folder_that_cannot_be_made_stops_the_run_before_any_work(tmp_path, which, where):
    """OUTPUT_DIR or INDEX_DIR below a regular file, or a file itself: exit code 2 with a message
    naming that folder and its flag, before the models are loaded or any video is opened."""
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the folder should be")
    folder = blocker / which if where == "below a file" else blocker
    out, index = (folder, tmp_path / "index") if which == "output" else (tmp_path / "out", folder)
    code, text = run_main(search_command(TESTDATA / "videos", TESTDATA / "refs", out,
                                         "--index-dir", str(index)), tmp_path)
    assert code == 2, text[-3000:]
    flag = "--output" if which == "output" else "--index-dir"
    assert f"error: {which} folder {folder} " in text and flag in text, text[-3000:]
    assert "[*] people:" not in text, "the models were loaded before the folder was checked"


def test_an_output_folder_without_write_permission_stops_the_run_before_any_work():
    """A read-only OUTPUT_DIR (run as an unprivileged user: root may write anywhere): exit code 2,
    'Permission denied' naming the folder, before the models are loaded."""
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="sfv-permission-"))  # pytest's tmp_path is 0700
    try:
        base.chmod(0o755)
        out = base / "out"
        out.mkdir(mode=0o555)
        out.chmod(0o555)
        index = base / "index"  # writable: only the output folder is refused
        index.mkdir()
        index.chmod(0o777)
        cmd = search_command(TESTDATA / "videos", TESTDATA / "refs", out, "--index-dir", str(index))
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        code, text = run_main(cmd, base)
    finally:
        out.chmod(0o755)
        shutil.rmtree(base)
    assert code == 2, text[-3000:]
    assert f"error: output folder {out} cannot be written (Permission denied)" in text, text[-3000:]
    assert "[*] people:" not in text, "the models were loaded before the folder was checked"


_FULL_DISK_SHIM = '''"""Test shim (issue #5): pathlib writes under SFV_TEST_FULL_DISK fail as on a full disk."""
import errno
import os
import pathlib

_FULL = os.environ["SFV_TEST_FULL_DISK"]
_write_bytes = pathlib.Path.write_bytes


def _write_bytes_on_a_full_disk(self, data):
    if not str(self).startswith(_FULL):
        return _write_bytes(self, data)
    open(self, "wb").close()  # a full disk still creates the file, then fails to write it
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))


pathlib.Path.write_bytes = _write_bytes_on_a_full_disk
'''


@pytest.fixture()
def small_disk(tmp_path):
    """A folder on a 4 MiB tmpfs when mount is allowed (root), with fill() filling it for real;
    elsewhere a plain folder, and fill() returns the environment of a shim that makes every write
    under it fail with ENOSPC in main.py and its children. Yields (folder, fill, kind)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                                 capture_output=True, timeout=60).returncode == 0
    except OSError:  # no mount command
        mounted = False

    def fill() -> dict:
        if not mounted:
            (tmp_path / "shim").mkdir()
            (tmp_path / "shim" / "sitecustomize.py").write_text(_FULL_DISK_SHIM)
            return {"PYTHONPATH": str(tmp_path / "shim"), "SFV_TEST_FULL_DISK": str(folder)}
        with open(folder / "filler", "wb") as filler:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
        return {}
    yield folder, fill, "tmpfs" if mounted else "ENOSPC shim"
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_stops_the_run_and_keeps_what_was_saved_before(small_disk, tmp_path):
    """The disk fills up while a second video is indexed: exit code 1, 'No space left on device'
    naming the file; the previous results.json stays whole, no .part file is left, and the video
    finished before (its index, made.json, clip, snapshots) survives unchanged and is reused."""
    folder, fill, kind = small_disk
    out = folder / "out"
    code, text = run_main(search_command(video_folder(tmp_path / "a", "obama_whcd.mp4"),
                                         TESTDATA / "refs", out), tmp_path)
    assert code == 0, text[-3000:]
    index = out.with_name("out_index") / "obama_whcd.parquet"
    before = {p: p.read_bytes() for p in [*out.rglob("*"), index] if p.is_file()}
    assert index in before, sorted(before)
    env = fill()
    videos = video_folder(tmp_path / "b", "obama_whcd.mp4", "short_hamilton_clip.mp4")
    code, text = run_main(search_command(videos, TESTDATA / "refs", out), tmp_path, env)
    assert code == 1, f"{kind}: {text[-3000:]}"
    assert "1 video(s) reused, 1 to index" in text, f"{kind}: {text[-3000:]}"
    message = f"cannot write {out / 'results.json'}: No space left on device"
    assert message in text, f"{kind}: {text[-3000:]}"
    after = {p: p.read_bytes() for p in [*out.rglob("*"), index] if p.is_file()}
    assert not [p for p in after if p.name.endswith(".part")], f"{kind}: .part files left"
    changed = [p for p, data in before.items() if after.get(p) != data]
    assert changed == [], f"{kind}: files saved before were changed or lost: {changed}"
    assert json.loads(after[out / "results.json"])["complete"] is True


def test_videos_inside_the_output_folder_are_not_searched(main_module, tmp_path, capsys):
    """With OUTPUT_DIR inside VIDEO_DIR, the clips an earlier run cut there are not inputs of the
    next run: they are left out of the video list, with a note saying how many."""
    videos = tmp_path / "videos"
    clips = videos / "out" / "obama_whcd" / "clips"
    clips.mkdir(parents=True)
    (videos / "talk.mp4").write_bytes(b"a video")
    (clips / "0.00s_Barack_Obama_d0.543.mp4").write_bytes(b"a clip")
    kept = videos_outside_output(list_videos(videos), videos / "out")
    assert kept == [(videos / "talk.mp4").resolve()], kept
    assert "1 video(s) inside the output folder" in capsys.readouterr().out


def test_the_summary_says_why_nobody_was_found_and_each_refused_photo_once(tmp_path, ffmpeg_exe):
    """A video of tiny faces and a one-frame video found nobody: the summary says so, naming
    MIN_FACE_SIZE and MIN_TRACK_HITS; a photo refused as another label's face is printed once,
    not once at the start and again in the closing list (issue #11)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    obama = str(TESTDATA / "videos" / "obama_whcd.mp4")
    for name, args in (("tiny faces.mp4", ["-vf", "scale=144:-2", "-t", "2"]),
                       ("one frame.mp4", ["-frames:v", "1"])):
        subprocess.run([ffmpeg_exe, "-v", "error", "-i", obama, *args, "-an", str(videos / name)],
                       check=True, timeout=120)
    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("Barack_Obama", "Barry", "POTUS"):  # one face under three names
        os.symlink(TESTDATA / "refs" / "Barack_Obama.jpg", refs / f"{name}.jpg")
    code, text = run_main(search_command(videos, refs, tmp_path / "out"), REPO)
    assert code == 1, text[-3000:]  # photos were skipped
    refused = [line for line in text.splitlines() if "shows the same face as" in line]
    assert len(refused) == 2 and len(set(refused)) == 2, refused
    assert "2 reference photo(s) skipped: listed at the start" in text, text[-3000:]
    hints = {line.split(": nobody found: ")[0]: line for line in text.splitlines() if ": nobody found: " in line}
    assert "smaller than MIN_FACE_SIZE (32 px)" in hints.get("[*] tiny faces.mp4", ""), hints
    assert "fewer than MIN_TRACK_HITS (2) times" in hints.get("[*] one frame.mp4", ""), hints


def test_files_that_are_not_searched_do_not_rename_a_videos_output_folder(tmp_path, ffmpeg_exe):
    """A dead link, a raw stream and a skipped format named like a video (talk.mkv, talk.h264,
    talk.y4m beside talk.mp4) are named as problems, and the video keeps the folder 'talk', where
    its earlier results are (issue #11)."""
    from findpeople.run import probe_all
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(TESTDATA / "videos" / "obama_whcd.mp4", videos / "talk.mp4")
    os.symlink(tmp_path / "nowhere.mkv", videos / "talk.mkv")
    obama = str(TESTDATA / "videos" / "obama_whcd.mp4")
    subprocess.run([ffmpeg_exe, "-v", "error", "-i", obama, "-frames:v", "3", "-f", "h264",
                    str(videos / "talk.h264")], check=True, timeout=60)
    (videos / "talk.y4m").write_bytes(b"YUV4MPEG2 W2 H2 F25:1\n")
    infos, problems = probe_all(list_videos(videos), videos)
    assert [(Path(i.path).name, i.output_name) for i in infos] == [("talk.mp4", "talk")], infos
    assert len(problems) == 3, problems
