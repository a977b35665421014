"""Reuse: what an earlier run made in a video's output folder (snapshots, clips) is kept and reused.

Runs in the parent. The index (index.py) replaces searching a video again; this module decides
the rest: a snapshot or clip is reused, not made again, when the file its folder's made.json
lists is on disk with the same size and was made from the same thing (the video's content
fingerprint, the range or face, the settings that shape it). After a video's outputs are
complete, main.py's files in its folder that this run did not list are removed; only files this
tool writes (by their names) are ever removed. Also the fingerprints: a video's content, and what
runs the models (both part of an index's identity).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from .settings import Settings
from .decode import VideoInfo
from .clips import clip_problem, frame_duration_s, source_video_s
from .providers import provider_chain, provider_library_error, visible_gpu_names
from .reports import write_json_atomic


MADE_FILE = "made.json"  # OUTPUT_DIR/<video folder>/made.json: what each snapshot and clip was made from
MADE_FORMAT = 1
_VIDEO_SAMPLE_BYTES = 2**20  # a video is recognised by its size and the SHA-256 of its first,
# middle and last MiB (read in milliseconds, even over a network): see video_fingerprint
# The files main.py writes in a video's folder (and its clips/ folder); only these are removed,
# and only those that a run did not list, once the video's outputs are complete (video.json is
# what versions before the index wrote). Anything else there is the user's. Frame numbers have at least 7 digits, and a time
# may be negative (a frame before the first one, in a damaged file).
_TOOL_FILE_NAMES = re.compile(r"(frame_\d{7,}_-?\d+\.\d{3}s_.+\.jpg|made\.json|video\.json)(\.part)?")
_TOOL_CLIP_NAMES = re.compile(r"\d+\.\d{2}s_.+_d\d+\.\d{3}\.mp4(\.part)?")


def execution_fingerprint(settings: Settings) -> dict:
    """Return what the models can run on here: the providers PROVIDERS resolves to whose
    libraries load, and the visible GPU models when a GPU provider is among them (results made
    on a GPU are then not reused on a CPU-only machine, nor the other way round)."""
    import onnxruntime as ort
    chain = [p for p in provider_chain(settings.PROVIDERS, ort.get_available_providers())
             if provider_library_error(p) is None]  # onnxruntime-gpu lists TensorRT even without it
    gpus = sorted(set(visible_gpu_names())) if chain[0] != "CPUExecutionProvider" else []
    return {"providers": chain, "gpus": gpus}


def execution_text(execution) -> str:
    """Return an execution_fingerprint as words: 'CUDAExecutionProvider on NVIDIA H200'."""
    if not isinstance(execution, dict):
        return "unknown providers"
    gpus = ", ".join(execution.get("gpus") or []) or "no GPU"
    return f"{' > '.join(execution.get('providers') or [])} on {gpus}"


def video_fingerprint(path: str) -> dict:
    """Return the identity of a video file by its content, not its path or time stamps (a moved,
    copied or remounted video is the same video): its size in bytes and the SHA-256 of its first,
    middle and last MiB (of the whole file when it is at most 3 MiB)."""
    size = os.stat(path).st_size
    whole = size <= 3 * _VIDEO_SAMPLE_BYTES
    offsets = [0] if whole else [0, (size - _VIDEO_SAMPLE_BYTES) // 2, size - _VIDEO_SAMPLE_BYTES]
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for offset in offsets:
            file.seek(offset)
            digest.update(file.read(size if whole else _VIDEO_SAMPLE_BYTES))
    return {"size": size, "sampled_sha256": digest.hexdigest()}


def tool_output_files(folder: Path) -> list:
    """Return the files main.py writes in a video's folder: snapshots, clips, made.json (and an
    older version's video.json) and their .part files (nothing else there is touched)."""
    found = []
    for directory, names in ((folder, _TOOL_FILE_NAMES), (folder / "clips", _TOOL_CLIP_NAMES)):
        if directory.is_dir():
            found += [p for p in directory.iterdir() if p.is_file() and names.fullmatch(p.name)]
    return sorted(found)

def comparable(key) -> object:
    """Return a key as JSON reads it back (tuples become lists, numbers plain), for comparison."""
    return json.loads(json.dumps(key))


def read_made(folder: Path) -> dict:
    """Return {file name relative to the video folder: {"key", "bytes", ...}} from its
    made.json; {} when there is none or it cannot be read (then everything is made again)."""
    try:
        made = json.loads((folder / MADE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = made.get("files") if isinstance(made, dict) and made.get("format") == MADE_FORMAT else None
    return {name: entry for name, entry in (files or {}).items()
            if isinstance(entry, dict) and "key" in entry and "bytes" in entry}


def made_before(made: dict, folder: Path, name: str, key: dict) -> dict | None:
    """Return the made.json entry of a file that can be reused: made from the same key, on disk
    with the size it had then; else None."""
    entry = made.get(name)
    path = folder / name
    if entry is None or entry["key"] != comparable(key) or not path.is_file():
        return None
    return entry if path.stat().st_size == entry["bytes"] else None


def made_entry(folder: Path, name: str, key: dict, **extra) -> dict:
    """Return the made.json entry of a file just written in a video's folder."""
    return {"key": comparable(key), "bytes": (folder / name).stat().st_size, **extra}


def write_made(folder: Path, files: dict) -> None:
    """Write a video folder's made.json: {file name: made_entry}."""
    write_json_atomic(folder / MADE_FILE, {"format": MADE_FORMAT, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                          "files": files})


def snapshot_key(fingerprint: dict | None, look: tuple, person: int, settings: Settings) -> dict:
    """Return what a snapshot is made from: the video, the face (frame, box, distance), its
    person's colour and the box padding."""
    frame_idx, time_s, box, distance = look
    return {"video": fingerprint, "frame": frame_idx, "time": time_s, "box": box,
            "distance": round(distance, 3), "colour": person, "padding": settings.BOX_PADDING_PERCENTAGE}


def clip_key(fingerprint: dict | None, time_range, settings: Settings) -> dict:
    """Return what a clip is cut from: the video, the range and the clip mode."""
    return {"video": fingerprint, "name": time_range.name, "start": time_range.start_s,
            "end": time_range.end_s, "mode": settings.CLIP_MODE}


def reused_clip_problem(folder: Path, name: str, entry: dict, info: VideoInfo, end_s: float,
                        mode: str) -> str | None:
    """Return what is wrong with a clip made before (the check a new clip passes: see
    clips.clip_problem), or None when it may be reused."""
    problem = clip_problem(folder / name, source_video_s(info, entry["clip_start"], end_s),
                           frame_duration_s(info), mode)
    return None if problem is None else f"the clip {problem}"


def remove_unlisted_files(folder: Path, listed: set) -> list:
    """Remove main.py's files in a video's folder (tool_output_files) that are not listed (by
    name relative to the folder; made.json is kept); return their paths."""
    keep = {folder / name for name in listed} | {folder / MADE_FILE}
    stale = [p for p in tool_output_files(folder) if p not in keep]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
