"""Ring buffer (findpeople/ring.py): slots hold the largest frame, every slot comes back, no leak."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import TESTDATA, VIDEOS
from findpeople.ring import (
    RingLayout, check_fits_ring, create_ring, fit_slot_count, get_with_stop, height_that_fits,
    new_slot_queue, plan_ring, ring_layout_for, ring_memory_budget, ring_view, slot_image,
    write_slot)
from findpeople.decode import VideoInfo, decode_frames, decoder_main, probe_video
from findpeople.run import probe_all


def shm_entries(prefix: str) -> set:
    """Names under /dev/shm starting with prefix (Linux; empty elsewhere)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith(prefix)} if shm.is_dir() else set()


def test_slots_fit_the_largest_frame_of_any_video(main_module):
    """The layout takes the size of the frame with the most pixels over all videos."""
    infos = [probe_video(p, i, p.stem) for i, p in enumerate(VIDEOS)]
    layout = ring_layout_for(infos, 8, "t1")
    assert (layout.width, layout.height) == (1920, 1080), layout
    assert layout.slot_bytes == 1920 * 1080 * 3
    assert layout.name.startswith("sfv")


def test_free_slot_queue_holds_every_slot_once(main_module):
    """A new free-slot queue hands out slot 0..n-1, each exactly once."""
    ctx = mp.get_context("spawn")
    free_q = new_slot_queue(ctx, 5)
    slots = sorted(free_q.get(timeout=5) for _ in range(5))
    assert slots == [0, 1, 2, 3, 4]
    with pytest.raises(queue.Empty):
        free_q.get(timeout=0.2)


def test_get_with_stop_returns_none_once_stopped(main_module):
    """A blocking get gives up (returns None) once the stop event is set, instead of hanging."""
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    stop.set()
    assert get_with_stop(q, stop) is None


def test_decoder_process_streams_a_video_through_few_slots_and_returns_all(main_module):
    """A real decoder process pushes 60 frames through 3 slots; pixels arrive intact; all slots return."""
    ctx = mp.get_context("spawn")
    path = TESTDATA / "videos" / "obama_whcd.mp4"
    info = probe_video(path, 0, path.stem)
    layout = ring_layout_for([info], 3, f"{os.getpid()}t")
    shm = create_ring(layout)
    jobs_q, filled_q, result_q, stop = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
    free_q = new_slot_queue(ctx, layout.slot_count)
    jobs_q.put(info)
    jobs_q.put(None)
    process = ctx.Process(target=decoder_main, name="decoder-0",
                          args=("decoder-0", layout, jobs_q, free_q, [filled_q], result_q, stop, 1))
    process.start()
    ring = ring_view(shm, layout)
    try:
        expected = decode_frames(info, 1)
        for seq, (frame_idx, time_s, image) in enumerate(expected):
            video_idx, got_seq, got_idx, got_time, h, w, slot = filled_q.get(timeout=30)
            assert (video_idx, got_seq, got_idx) == (0, seq, frame_idx)
            assert got_time == time_s
            assert np.array_equal(slot_image(ring, slot, h, w), image), \
                f"frame {frame_idx} differs in slot {slot}"
            free_q.put(slot)
        assert filled_q.get(timeout=30) == (0, 60, None, None, 0, 0, None), "end marker after 60 frames"
        messages = [result_q.get(timeout=30) for _ in range(4)]
        assert messages[0] == ("video_start", "decoder-0", 0), messages  # names the video it decodes
        assert messages[1] == ("video_done", 0, 60, None), messages
        assert messages[2][:2] == ("stats", "decoder-0") and messages[2][2]["decode"]["n"] == 60
        assert messages[3] == ("done", "decoder-0"), messages
        process.join(timeout=30)
        assert process.exitcode == 0
        returned = sorted(free_q.get(timeout=5) for _ in range(layout.slot_count))
        assert returned == [0, 1, 2], returned
    finally:
        stop.set()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
        del ring
        shm.close()
        shm.unlink()
    assert layout.name not in shm_entries("sfv"), "the ring's shared memory was left behind"


def test_decoder_finishes_a_truncated_video_early_and_goes_on(main_module, tmp_path, ffmpeg_exe):
    """A truncated video ends early with its 'video_done'; the next video still decodes fully."""
    import subprocess
    source = TESTDATA / "videos" / "obama_whcd.mp4"
    stream = tmp_path / "whole.ts"
    subprocess.run([ffmpeg_exe, "-nostdin", "-v", "error", "-i", str(source), "-map", "0:v:0",
                    "-c", "copy", "-f", "mpegts", str(stream)], check=True)
    broken = tmp_path / "broken.ts"
    broken.write_bytes(stream.read_bytes()[: stream.stat().st_size // 3])
    ctx = mp.get_context("spawn")
    infos = [probe_video(broken, 0, "broken"), probe_video(source, 1, "ok")]
    layout = ring_layout_for(infos, 4, f"{os.getpid()}u")
    shm = create_ring(layout)
    jobs_q, filled_q, result_q, stop = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()
    free_q = new_slot_queue(ctx, layout.slot_count)
    for item in (*infos, None):
        jobs_q.put(item)
    process = ctx.Process(target=decoder_main, name="decoder-0",
                          args=("decoder-0", layout, jobs_q, free_q, [filled_q], result_q, stop, 1))
    process.start()
    done = []
    try:
        while len(done) < 4:
            try:
                item = filled_q.get(timeout=0.1)
                if item[6] is not None:
                    free_q.put(item[6])
            except queue.Empty:
                pass
            try:
                message = result_q.get_nowait()
                if message[0] != "video_start":  # one per video, before its frames
                    done.append(message)
            except queue.Empty:
                pass
        assert done[0][:2] == ("video_done", 0)
        assert done[1] == ("video_done", 1, 60, None), done[1]
        assert done[2][0] == "stats" and done[3] == ("done", "decoder-0"), done
        sent_broken = done[0][2]
        assert sent_broken < 60, f"a third of the file cannot hold all 60 frames ({sent_broken})"
    finally:
        stop.set()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
        shm.close()
        shm.unlink()


# ── The ring's size fits the memory (issue #5: 4K and larger frames) ─────────────────────────
MB = 2**20


@pytest.mark.parametrize("requested, slot_bytes, budget_bytes, expected", [
    (32, 6 * MB, None, 32),  # nothing measurable (e.g. macOS): as asked
    (32, 6 * MB, 1024 * MB, 32),  # fits
    (32, 100 * MB, 1024 * MB, 10),  # 8K frames: as many as fit
    (32, 100 * MB, 150 * MB, 1),  # fewer than the minimum: the caller refuses such videos
    (4, 1 * MB, 64 * MB, 4),
])
def test_slot_count_is_what_was_asked_or_what_fits(main_module, requested, slot_bytes, budget_bytes,
                                                   expected):
    """fit_slot_count: MAX_BUFFER_SLOTS, or fewer where the memory budget holds fewer."""
    assert fit_slot_count(requested, slot_bytes, budget_bytes) == expected


def infos_of_size(main_module, *sizes) -> list:
    """VideoInfo records of the given (width, height), built directly."""
    return [VideoInfo(idx=i, path=f"/videos/v{i}.mp4", output_name=f"v{i}", width=w,
                                  height=h, fps=25.0, frame_count=100, duration_s=4.0,
                                  time_base=Fraction(1, 12800), origin_pts=0,
                                  video_start_offset_s=0.0, has_audio=False)
            for i, (w, h) in enumerate(sizes)]


@pytest.mark.parametrize("budget_mb, expected_slots, says_workers_wait", [
    (4096, 12, False),  # fits: no message
    (800, 8, False),  # 8 slots of 8K, still more than workers x threads + 1 = 3
    (250, 2, True),  # 2 slots: fewer than the workers could use
])
def test_the_ring_shrinks_to_the_memory_and_says_why(main_module, monkeypatch, capsys,
                                                     budget_mb, expected_slots, says_workers_wait):
    """plan_ring lowers the slot count to what the memory budget holds, never below 2, and
    prints how many slots it uses and why."""
    monkeypatch.setattr("findpeople.ring.ring_memory_budget",                         lambda: (budget_mb * MB, f"{budget_mb} MB free in /dev/shm"))
    settings = main_module.load_settings(["--max-buffer-slots", "12"])
    layout = plan_ring(infos_of_size(main_module, (640, 360), (7680, 4320)), settings, "t2")
    assert (layout.slot_count, layout.width, layout.height) == (expected_slots, 7680, 4320), layout
    printed = capsys.readouterr().out
    if expected_slots == 12:
        assert printed == "", printed
    else:
        assert (f"12 slots of 7680x4320 frames would take 1139 MB, more than the {budget_mb} MB "
                f"available ({budget_mb} MB free in /dev/shm): using {expected_slots} slots") in printed
        assert ("fewer than the 3 the workers can use at once" in printed) is says_workers_wait, printed


def test_a_video_too_large_for_the_memory_is_refused_by_name(main_module, monkeypatch):
    """probe_all refuses a video whose frames do not fit even 2 ring slots, saying why and what
    to do; the other videos are kept, numbered without a gap."""
    budget_bytes = 2 * 1920 * 1080 * 3 - 1  # the crowd clip is 1920x1080
    monkeypatch.setattr("findpeople.run.ring_memory_budget", lambda: (budget_bytes, "a test limit"))
    videos, problems = probe_all(VIDEOS, VIDEOS[0].parent)
    assert [Path(v.path).name for v in videos] == ["obama_whcd.mp4", "short_hamilton_clip.mp4"]
    assert [v.idx for v in videos] == [0, 1]
    crowd = TESTDATA / "videos" / "crowd_royal_opera_house.mp4"
    assert problems == [  # 11.87 MB needed, 11.87 MB less one byte available: 12 and 11 MB
        f"{crowd}: its 1920x1080 frames need 12 MB of shared memory for the 2 ring slots a search "
        f"needs at least, more than the 11 MB available (a test limit); skipped. Free memory or "
        f"enlarge /dev/shm (Docker: --shm-size=2g), or scale it down "
        f"(ffmpeg -i IN -vf scale=-2:720 OUT.mp4)"], problems


@pytest.mark.parametrize("size, budget_mb, height", [
    ((1920, 1080), 11.8, 720),  # never a larger height than the video's own
    ((7680, 4320), 100, 2160),  # 2 slots of 3840x2160 take 47 MB
    ((7680, 4320), 40, 1440),
    ((2160, 3840), 40, 2160),  # portrait: a height of 2160 makes it 1215x2160
    ((640, 360), 1, None),  # nothing smaller fits: no scale hint
])
def test_the_scale_hint_names_a_smaller_height_that_fits(main_module, size, budget_mb, height):
    """height_that_fits: the largest common height below the video's at which 2 slots fit."""
    info = infos_of_size(main_module, size)[0]
    assert height_that_fits(info, int(budget_mb * MB)) == height


def test_the_memory_budget_is_the_smaller_of_dev_shm_and_half_the_ram(main_module):
    """On Linux the budget is min(/dev/shm free, MemAvailable / 2), and it says which."""
    import shutil
    budget_bytes, why = ring_memory_budget()
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    shm_free = shutil.disk_usage("/dev/shm").free
    expected = min(shm_free, available // 2)
    assert abs(budget_bytes - expected) < 64 * MB, (budget_bytes, shm_free, available)  # memory moves
    assert ("free in /dev/shm" if shm_free < available // 2 else "available RAM") in why, why


def test_a_landscape_and_a_portrait_video_share_slots_of_the_larger_pixel_count(main_module, monkeypatch,
                                                                              capsys):
    """A 3840x2160 and a 2160x3840 video get slots of 3840 x 2160 pixels, not 3840 x 3840: the
    memory that check_fits_ring allows for each alone is enough for both together (issue #5)."""
    videos = infos_of_size(main_module, (3840, 2160), (2160, 3840))
    budget_bytes = 2 * 3840 * 2160 * 3  # exactly the 2 slots a search needs
    for info in videos:
        check_fits_ring(info, budget_bytes, "a test limit")  # each alone fits
    monkeypatch.setattr("findpeople.ring.ring_memory_budget", lambda: (budget_bytes, "a test limit"))
    settings = main_module.load_settings(["--max-buffer-slots", "2"])
    layout = plan_ring(videos, settings, "t3")
    assert layout.slot_bytes == 3840 * 2160 * 3, layout
    assert layout.slot_count * layout.slot_bytes <= budget_bytes, layout
    assert capsys.readouterr().out == "", "two slots fit: no shrinking, no message"


@pytest.mark.parametrize("shape", [(4, 6, 3), (6, 4, 3), (3, 8, 3), (2, 2, 3)])
def test_any_frame_with_at_most_a_slots_pixels_round_trips(main_module, shape):
    """write_slot and slot_image store and return a frame of any shape that has at most the
    slot's pixel count, exactly, without touching the other slots."""
    layout = RingLayout("t4", 3, 4, 6)
    ring = np.zeros((layout.slot_count, layout.slot_bytes), np.uint8)
    image = np.random.default_rng(len(shape)).integers(0, 255, shape, dtype=np.uint8)
    write_slot(ring, 1, image)
    assert np.array_equal(slot_image(ring, 1, shape[0], shape[1]), image)
    assert not ring[0].any() and not ring[2].any(), "a neighbouring slot was written"


def test_a_ctrl_c_while_the_ring_is_created_leaves_no_block_behind(main_module, monkeypatch):
    """Ctrl-C between creating the shared-memory block and sizing it (here: SIGINT sent from
    inside os.ftruncate): the block is removed and the Ctrl-C still goes on up as
    KeyboardInterrupt; nothing is left in /dev/shm (issue #5)."""
    import signal
    layout = RingLayout(f"sfv{os.getpid()}c", 2, 4, 6)
    real_ftruncate = os.ftruncate

    def interrupted_ftruncate(fd, size):
        os.kill(os.getpid(), signal.SIGINT)
        return real_ftruncate(fd, size)
    monkeypatch.setattr(os, "ftruncate", interrupted_ftruncate)
    with pytest.raises(KeyboardInterrupt):
        create_ring(layout)
    monkeypatch.undo()
    assert layout.name not in shm_entries("sfv"), "the half-made ring was left in /dev/shm"


def test_remove_dead_rings_removes_only_old_rings_of_dead_owners(tmp_path):
    """A ring whose owner died without unlinking it (its whole process tree killed, as with a
    lost Ray node) is removed by the next ring made; a live owner's, a young one's and anything
    not named like a ring stay."""
    import os
    import subprocess
    import time
    from findpeople.ring import remove_dead_rings
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no process has now
    names = [f"sfv{dead.pid}r", f"sfv{os.getpid()}r", f"sfv{dead.pid}9r", "sfvabcr", "sfv12x"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    old = time.time() - 120
    for name in (f"sfv{dead.pid}r", f"sfv{os.getpid()}r", "sfvabcr", "sfv12x"):
        os.utime(tmp_path / name, (old, old))
    assert remove_dead_rings(tmp_path) == [f"sfv{dead.pid}r"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
