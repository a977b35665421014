"""Output files: one run per output folder, snapshot names and pictures, person colours, and
atomic file writes.

Runs in the workers (debug images) and in the parent (the output folder's lock, snapshots,
reports, made.json, batched detector copies). Every file is written through a `.part` file
renamed into place, so an interrupted run never leaves a half-written file that looks finished.
The parent holds OUTPUT_DIR's lock for the whole run (`output_folder_lock`), so two runs never
write into the same files.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import BadInput
from .settings import Settings

if TYPE_CHECKING:  # annotations only: importing these would make a cycle
    from .decode import VideoInfo


_LOCK_FILE = ".findpeople.lock"  # OUTPUT_DIR/.findpeople.lock: locked while a run uses the folder
_HOLDER_FILE = ".findpeople.run.json"  # who holds the lock (pid, host, start time), for the message
_PALETTE_BGR = [(0, 200, 255), (255, 120, 0), (80, 220, 80), (200, 60, 255), (255, 255, 0),
                (60, 60, 255), (0, 255, 180), (255, 0, 160), (160, 160, 255), (0, 140, 255)]


def padded_box(box: list, padding_pct: float, width: int, height: int) -> tuple:
    """Return the box (ints) grown by padding_pct of its size on each side, clamped to the frame."""
    x1, y1, x2, y2 = box
    pad_x, pad_y = (x2 - x1) * padding_pct / 100, (y2 - y1) * padding_pct / 100
    return (max(0, int(x1 - pad_x)), max(0, int(y1 - pad_y)),
            min(width - 1, int(x2 + pad_x)), min(height - 1, int(y2 + pad_y)))


def person_color(person_idx: int) -> tuple:
    """Return the BGR colour of a person (by their index, stable for the run)."""
    return _PALETTE_BGR[person_idx % len(_PALETTE_BGR)]


def snapshot_path(output_dir: Path, info: VideoInfo, frame_idx: int, time_s: float, name: str) -> Path:
    """Return where the snapshot of one person in one frame goes."""
    return output_dir / info.output_name / f"frame_{frame_idx:07d}_{time_s:09.3f}s_{safe_file_name(name)}.jpg"


def safe_file_name(name: str) -> str:
    """Return a label with the characters files and links cannot hold replaced by '_'."""
    return re.sub(r'[<>:"/\\|?*#%\x00-\x1f]', "_", name)


def encode_snapshot(image: np.ndarray, box, name: str, distance: float, person_idx: int,
                    settings: Settings) -> bytes:
    """Return a JPEG of the frame with this face boxed (padded) and labelled with its distance."""
    import cv2
    canvas = np.array(image)  # a copy: the ring slot is handed back to the decoders
    height, width = canvas.shape[:2]
    color = person_color(person_idx)
    x1, y1, x2, y2 = padded_box(box[:4], settings.BOX_PADDING_PERCENTAGE, width, height)
    thickness = max(2, round(min(width, height) / 360))
    cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
    cv2.putText(canvas, f"{name} d={distance:.3f}", (x1, max(14, y1 - 6)), cv2.FONT_HERSHEY_SIMPLEX,
                0.25 * thickness + 0.1, color, thickness, cv2.LINE_AA)
    ok, data = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise OSError(f"could not encode a snapshot of {name}")
    return data.tobytes()


def fsync_file(path: Path) -> None:
    """Flush a written file's bytes to the disk, so that a rename after it never publishes a file
    whose content a power cut could still lose."""
    import errno
    descriptor = os.open(path, os.O_RDWR)  # Windows needs write access to flush
    try:
        os.fsync(descriptor)
    except OSError as error:  # a file system that cannot flush (some network shares) still
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # renames whole
            raise
    finally:
        os.close(descriptor)


def write_bytes_atomic(path: Path, data: bytes, flush: bool = True) -> None:
    """Write a file through a .part file, flushed to the disk (unless flush is False) and renamed
    into place, so no half-written file is left; on any failure (disk full, no permission,
    Ctrl-C) remove the .part; an OSError is raised again naming the file."""
    part = path.with_name(path.name + ".part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(data)
        if flush:
            fsync_file(part)
        os.replace(part, path)
    except BaseException as error:
        part.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
        raise


@contextlib.contextmanager
def output_folder_lock(folder: Path):
    """Hold the output folder for this run; raise BadInput naming the run that holds it already.

    The lock is the operating system's (filelock: flock on Linux, msvcrt on Windows): it goes
    with the process that held it, so a run killed by kill -9 or a power cut never blocks the
    next one. Who holds it is written beside it while the run lasts, for the message the next
    run gives; a full disk only leaves that unsaid.
    """
    import filelock
    lock = filelock.FileLock(folder / _LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise BadInput(f"output folder {folder} is in use by another run ({lock_holder(folder)}): "
                       f"wait for it to finish, or choose another folder with --output") from None
    except (OSError, NotImplementedError) as error:  # a file system that cannot lock
        raise BadInput(f"output folder {folder} cannot be locked for this run ({error}): choose "
                       f"another folder with --output") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        with contextlib.suppress(OSError):  # the lock holds without it (a full disk, say)
            (folder / _HOLDER_FILE).unlink(missing_ok=True)  # a killed run's: never name it
            write_bytes_atomic(folder / _HOLDER_FILE, json.dumps(holder).encode(), flush=False)
        yield
    finally:
        with contextlib.suppress(OSError):
            (folder / _HOLDER_FILE).unlink(missing_ok=True)
        lock.release()


def lock_holder(folder: Path) -> str:
    """Return who holds an output folder's lock, as its holder file says ("pid 123 on host,
    started 2026-12-02 10:00:00"), or that this is unknown."""
    try:
        holder = json.loads((folder / _HOLDER_FILE).read_text(encoding="utf-8"))
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid and start time are not known yet"
