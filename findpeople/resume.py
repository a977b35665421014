"""Resume: a finished video's results saved as <video folder>/video.json and reused by a later run.

Runs in the parent. A video's results are reused only when its fingerprint matches: the video's
content (size and SHA-256 of three samples), each photo's and model's SHA-256, the result
settings (RESULT_SETTINGS) and the providers that load. Only files this tool wrote (and that the
saved results no longer list) are ever removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from .errors import BadInput
from .settings import Settings
from .decode import VideoInfo
from .clips import clip_problem, frame_duration_s, source_video_s
from .providers import file_sha256, provider_chain, provider_library_error, visible_gpu_names
from .reports import write_json_atomic


# A video's saved results are reused only if these settings are unchanged.
# They change what is found, its snapshots or its clips. PROVIDERS is among them because TensorRT
# runs in fp16 and GPUs round differently from the CPU, so distances can change in the last digits.
_RESULT_SETTINGS = ("MODEL_PACK_NAME", "DET_SIZE", "PRE_UPSCALE_FACTOR", "det_prob_threshold",
                    "BOX_PADDING_PERCENTAGE", "CUSTOM_THRESHOLD", "MATCH_MARGIN", "MIN_TRACK_HITS",
                    "MIN_FACE_SIZE", "RECOGNITION_INTERVAL", "TRACK_MAX_GAP", "FRAME_INTERVAL",
                    "CLIP_DURATION_BEFORE", "CLIP_DURATION_AFTER", "MERGE_GAP_TOLERANCE", "CLIP_MODE",
                    "PROVIDERS", "FRAMES_ON_DEVICE", "TRT_FP16")
# ... and these cannot change the results: the Performance group only changes speed (frames are
# tracked in order whatever the batching, and int8 recognizers get one face per call); the folders
# are replaced by what the fingerprint records of their contents (the video file, each photo's and
# each model's content), or say where to write; the debug settings only add debug files.
_NEUTRAL_SETTINGS = ("NUM_GPU_PROCESSES", "GPU_WORKER_THREADS", "NUM_CPU_LOADERS", "BATCH_SIZE",
                     "MAX_BUFFER_SLOTS", "REC_CHUNK_SIZE", "VIDEO_DIR", "REFERENCE_DIR", "OUTPUT_DIR",
                     "RESUME", "MODEL_ROOT", "TRT_CACHE_DIR", "FFMPEG_DIR", "GPU_DEVICE_IDS", "debug_det",
                     "debug_det_dir", "debug_rec")
_SAVED_VIDEO_FILE = "video.json"  # OUTPUT_DIR/<video folder>/video.json: one finished video's results
_SAVED_VIDEO_FORMAT = 2
_VIDEO_SAMPLE_BYTES = 2**20  # a video is recognised by its size and the SHA-256 of its first,
# middle and last MiB (read in milliseconds, even over a network): see video_fingerprint
# The files main.py writes in a video's folder (and its clips/ folder); only these are removed,
# and only those that a video's saved results (video.json) do not list, once they are saved or
# reused. Anything else there is the user's. Frame numbers have at least 7 digits, and a time
# may be negative (a frame before the first one, in a damaged file).
_TOOL_FILE_NAMES = re.compile(r"(frame_\d{7,}_-?\d+\.\d{3}s_.+\.jpg|video\.json)(\.part)?")
_TOOL_CLIP_NAMES = re.compile(r"\d+\.\d{2}s_.+_d\d+\.\d{3}\.mp4(\.part)?")


def run_fingerprint(settings: Settings, references: list, model_paths: list) -> dict:
    """Return what every video's results depend on besides the video: the settings that change
    results (_RESULT_SETTINGS), each person's photos by content, in order, the model files by
    content, and what runs them (see execution_fingerprint), as JSON would read it back (tuples
    become lists)."""
    return json.loads(json.dumps({
        "settings": {name: settings.values[name] for name in _RESULT_SETTINGS},
        "references": [[r.name, [file_sha256(Path(p)) for p in r.photos]] for r in references],
        "models": {Path(p).name: file_sha256(Path(p)) for p in model_paths},
        "execution": execution_fingerprint(settings)}))


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


def saved_video_path(output_dir: Path, info: VideoInfo) -> Path:
    """Return where a video's finished results are saved: OUTPUT_DIR/<video folder>/video.json."""
    return output_dir / info.output_name / _SAVED_VIDEO_FILE


def tool_output_files(folder: Path) -> list:
    """Return the files main.py writes in a video's folder: snapshots, clips, video.json and
    their .part files (nothing else there is touched)."""
    found = []
    for directory, names in ((folder, _TOOL_FILE_NAMES), (folder / "clips", _TOOL_CLIP_NAMES)):
        if directory.is_dir():
            found += [p for p in directory.iterdir() if p.is_file() and names.fullmatch(p.name)]
    return sorted(found)


def save_video_results(path: Path, fingerprint: dict, entry: dict, snapshots: list) -> dict:
    """Write video.json and return what it holds: the video's results.json entry, the names of
    its snapshots still on disk, the size in bytes of each of those and of each clip (by path
    under OUTPUT_DIR, as results.json names clips), and the fingerprint."""
    folder = path.parent
    output_dir = folder.parent  # OUTPUT_DIR/<video folder>/video.json
    snapshots = sorted(name for name in set(snapshots) if (folder / name).is_file())
    files = [f"{folder.name}/{name}" for name in snapshots] + \
        [r["clip"] for r in entry["ranges"] if r["clip"]]
    saved = {"format": _SAVED_VIDEO_FORMAT, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "fingerprint": fingerprint, "snapshots": snapshots,
             "file_bytes": {name: (output_dir / name).stat().st_size for name in files
                            if (output_dir / name).is_file()},
             "entry": entry}
    write_json_atomic(path, saved)
    return saved


def replace_saved_video(path: Path, fingerprint: dict, entry: dict, snapshots: list) -> None:
    """Save a video's new results (video.json), then remove the files main.py wrote for it earlier
    that these do not list: until then, an earlier run's results stay whole on disk."""
    remove_unlisted_files(path.parent, save_video_results(path, fingerprint, entry, snapshots))


def remove_unlisted_files(folder: Path, saved: dict) -> list:
    """Remove main.py's files in a video's folder that its saved results do not list (stale
    snapshots and clips, .part files of an interrupted run); return their paths."""
    listed = {folder.parent / name for name in saved["file_bytes"]} | {folder / _SAVED_VIDEO_FILE}
    stale = [p for p in tool_output_files(folder) if p not in listed]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def read_saved_video(path: Path) -> dict | None:
    """Return a video.json's content, or None if there is none; raise BadInput naming the file
    if it cannot be read or is not one (truncated, edited, from another version)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        raise BadInput(f"{path}: cannot be read ({error}); the video is searched again") from None
    kinds = {"fingerprint": dict, "snapshots": list, "file_bytes": dict, "entry": dict}
    if not isinstance(saved, dict) or saved.get("format") != _SAVED_VIDEO_FORMAT \
            or not all(isinstance(saved.get(key), kind) for key, kind in kinds.items()):
        raise BadInput(f"{path}: not a video.json of this version; the video is searched again")
    return saved


def reuse_problem(saved: dict, fingerprint: dict, folder: Path, output_dir: Path) -> str | None:
    """Return why a saved video cannot be reused, or None if it can: the video file, a setting,
    a photo, a model or what runs them changed, or its search or clips did not finish, or one of
    its files is missing or has another size than when it was saved."""
    old = saved["fingerprint"]
    old_settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
    changed = [k for k, v in fingerprint["settings"].items()
               if k not in old_settings or old_settings[k] != v]
    if old.get("video") != fingerprint["video"]:
        return "the video file changed"
    if changed:
        return f"settings changed: {', '.join(changed)}"
    if old.get("references") != fingerprint["references"]:
        return "the reference photos changed"
    if old.get("models") != fingerprint["models"]:
        return "the model files changed"
    if old.get("execution") != fingerprint["execution"]:
        return (f"it was searched with {execution_text(old.get('execution'))}, this run uses "
                f"{execution_text(fingerprint['execution'])}")
    return entry_problem(saved, folder, output_dir)


def entry_problem(saved: dict, folder: Path, output_dir: Path) -> str | None:
    """Return why a saved video is not a finished one with all its files on disk as they were
    saved (same size in bytes), or None if it is one."""
    entry = saved["entry"]
    try:
        if entry["status"] != "ok" or entry["errors"]:
            return f"its search did not finish (status {entry['status']}, {len(entry['errors'])} error(s))"
        if entry["output_folder"] != folder.name:
            return f"it was saved for the folder {entry['output_folder']}"
        clips = [r["clip"] for r in entry["ranges"]]
    except (KeyError, TypeError):  # an entry edited by hand, or from another version
        return "its saved entry lacks fields"
    if None in clips:
        return f"{clips.count(None)} of its {len(clips)} clips were not cut"
    files = clips + [f"{folder.name}/{name}" for name in saved["snapshots"]]
    missing = [f for f in files if not (output_dir / str(f)).is_file()]
    if missing:
        return f"{len(missing)} of its files are missing, e.g. {missing[0]}"
    if not set(files) <= set(saved["file_bytes"]):
        return "its saved entry lacks fields"
    changed = [f for f in files if (output_dir / f).stat().st_size != saved["file_bytes"][f]]
    return (f"{len(changed)} of its files changed since it was saved (another size), e.g. "
            f"{changed[0]}") if changed else None


def saved_clips_problem(entry: dict, info: VideoInfo, output_dir: Path, mode: str) -> str | None:
    """Return what is wrong with the first of a saved video's clips that fails the check a new
    clip passes before it is renamed (clip_problem: a video stream, a frame that decodes, as long
    as the video it was cut from, in CLIP_MODE mode), or None when every one passes."""
    for saved_range in entry["ranges"]:
        start_s, end_s = saved_range["clip_start"], saved_range["end"]
        problem = clip_problem(output_dir / saved_range["clip"], source_video_s(info, start_s, end_s),
                               frame_duration_s(info), mode)
        if problem is not None:
            return f"its clip {saved_range['clip']} does not play as cut: the clip {problem}"
    return None
