"""Pipeline (findpeople/pipeline.py): processes and shared memory are always released; a killed or
failing child, Ctrl-C and a killed parent stop the run cleanly and say why."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import threading
import time
import types
import uuid
from pathlib import Path

import pytest

from conftest import processes_with_marker, search_command, shm_names, start_logged, video_folder, worker_pid
from conftest import TESTDATA, VIDEOS
from findpeople.errors import PipelineBroken
from findpeople.pipeline import Pipeline, follow_children, start_result_reader


def test_no_orphan_processes_and_no_shared_memory_left(search):
    """After the run no child process is alive and no /dev/shm/sfv* block was left behind."""
    assert processes_with_marker(search["marker"]) == []
    assert search["ring"] not in shm_names(), f"/dev/shm/{search['ring']} was left behind"


PROGRESS = re.compile(r"\|\s*[1-9]\d*/\d+ \[[^\]]*frame/s")  # the frames bar, past its first frame


def start_search(tmp_path: Path, refs: Path, marker: str, new_session: bool = False) -> tuple:
    """Start a search in the background (in its own session, as a terminal starts it, when
    new_session); return (process, output lines up to the first processed frames, as the
    progress bar shows them: then the decoder and the worker are both at work)."""
    env = {**os.environ, marker: "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(search_command(TESTDATA / "videos", refs, tmp_path / "out"), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=tmp_path, start_new_session=new_session)
    output = []
    for line in process.stdout:  # text mode: each '\r' of the progress bar ends a line too
        output.append(line)
        if PROGRESS.search(line):
            break
    assert output and PROGRESS.search(output[-1]), "".join(output)[-3000:]
    return process, output


@pytest.mark.parametrize("how", ["kill -9 worker", "Ctrl-C", "Ctrl-C to the process group", "SIGTERM"])
def test_a_killed_worker_or_ctrl_c_stops_the_run_cleanly(tmp_path, all_refs_dir, how):
    """A worker killed mid-run, or Ctrl-C (to main.py alone, or to its whole process group, as a
    terminal sends it): the run stops within seconds, saves what it has marked incomplete, exits
    non-zero (1, or 130 for Ctrl-C), and leaves no process or shared memory. A killed worker is
    named, with the unfinished video it was searching; a Ctrl-C prints no traceback."""
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    process, output = start_search(tmp_path, all_refs_dir, marker, new_session=True)
    if how == "Ctrl-C":
        os.kill(process.pid, signal.SIGINT)
    elif how == "Ctrl-C to the process group":
        os.killpg(process.pid, signal.SIGINT)
    elif how == "SIGTERM":
        os.kill(process.pid, signal.SIGTERM)
    else:
        os.kill(worker_pid(process.pid, marker), signal.SIGKILL)
    rest, _ = process.communicate(timeout=120)  # a hang fails here
    text = "".join(output) + rest
    if how != "kill -9 worker":  # SIGTERM (kill, a service manager) stops like Ctrl-C
        assert process.returncode == 130 and "interrupted" in text, text[-3000:]
        assert "Traceback" not in text and "ffmpeg exit code" not in text, text[-3000:]
    else:
        assert process.returncode == 1, text[-3000:]
        assert "pipeline broken: worker-0" in text, text[-3000:]
        assert any(f"worker-0 was working on: {p.name}" in text for p in VIDEOS), text[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["complete"] is False
    time.sleep(0.5)
    assert processes_with_marker(marker) == [], "child processes outlived the run"
    assert f"sfv{process.pid}r" not in shm_names(), "shared memory left behind"


def first_child_started(process: subprocess.Popen, marker: str) -> None:
    """Poll until main.py has started its first decoder or worker (spawned, maybe importing)."""
    deadline = time.monotonic() + 600  # a bound for a hang, not a timing requirement
    while time.monotonic() < deadline and process.poll() is None:
        for pid in processes_with_marker(marker):
            try:
                if f"PPid:\t{process.pid}\n" in Path(f"/proc/{pid}/status").read_text() and \
                        b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes() and \
                        b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return
            except OSError:
                continue
        time.sleep(0.005)
    raise AssertionError("no child process was started")


def clip_being_cut(process: subprocess.Popen, out: Path) -> None:
    """Poll until ffmpeg is writing a clip (a .part file in a clips/ folder)."""
    deadline = time.monotonic() + 600
    while not list(out.glob("*/clips/*.mp4.part")):
        assert process.poll() is None, "the run ended before a clip was cut"
        assert time.monotonic() < deadline, "no clip was ever cut"
        time.sleep(0.01)


@pytest.mark.parametrize("moment", ["while the children start", "while a clip is cut"])
def test_a_ctrl_c_to_the_process_group_is_quiet_at_any_moment(tmp_path, all_refs_dir, moment):
    """A terminal's Ctrl-C goes to every process of the group: children still importing ignore it
    (no KeyboardInterrupt traceback), ffmpeg, in its own group, gets none (no 'ffmpeg exit code',
    the parent stops it), and the run ends with 130 leaving no process or shared memory."""
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    videos = video_folder(tmp_path, "obama_whcd.mp4", "short_hamilton_clip.mp4")
    out = tmp_path / "out"
    process, lines, reader = start_logged(search_command(videos, all_refs_dir, out), tmp_path,
                                          {marker: "1"})
    first_child_started(process, marker) if moment == "while the children start" else \
        clip_being_cut(process, out)
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=120)
    reader.join(timeout=30)
    text = "".join(lines)
    assert process.returncode == 130 and "interrupted" in text, text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "ffmpeg exit code" not in text, text[-3000:]
    assert not list(out.rglob("*.part")), "a .part file was left"
    time.sleep(0.5)
    assert processes_with_marker(marker) == [], "child processes outlived the run"
    assert f"sfv{process.pid}r" not in shm_names(), "shared memory left behind"


def test_ctrl_c_while_the_models_load_stops_at_once(tmp_path, all_refs_dir):
    """Ctrl-C before the search has started (photos and models still loading): exit code 130 with
    a message and no traceback, and no process or shared memory is left."""
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    process = subprocess.Popen(search_command(TESTDATA / "videos", all_refs_dir, tmp_path / "out"),
                               env={**os.environ, marker: "1", "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    first = process.stdout.readline()  # "[*] VIDEO_DIR = ...": printed before the models load
    os.kill(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    text = first + rest
    assert process.returncode == 130 and "interrupted" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    time.sleep(0.5)
    assert processes_with_marker(marker) == [], "child processes outlived the run"
    assert f"sfv{process.pid}r" not in shm_names(), "shared memory left behind"


def test_children_exit_and_free_the_ring_when_the_parent_is_killed(tmp_path, all_refs_dir):
    """kill -9 of the main process (nobody left to stop the children): decoders and workers notice
    their parent is gone, exit, and the ring's shared memory is released; nothing is orphaned."""
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    process, _ = start_search(tmp_path, all_refs_dir, marker)
    ring = f"sfv{process.pid}r"
    assert ring in shm_names(), "the run's ring buffer should exist while it runs"
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    deadline = time.monotonic() + 60  # a bound for the wait, not a timing requirement
    while processes_with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with_marker(marker) == [], "children outlived their killed parent"
    assert ring not in shm_names(), f"/dev/shm/{ring} was left behind"


def test_a_worker_that_fails_reports_its_traceback_and_the_run_stops(tmp_path, all_refs_dir):
    """An exception inside a worker (here: debug_det_dir is a file, so saving fails) stops the run
    with exit code 1, names the worker and prints its traceback; results are saved incomplete."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the debug folder should be")
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, marker: "1"}
    cmd = search_command(TESTDATA / "videos", all_refs_dir, tmp_path / "out", "--debug-det",
                         "--debug-det-dir", str(blocker))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "pipeline broken: worker-0" in done.stderr and "Traceback" in done.stderr, done.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["complete"] is False
    time.sleep(0.5)
    assert processes_with_marker(marker) == []


def write_half_a_message(result_q) -> None:
    """Child: write the start of a 1 MiB message into result_q's pipe, as a child killed while
    sending a large track leaves it, then die by SIGKILL."""
    import struct
    payload = b"x" * 2**20
    os.write(result_q._writer.fileno(), struct.pack("!i", len(payload)) + payload[:32768])
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_child_killed_while_writing_a_large_message_is_noticed(main_module):
    """A child killed halfway through writing a message larger than a pipe holds (a track lists
    every frame) leaves the parent's read of it blocked for ever: the parent's main loop still
    notices the dead child within seconds (PipelineBroken with its exit code) instead of hanging,
    since a reader thread does the reading (issue #5)."""
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    child = ctx.Process(target=write_half_a_message, args=(result_q,), name="worker-0")
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL, child.exitcode
    pipe = Pipeline(ctx, None, None, None, None, [], result_q, ctx.Event(), [child])
    start_result_reader(pipe)
    state = types.SimpleNamespace(lock=threading.RLock(), write_error=None)
    raised = []

    def follow():
        try:
            follow_children(state, pipe, {})
        except PipelineBroken as error:
            raised.append(error)
    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    follower.join(timeout=60)  # a bound for a hang, not a timing requirement
    pipe.reader_stop.set()
    assert not follower.is_alive(), "the parent hangs on the half-written message"
    assert raised and (raised[0].name, raised[0].exitcode) == ("worker-0", -9), raised
    assert "check dmesg for the OOM killer" in str(raised[0]), str(raised[0])


def decoder_pid(parent_pid: int, marker: str) -> int:
    """The PID of the run's decoder: a spawned child without onnxruntime (not the resource tracker)."""
    for pid in processes_with_marker(marker):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            spawned = b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            if f"PPid:\t{parent_pid}\n" in status and spawned \
                    and "onnxruntime" not in Path(f"/proc/{pid}/maps").read_text():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no decoder process among {processes_with_marker(marker)}")


def test_a_killed_decoder_stops_the_run_and_names_its_video(tmp_path, all_refs_dir):
    """kill -9 of a decoder mid-run: the run stops, names the video that decoder was decoding
    (marked not finished in results.json, and writes no index of it), keeps the indexes of the
    videos finished before (for a rerun), exits 1, and leaves no process or shared memory."""
    marker = f"SFV_TEST_{uuid.uuid4().hex}"
    process, output = start_search(tmp_path, all_refs_dir, marker)
    os.kill(decoder_pid(process.pid, marker), signal.SIGKILL)
    rest, _ = process.communicate(timeout=120)  # a hang fails here
    text = "".join(output) + rest
    assert process.returncode == 1, text[-3000:]
    assert "pipeline broken: decoder-0 stopped (exit code -9)" in text, text[-3000:]
    names = [p.name for p in VIDEOS if f"decoder-0 was working on: {p.name}." in text]
    assert len(names) == 1, text[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["complete"] is False
    entry = next(v for v in results["videos"] if Path(v["file"]).name == names[0])
    assert entry["status"] != "ok" and any("decoder-0" in e for e in entry["errors"]), entry["errors"]
    indexes = {p.stem for p in (tmp_path / "out_index").glob("*.parquet")}
    assert entry["output_folder"] not in indexes, "the unfinished video's index was written"
    ok = {video["output_folder"] for video in results["videos"] if video["status"] == "ok"}
    assert ok <= indexes, f"finished before the kill, but no index for a rerun: {ok - indexes}"
    time.sleep(0.5)
    assert processes_with_marker(marker) == [], "child processes outlived the run"
    assert f"sfv{process.pid}r" not in shm_names(), "shared memory left behind"
