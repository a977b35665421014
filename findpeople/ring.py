"""Ring buffer: the shared-memory frames between decoders and workers, and the child-process frame.

The parent plans the ring (`plan_ring`: slots x the largest frame's pixels, shrunk to fit /dev/shm
or RAM), creates it (`create_ring`) and alone unlinks it. Children attach by name in `run_child`,
which also ignores SIGINT, reports a failure as ("error", name, traceback) and closes the handle
in its `finally`. Slot indices travel through the free and filled queues; pixels never do.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import queue
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import BadInput
from .settings import Settings

if TYPE_CHECKING:  # annotations only: importing these would make a cycle
    from .decode import VideoInfo


_SHM_PREFIX = "sfv"  # ring buffer names: sfv<pid>r, so a block left by a crashed run can be found
QUEUE_TIMEOUT_S = 0.2  # every blocking get/put wakes this often to re-check the stop event


_MIN_RING_SLOTS = 2  # the fewest ring slots the pipeline runs with: one being decoded, one in a worker


@dataclass(frozen=True)
class RingLayout:
    """Shape of the shared-memory ring; small and picklable, handed to every child. A slot holds
    height x width x channels bytes, flat: any frame with at most that many pixels fits, whatever
    its own shape (see slot_image)."""

    name: str
    slot_count: int
    height: int  # px, of the frame with the most pixels
    width: int  # px, of that frame
    channels: int = 3

    @property
    def slot_bytes(self) -> int:
        return self.height * self.width * self.channels


class StageClock:
    """Seconds spent per pipeline stage in one process (thread-safe), reported at its end."""

    def __init__(self):
        self.seconds, self.counts, self.lock = {}, {}, threading.Lock()

    def add(self, stage: str, seconds: float, count: int = 1) -> None:
        """Add time (and a count of items) to a stage."""
        with self.lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.counts[stage] = self.counts.get(stage, 0) + count

    def report(self) -> dict:
        """Return {stage: {"s": seconds, "n": count}}."""
        with self.lock:
            return {k: {"s": round(v, 3), "n": self.counts[k]} for k, v in self.seconds.items()}


def run_child(name: str, layout, result_q, queues: tuple, body) -> None:
    """The life of every child process: ignore SIGINT (the parent handles Ctrl-C), attach the
    ring, run body(ring), then say "done"; on an error send its traceback and exit non-zero.
    Always detach from the ring (never unlink: the parent owns it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shm = shared_memory.SharedMemory(name=layout.name)
    ring = ring_view(shm, layout)
    try:
        body(ring)
        result_q.put(("done", name))
    except BaseException:
        result_q.put(("error", name, traceback.format_exc()))
        raise
    finally:
        del ring
        try:
            shm.close()
        except BufferError:  # after an error, its traceback may still hold views of the ring;
            pass  # the mapping goes with the process, and the parent unlinks the block
        abandon_if_orphaned(result_q, *queues)


def ring_layout_for(videos: list, slot_count: int, run_tag: str) -> RingLayout:
    """Return a layout whose slots hold the frame with the most pixels of any video: a landscape
    and a portrait 4K video share 3840x2160-pixel slots (not 3840x3840), so that what
    check_fits_ring allows for each video alone also fits them together."""
    largest = max(videos, key=lambda v: v.width * v.height)
    return RingLayout(name=f"{_SHM_PREFIX}{run_tag}r", slot_count=slot_count,
                      height=largest.height, width=largest.width)


def available_ram_bytes() -> int | None:
    """Return the RAM available to new allocations in bytes (Linux MemAvailable; Windows
    GlobalMemoryStatusEx; other systems' free pages), or None where it cannot be read."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    if sys.platform == "win32":
        return windows_available_ram_bytes()
    names = getattr(os, "sysconf_names", {})
    if "SC_AVPHYS_PAGES" in names and "SC_PAGE_SIZE" in names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def windows_available_ram_bytes() -> int | None:
    """Return Windows' available physical memory in bytes (GlobalMemoryStatusEx), or None."""
    import ctypes

    class MemoryStatus(ctypes.Structure):  # MEMORYSTATUSEX
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong),
                    *[(name, ctypes.c_ulonglong) for name in (
                        "total_phys", "avail_phys", "total_page_file", "avail_page_file",
                        "total_virtual", "avail_virtual", "avail_extended_virtual")]]
    status = MemoryStatus(length=ctypes.sizeof(MemoryStatus))
    return status.avail_phys if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)) \
        else None


def ring_memory_budget() -> tuple:
    """Return (bytes the ring may take, what sets that limit), or (None, "") where nothing can be
    measured: the smaller of /dev/shm's free space (Linux; Docker's default is 64 MB) and half
    the available RAM (the other half is for the models and the frames being processed)."""
    limits = []
    if Path("/dev/shm").is_dir():
        free = shutil.disk_usage("/dev/shm").free
        limits.append((free, f"{free / 2**20:.0f} MB free in /dev/shm"))
    ram = available_ram_bytes()
    if ram:
        limits.append((ram // 2, f"half of the {ram / 2**20:.0f} MB of available RAM"))
    return min(limits) if limits else (None, "")


def fit_slot_count(requested: int, slot_bytes: int, budget_bytes: int | None) -> int:
    """Return how many slots of slot_bytes to make: requested, or fewer where budget_bytes (None:
    unknown) holds fewer; the caller refuses videos that leave fewer than _MIN_RING_SLOTS."""
    return requested if budget_bytes is None else min(requested, budget_bytes // slot_bytes)


def check_fits_ring(info: VideoInfo, budget_bytes: int | None, why: str) -> None:
    """Raise BadInput if even the fewest ring slots (_MIN_RING_SLOTS) of this video's frame size
    do not fit the memory the ring may take. The need is rounded up and the memory available
    down, so the message never says '12 MB ... more than the 12 MB available'."""
    slot_bytes = info.width * info.height * 3
    if fit_slot_count(_MIN_RING_SLOTS, slot_bytes, budget_bytes) < _MIN_RING_SLOTS:
        height = height_that_fits(info, budget_bytes)
        scale = (f", or scale it down (ffmpeg -i IN -vf scale=-2:{height} OUT.mp4)"
                 if height else "")
        raise BadInput(
            f"{info.path}: its {info.width}x{info.height} frames need "
            f"{math.ceil(_MIN_RING_SLOTS * slot_bytes / 2**20)} MB of shared memory for the "
            f"{_MIN_RING_SLOTS} ring slots a search needs at least, more than the "
            f"{budget_bytes // 2**20} MB available ({why}); skipped. Free memory or enlarge "
            f"/dev/shm (Docker: --shm-size=2g){scale}")


def height_that_fits(info: VideoInfo, budget_bytes: int) -> int | None:
    """Return the largest common frame height (px) below the video's own at which, scaled with
    its aspect ratio kept, _MIN_RING_SLOTS frames fit budget_bytes; None if none does."""
    for height in (2160, 1440, 1080, 720, 540, 360):
        width = info.width * height / info.height
        if height < info.height and _MIN_RING_SLOTS * width * height * 3 <= budget_bytes:
            return height
    return None


def plan_ring(videos: list, settings: Settings, run_tag: str) -> RingLayout:
    """Return the ring's layout: MAX_BUFFER_SLOTS slots of the largest frame, or as many as fit
    the memory budget (never fewer than _MIN_RING_SLOTS), printing why when it is fewer."""
    wanted = ring_layout_for(videos, settings.MAX_BUFFER_SLOTS, run_tag)
    budget_bytes, why = ring_memory_budget()
    slot_count = fit_slot_count(wanted.slot_count, wanted.slot_bytes, budget_bytes)
    if slot_count >= wanted.slot_count:
        return wanted
    slot_count = max(slot_count, _MIN_RING_SLOTS)
    useful = settings.NUM_GPU_PROCESSES * settings.GPU_WORKER_THREADS + 1
    print(f"[!] ring buffer: {wanted.slot_count} slots of {wanted.width}x{wanted.height} frames "
          f"would take {wanted.slot_count * wanted.slot_bytes / 2**20:.0f} MB, more than the "
          f"{budget_bytes / 2**20:.0f} MB available ({why}): using {slot_count} slots"
          + (f", fewer than the {useful} the workers can use at once, so they will wait for "
             f"frames; free memory or enlarge /dev/shm (Docker: --shm-size) to go faster"
             if slot_count < useful else ""), flush=True)
    return ring_layout_for(videos, slot_count, run_tag)


@contextlib.contextmanager
def sigint_held():
    """Hold a Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt: for steps that
    must not be cut in half (creating the ring, starting a child). SIGINT is also blocked
    meanwhile (POSIX; not on Windows), as multiprocessing starts its resource tracker, so that a
    child started inside inherits it blocked. Outside the main thread it holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are the main thread's (a test may start a pipeline elsewhere)
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    blocking = hasattr(signal, "pthread_sigmask")
    if blocking:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if blocking:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending one lands in held
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def remove_dead_rings(folder: Path = Path("/dev/shm"), older_than_s: float = 60.0) -> list:
    """Remove the rings (sfv<pid>r) of owners that died without unlinking them (killed with
    their whole process tree, as when a Ray node's raylet is killed); return their names. Only
    blocks of this user, older than older_than_s, whose pid no process has (a pid of another PID
    namespace sharing /dev/shm looks dead: hence the age). Nothing on systems without /dev/shm."""
    removed = []
    for path in folder.glob(f"{_SHM_PREFIX}*r") if folder.is_dir() else []:
        match = re.fullmatch(rf"{_SHM_PREFIX}(\d+)r", path.name)
        try:
            info = path.stat()
            if (match is None or info.st_uid != os.getuid() or time.time() - info.st_mtime < older_than_s
                    or pid_alive(int(match.group(1)))):
                continue
            path.unlink()
            removed.append(path.name)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def pid_alive(pid: int) -> bool:
    """Return True when a process with this pid exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_ring(layout: RingLayout) -> shared_memory.SharedMemory:
    """Create the ring's shared memory (parent only; the parent also unlinks it), after removing
    the rings dead owners left (remove_dead_rings). A Ctrl-C meanwhile cannot leave a block
    behind that nobody owns: it is held until the block is made (shm_open, then sizing it), and
    the block is unlinked before the Ctrl-C goes on."""
    remove_dead_rings()
    shm = None
    try:
        with sigint_held():
            shm = shared_memory.SharedMemory(name=layout.name, create=True,
                                             size=layout.slot_bytes * layout.slot_count)
    except KeyboardInterrupt:
        if shm is not None:
            shm.close()
            shm.unlink()
        raise
    return shm


def ring_view(shm: shared_memory.SharedMemory, layout: RingLayout) -> np.ndarray:
    """Return a [slots, slot bytes] uint8 view of the ring (delete it before close); a frame
    is read back with slot_image."""
    return np.ndarray((layout.slot_count, layout.slot_bytes), dtype=np.uint8, buffer=shm.buf)


def new_slot_queue(ctx, slot_count: int):
    """Return the free-slot queue, filled with every slot index (bounded: one entry per slot)."""
    free_q = ctx.Queue(maxsize=slot_count)
    for slot in range(slot_count):
        free_q.put(slot)
    return free_q


def parent_gone() -> bool:
    """Return True in a child whose parent process has died (killed: nobody will stop us)."""
    parent = mp.parent_process()
    return parent is not None and not parent.is_alive()


def get_with_stop(q, stop_event):
    """Return the next item of q, or None once stop_event is set or the parent is gone; never
    blocks for good."""
    while not stop_event.is_set():
        try:
            return q.get(timeout=QUEUE_TIMEOUT_S)
        except queue.Empty:
            if parent_gone():
                return None
    return None


def abandon_if_orphaned(*queues) -> None:
    """In a child whose parent died, drop unsent queue data so the process can exit (a feeder
    thread would otherwise wait for ever on a pipe nobody reads)."""
    if parent_gone():
        for q in queues:
            q.cancel_join_thread()


def write_slot(ring: np.ndarray, slot: int, image: np.ndarray) -> None:
    """Copy a frame (height x width x 3) to the start of a slot, row by row."""
    ring[slot].reshape(-1)[:image.size] = image.reshape(-1)


def slot_image(ring: np.ndarray, slot: int, height: int, width: int) -> np.ndarray:
    """Return a (height, width, 3) view of the frame write_slot put in a slot (no copy)."""
    return ring[slot].reshape(-1)[:height * width * 3].reshape(height, width, 3)
