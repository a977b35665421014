"""Find the people shown in reference photos inside a folder of videos.

Run (after `pip install -r requirements.txt`):
    python main.py                                   # in_video/ + samples_jpg/ -> found_fragments_colored_/
    python main.py --custom-threshold 0.6 --frame-interval 2 --providers cpu
    python main.py --help                            # every setting, with its default

Data flow (all processes come from one `spawn` context owned by the parent):

    parent ──jobs_q──> decoder-i  (NUM_CPU_LOADERS processes, PyAV)
                          │  free_q: slot indices ready to be written   (parent fills, workers return)
                          │  ring:   shared memory, MAX_BUFFER_SLOTS frames of the largest video
                          v  filled_q: (video_idx, frame_idx, time_s, height, width, slot)
                       worker-j   (NUM_GPU_PROCESSES processes x GPU_WORKER_THREADS threads)
                          │  SCRFD detection -> 5-point alignment -> ArcFace embeddings -> matching
                          │  writes snapshots of matched frames, returns the slot to free_q
                          v
    parent <──result_q── decoders and workers: ("frames" | "video_done" | "ready" | "error" | "done", ...)
       └─> ranges per person -> ffmpeg clips -> results.json / results.csv / summary

Ownership: the parent creates every queue, the stop event and the ring's shared memory; only the
parent unlinks the ring, in a `finally`, after joining the children. Children attach by name,
ignore SIGINT, close their handle in their own `finally`, and send ("error", name, traceback) on
failure. Pixels never travel through a queue: only slot indices do.

Times are float seconds from the first video frame (its presentation timestamp), never
frame_idx / fps. ffmpeg's input `-ss` counts from the container start; `container_seek_s` is the
one place that converts between the two clocks.

InsightFace's pretrained models are for non-commercial research purposes only.
"""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import types
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

# ──────────────────────────────────────────────────────────────────────────────────────────────
# SETTINGS: edit these, or override any of them on the command line (python main.py --help).
# ──────────────────────────────────────────────────────────────────────────────────────────────
# Performance
NUM_GPU_PROCESSES = 1  # inference worker processes, 1..16
GPU_WORKER_THREADS = 2  # threads per worker process, 1..16; overlap pre/post-processing with inference
NUM_CPU_LOADERS = 2  # decoder processes, 1..32; each decodes one video at a time
BATCH_SIZE = 8  # frames a worker thread takes at once, 1..256
MAX_BUFFER_SLOTS = 32  # frames in the shared-memory ring, 2..4096; memory = slots x largest frame
REC_CHUNK_SIZE = 32  # aligned faces per recognizer call, 1..1024
# Detection
MODEL_PACK_NAME = "buffalo_l"  # InsightFace pack folder name, e.g. buffalo_l, buffalo_s, buffalo_sc
DET_SIZE = (640, 640)  # px (width, height) of the detector input, multiples of 32, 32..4096
PRE_UPSCALE_FACTOR = 1.0  # 1.0..4.0; detector input = DET_SIZE x this, for small faces in big frames
det_prob_threshold = 0.25  # 0..1; minimum SCRFD face score kept before recognition
BOX_PADDING_PERCENTAGE = 10  # %, 0..100; box padding on each side in snapshots
# Matching
CUSTOM_THRESHOLD = 0.60  # cosine DISTANCE (1 - cosine similarity), 0..2; match when <= this; lower is stricter
# Clips
FRAME_INTERVAL = 1  # process every N-th decoded frame, 1..1000
CLIP_DURATION_BEFORE = 2.0  # s, 0..600; clip starts this long before the first sighting
CLIP_DURATION_AFTER = 2.0  # s, 0..600; clip ends this long after the last sighting
MERGE_GAP_TOLERANCE = 2.0  # s, 0..3600; sightings of one person closer than this form one range
# Folders
VIDEO_DIR = "in_video"  # folder of videos to search (searched recursively)
REFERENCE_DIR = "samples_jpg"  # reference photos: Name.jpg, Name_2.jpg, or a subfolder Name/
OUTPUT_DIR = "found_fragments_colored_"  # snapshots, clips, results.json, results.csv
MODEL_ROOT = "~/.insightface"  # holds models/<MODEL_PACK_NAME>/ (a folder holding <pack>/ also works)
TRT_CACHE_DIR = "insightface_trt_cache"  # TensorRT engines and timing cache
FFMPEG_DIR = "ffmpeg"  # optional local ffmpeg binary (ffmpeg or ffmpeg.exe); then PATH; then imageio-ffmpeg
# Advanced
PROVIDERS = "auto"  # auto | tensorrt | cuda | cpu; auto takes the best that really loads
debug_det = False  # save every frame's raw detections (before recognition) as images
debug_det_dir = "debug_det"  # where debug_det writes
debug_rec = False  # log every face's distance to every person (also to OUTPUT_DIR/debug_rec.tsv)
# ──────────────────────────────────────────────────────────────────────────────────────────────
SETTING_NAMES = (
    "NUM_GPU_PROCESSES", "GPU_WORKER_THREADS", "NUM_CPU_LOADERS", "BATCH_SIZE", "MAX_BUFFER_SLOTS",
    "REC_CHUNK_SIZE", "MODEL_PACK_NAME", "DET_SIZE", "PRE_UPSCALE_FACTOR", "det_prob_threshold",
    "BOX_PADDING_PERCENTAGE", "CUSTOM_THRESHOLD", "FRAME_INTERVAL", "CLIP_DURATION_BEFORE",
    "CLIP_DURATION_AFTER", "MERGE_GAP_TOLERANCE", "VIDEO_DIR", "REFERENCE_DIR", "OUTPUT_DIR",
    "MODEL_ROOT", "TRT_CACHE_DIR", "FFMPEG_DIR", "PROVIDERS", "debug_det", "debug_det_dir", "debug_rec",
)

# Internal constants ---------------------------------------------------------------------------
_VIDEO_EXTENSIONS = {".mp4", ".mkv", ".avi", ".mov", ".m4v", ".webm", ".wmv", ".flv", ".mpg",
                     ".mpeg", ".ts", ".mts", ".m2ts", ".3gp"}
_IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
_SHM_PREFIX = "sfv"  # ring buffer names: sfv<pid>r, so a block left by a crashed run can be found
_QUEUE_TIMEOUT_S = 0.2  # every blocking get/put wakes this often to re-check the stop event
_JOIN_TIMEOUT_S = 10.0  # per child at shutdown, then terminate
_NMS_IOU = 0.4  # SCRFD's own non-maximum-suppression overlap
_DET_MEAN, _DET_STD = 127.5, 128.0  # SCRFD input normalisation, RGB
# ArcFace 5-point template for a 112x112 crop. Landmark order: the eye with smaller x, the other
# eye, the nose tip, then the mouth corner with smaller x and the other mouth corner.
_ARCFACE_TEMPLATE_PX = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
# SCRFD output count -> (strides, anchors per location, has keypoints).
_SCRFD_LAYOUTS = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}
_PROVIDER_ORDER = {  # --providers value -> ONNX Runtime providers to try, best first
    "auto": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
}
_PALETTE_BGR = [(0, 200, 255), (255, 120, 0), (80, 220, 80), (200, 60, 255), (255, 255, 0),
                (60, 60, 255), (0, 255, 180), (255, 0, 160), (160, 160, 255), (0, 140, 255)]


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Records
# ──────────────────────────────────────────────────────────────────────────────────────────────
class BadInput(Exception):
    """A user file (video, photo, model, folder) that cannot be used; the message names it."""


class ClipError(Exception):
    """ffmpeg failed to cut a clip; the message names the video, range, exit code and stderr."""


class PipelineBroken(Exception):
    """A decoder or worker process died or failed; carries its name, exit code and traceback."""

    def __init__(self, name: str, exitcode, remote_traceback: str = ""):
        super().__init__(f"{name} stopped (exit code {exitcode})\n{remote_traceback}".rstrip())
        self.name, self.exitcode, self.remote_traceback = name, exitcode, remote_traceback


@dataclass(frozen=True)
class Settings:
    """The effective settings of one run; children receive this, never the module constants.

    Read-only: the pairs are a tuple, and `values` hands out a copy.
    """

    pairs: tuple  # ((name, value), ...) in SETTING_NAMES order

    def __post_init__(self):
        object.__setattr__(self, "_lookup", dict(self.pairs))

    def __reduce__(self):  # children rebuild it from the pairs alone
        return Settings, (self.pairs,)

    def __getattr__(self, name):
        try:
            return self.__dict__["_lookup"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def values(self) -> types.MappingProxyType:
        """Return a read-only view of the settings by name."""
        return types.MappingProxyType(self._lookup)


@dataclass(frozen=True)
class VideoInfo:
    """What the probe learnt about one video; times in seconds."""

    idx: int  # position in this run's video list
    path: str
    output_name: str  # folder name under OUTPUT_DIR (the stem, made unique)
    width: int
    height: int
    fps: float  # average frame rate, for display and frame durations only
    frame_count: int  # from the header; an estimate when the header has none
    duration_s: float  # of the video stream, from its first frame
    time_base: Fraction  # of the video stream
    origin_pts: int  # pts of the first video frame: time 0
    video_start_offset_s: float  # video start minus container start (Hamilton clip: 0.844)
    has_audio: bool


@dataclass(frozen=True)
class RingLayout:
    """Shape of the shared-memory ring; small and picklable, handed to every child."""

    name: str
    slot_count: int
    height: int
    width: int
    channels: int = 3

    @property
    def slot_bytes(self) -> int:
        return self.height * self.width * self.channels


@dataclass
class Reference:
    """The embeddings of one person's reference photos (rows L2-normalised)."""

    name: str
    photos: list
    embeddings: np.ndarray


@dataclass(frozen=True)
class TimeRange:
    """A half-open interval [start_s, end_s) of one person in one video."""

    name: str
    start_s: float
    end_s: float
    best_distance: float
    first_sighting_s: float
    last_sighting_s: float


@dataclass
class VideoResult:
    """Everything found in one video; filled by the parent as results arrive."""

    info: VideoInfo
    detections: list = field(default_factory=list)
    processed_frame_count: int = 0
    sent_frame_count: int | None = None  # frames its decoder sent; set when it finished the video
    ranges: list = field(default_factory=list)
    clips: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    finished: bool = False


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Settings loader
# ──────────────────────────────────────────────────────────────────────────────────────────────
_LIMITS = {  # name -> (minimum, maximum) for numbers; choices for strings
    "NUM_GPU_PROCESSES": (1, 16), "GPU_WORKER_THREADS": (1, 16), "NUM_CPU_LOADERS": (1, 32),
    "BATCH_SIZE": (1, 256), "MAX_BUFFER_SLOTS": (2, 4096), "REC_CHUNK_SIZE": (1, 1024),
    "DET_SIZE": (32, 4096), "PRE_UPSCALE_FACTOR": (1.0, 4.0), "det_prob_threshold": (0.0, 1.0),
    "BOX_PADDING_PERCENTAGE": (0, 100), "CUSTOM_THRESHOLD": (0.0, 2.0), "FRAME_INTERVAL": (1, 1000),
    "CLIP_DURATION_BEFORE": (0.0, 600.0), "CLIP_DURATION_AFTER": (0.0, 600.0),
    "MERGE_GAP_TOLERANCE": (0.0, 3600.0), "PROVIDERS": tuple(_PROVIDER_ORDER),
}
_FLAG_ALIASES = {"VIDEO_DIR": ["--videos"], "REFERENCE_DIR": ["--refs"], "OUTPUT_DIR": ["--output"],
                 "MODEL_ROOT": [], "MODEL_PACK_NAME": ["--model-pack"], "PROVIDERS": []}


def default_settings() -> dict:
    """Return the settings block's values by name."""
    module = sys.modules[__name__]
    return {name: getattr(module, name) for name in SETTING_NAMES}


def flag_name(setting: str) -> str:
    """Return the command-line flag spelled from a setting's name (DET_SIZE -> --det-size)."""
    return "--" + setting.lower().replace("_", "-")


@lru_cache(maxsize=1)
def setting_comments() -> dict:
    """Return each setting's inline comment from the settings block, for --help."""
    comments = {}
    for line in Path(__file__).read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z_]+) = .*?  # (.*)$", line)
        if match and match.group(1) in SETTING_NAMES:
            comments[match.group(1)] = match.group(2).replace("%", "%%")
    return comments


def parse_det_size(text: str) -> tuple:
    """Return (width, height) from '640', '640x480' or '640,480'."""
    parts = [p for p in re.split(r"[x,X\s]+", text.strip().strip("()")) if p]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected 640 or 640x480, got {text!r}")
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers, got {text!r}") from None


def build_arg_parser() -> argparse.ArgumentParser:
    """Return the parser: one flag per setting, plus aliases and --providers."""
    parser = argparse.ArgumentParser(
        description="Find the people in samples_jpg/ inside the videos in in_video/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = setting_comments()
    for name, default in default_settings().items():
        flags = [flag_name(name)] + _FLAG_ALIASES.get(name, [])
        if name == "PROVIDERS":
            flags = ["--providers"]
        kwargs = {"dest": name, "default": default, "help": comments.get(name, "")}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name == "DET_SIZE":
            kwargs.update(type=parse_det_size, metavar="W[xH]")
        elif name == "PROVIDERS":
            kwargs["choices"] = _LIMITS["PROVIDERS"]
        else:
            kwargs["type"] = float if isinstance(default, float) else type(default)
        parser.add_argument(*flags, **kwargs)
    return parser


def validate_settings(values: dict) -> None:
    """Raise ValueError naming the flag and its allowed range for any value out of range."""
    for name, limits in _LIMITS.items():
        value = values[name]
        if isinstance(limits[0], str):
            if value not in limits:
                raise ValueError(f"{flag_name(name)} must be one of {', '.join(limits)}, got {value!r}")
            continue
        low, high = limits
        for item in (value if isinstance(value, tuple) else (value,)):
            if not low <= item <= high:
                raise ValueError(f"{flag_name(name)} must be within {low}..{high}, got {value!r}")
    if any(side % 32 for side in values["DET_SIZE"]):
        raise ValueError(f"--det-size must be multiples of 32, got {values['DET_SIZE']}")


def load_settings(argv=None) -> Settings:
    """Return the effective settings: the block's defaults overridden by command-line flags."""
    args = build_arg_parser().parse_args(argv)
    values = {name: getattr(args, name) for name in SETTING_NAMES}
    values["DET_SIZE"] = tuple(values["DET_SIZE"])
    validate_settings(values)
    return Settings(tuple(values.items()))


def changed_settings(settings: Settings) -> dict:
    """Return the settings whose values differ from the block's defaults."""
    defaults = default_settings()
    return {k: v for k, v in settings.values.items() if defaults[k] != v}


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 1 References
# ──────────────────────────────────────────────────────────────────────────────────────────────
def reference_label(path: Path, root: Path) -> str:
    """Return the person's label: the subfolder name, or the file stem without a _<n> suffix."""
    relative = path.relative_to(root)
    if len(relative.parts) > 1:
        return relative.parts[0]
    return re.sub(r"_\d+$", "", path.stem) or path.stem


def list_reference_photos(folder: Path) -> dict:
    """Return {label: [photo paths]} for every image in the folder and its first-level subfolders."""
    if not folder.is_dir():
        raise BadInput(f"reference folder {folder} does not exist: create it and put one photo "
                       f"per person in it, named after the person (e.g. Barack_Obama.jpg)")
    photos = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in _IMAGE_EXTENSIONS:
            if len(path.relative_to(folder).parts) <= 2:
                photos.setdefault(reference_label(path, folder), []).append(path)
    return photos


def read_image(path: Path) -> np.ndarray:
    """Return a BGR uint8 image, or raise BadInput naming the file."""
    import cv2
    data = np.fromfile(str(path), dtype=np.uint8)  # handles non-ASCII paths on Windows too
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise BadInput(f"{path}: not a readable image (corrupt or unsupported format); "
                       f"replace it with a .jpg or .png photo")
    return image


def largest_face_index(boxes: np.ndarray) -> int:
    """Return the index of the box with the largest area."""
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return int(np.argmax(areas))


def load_references(folder: Path, models, settings: Settings) -> tuple:
    """Return ([Reference], [skipped photos], [notes]); embeds the largest face of each photo."""
    references, problems, notes = [], [], []
    for label, paths in list_reference_photos(folder).items():
        embeddings, used = [], []
        for path in paths:
            try:
                image = read_image(path)
            except BadInput as error:
                problems.append(str(error))
                continue
            faces = detect_faces(models, [image], settings)[0]
            if len(faces[0]) == 0:
                problems.append(f"{path}: no face found; use a photo where the face is clearly "
                                f"visible (skipped)")
                continue
            pick = largest_face_index(faces[0])
            if len(faces[0]) > 1:
                notes.append(f"{path}: {len(faces[0])} faces found, using the largest")
            crop = align_face(image, faces[1][pick])
            embeddings.append(embed_faces(models, [crop], settings.REC_CHUNK_SIZE)[0])
            used.append(str(path))
        if embeddings:
            references.append(Reference(label, used, np.stack(embeddings)))
    return references, problems, notes


def reference_matrix(references: list) -> tuple:
    """Return (embeddings [photos, dim], person index of each photo)."""
    embeddings = np.concatenate([r.embeddings for r in references]).astype(np.float32)
    owners = np.concatenate([np.full(len(r.embeddings), i) for i, r in enumerate(references)])
    return embeddings, owners


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 2 Decoding
# ──────────────────────────────────────────────────────────────────────────────────────────────
def list_videos(folder: Path) -> list:
    """Return the video files under a folder, sorted; raise BadInput if the folder is missing."""
    if not folder.is_dir():
        raise BadInput(f"video folder {folder} does not exist: create it and put your videos in it")
    return sorted(p.resolve() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in _VIDEO_EXTENSIONS)


def unique_output_names(paths: list, root: Path) -> list:
    """Return one output folder name per video: its stem, or where stems clash, its path under
    root with the extension (a/x.mp4 -> a_x_mp4)."""
    stems = [p.stem for p in paths]

    def long_name(path: Path) -> str:
        relative = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        return "_".join([*relative.parent.parts, relative.stem, relative.suffix.lstrip(".")])
    return [p.stem if stems.count(p.stem) == 1 else long_name(p) for p in paths]


def probe_video(path: Path, idx: int, output_name: str) -> VideoInfo:
    """Return the video's facts from its headers; raise BadInput naming the file and the problem."""
    import av
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadInput(f"{path}: has no video stream (audio only?); skipped")
            stream = container.streams.video[0]
            time_base = Fraction(stream.time_base)
            origin_pts = stream.start_time if stream.start_time is not None else 0
            container_start_s = (container.start_time or 0) / 1_000_000
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            if stream.duration:
                duration_s = float(stream.duration * time_base)
            else:
                duration_s = (container.duration or 0) / 1_000_000
            frame_count = stream.frames or int(round(duration_s * fps))
            if not stream.width or not stream.height:
                raise BadInput(f"{path}: video stream has no frame size; the file may be damaged")
            return VideoInfo(
                idx=idx, path=str(path), output_name=output_name, width=stream.width,
                height=stream.height, fps=fps, frame_count=frame_count, duration_s=duration_s,
                time_base=time_base, origin_pts=origin_pts,
                video_start_offset_s=float(origin_pts * time_base) - container_start_s,
                has_audio=bool(container.streams.audio))
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise BadInput(f"{path}: cannot be opened as a video ({error}); check the file plays, "
                       f"or remove it from the folder") from None


def frame_time_s(pts: int, origin_pts: int, time_base: Fraction) -> float:
    """Return a frame's time in seconds from the first video frame (exact until this conversion)."""
    return float((pts - origin_pts) * time_base)


def decode_frames(info: VideoInfo, frame_interval: int):
    """Yield (frame_idx, time_s, BGR array) for every frame_interval-th decoded frame."""
    import av
    with av.open(info.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        last_pts = None
        frame_duration = 1 / Fraction(info.fps).limit_denominator(100000) / info.time_base
        for frame_idx, frame in enumerate(container.decode(stream)):
            pts = frame.pts
            if pts is None:  # rare: a frame without a timestamp follows its predecessor
                pts = info.origin_pts if last_pts is None else last_pts + int(frame_duration)
            last_pts = pts
            if frame_idx % frame_interval == 0:
                yield frame_idx, frame_time_s(pts, info.origin_pts, info.time_base), \
                    frame.to_ndarray(format="bgr24")


def decoder_main(name, layout, jobs_q, free_q, filled_q, result_q, stop_event, frame_interval):
    """Decode each video from jobs_q into ring slots; report per video; exit on a None job."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shm = shared_memory.SharedMemory(name=layout.name)
    ring = ring_view(shm, layout)
    try:
        while (info := get_with_stop(jobs_q, stop_event)) is not None:
            sent, error = decode_into_ring(info, ring, free_q, filled_q, stop_event, frame_interval)
            result_q.put(("video_done", info.idx, sent, error))
        result_q.put(("done", name))
    except BaseException:
        result_q.put(("error", name, traceback.format_exc()))
        raise
    finally:
        del ring
        shm.close()


def decode_into_ring(info, ring, free_q, filled_q, stop_event, frame_interval) -> tuple:
    """Return (frames sent, error text or None) after streaming one video into the ring."""
    import av
    sent = 0
    try:
        for frame_idx, time_s, image in decode_frames(info, frame_interval):
            if image.shape[0] > ring.shape[1] or image.shape[1] > ring.shape[2]:
                return sent, (f"{info.path}: frame {frame_idx} is {image.shape[1]}x{image.shape[0]}, "
                              f"larger than the header said; the rest of the video was skipped")
            slot = get_with_stop(free_q, stop_event)
            if slot is None:
                return sent, "stopped"
            write_slot(ring, slot, image)
            filled_q.put((info.idx, frame_idx, time_s, image.shape[0], image.shape[1], slot))
            sent += 1
    except (av.error.FFmpegError, OSError) as error:
        return sent, (f"{info.path}: decoding stopped after {sent} processed frames ({error}); "
                      f"the file may be truncated or damaged")
    return sent, None



# ──────────────────────────────────────────────────────────────────────────────────────────────
# 3 Ring buffer
# ──────────────────────────────────────────────────────────────────────────────────────────────
def ring_layout_for(videos: list, slot_count: int, run_tag: str) -> RingLayout:
    """Return a layout whose slots fit the largest frame of any video."""
    return RingLayout(name=f"{_SHM_PREFIX}{run_tag}r", slot_count=slot_count,
                      height=max(v.height for v in videos), width=max(v.width for v in videos))


def create_ring(layout: RingLayout) -> shared_memory.SharedMemory:
    """Create the ring's shared memory (parent only; the parent also unlinks it)."""
    return shared_memory.SharedMemory(name=layout.name, create=True,
                                      size=layout.slot_bytes * layout.slot_count)


def ring_view(shm: shared_memory.SharedMemory, layout: RingLayout) -> np.ndarray:
    """Return a [slots, height, width, channels] uint8 view of the ring (delete it before close)."""
    return np.ndarray((layout.slot_count, layout.height, layout.width, layout.channels),
                      dtype=np.uint8, buffer=shm.buf)


def new_slot_queue(ctx, slot_count: int):
    """Return the free-slot queue, filled with every slot index (bounded: one entry per slot)."""
    free_q = ctx.Queue(maxsize=slot_count)
    for slot in range(slot_count):
        free_q.put(slot)
    return free_q


def get_with_stop(q, stop_event):
    """Return the next item of q, or None once stop_event is set; never blocks for good."""
    while not stop_event.is_set():
        try:
            return q.get(timeout=_QUEUE_TIMEOUT_S)
        except queue.Empty:
            continue
    return None


def write_slot(ring: np.ndarray, slot: int, image: np.ndarray) -> None:
    """Copy a frame into the top-left of a slot."""
    height, width = image.shape[:2]
    ring[slot, :height, :width] = image


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 4 Inference workers
# ──────────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class FaceModels:
    """Loaded detector and recognizer sessions plus what their outputs mean."""

    det_session: object
    det_input_name: str
    det_output_names: list
    det_strides: tuple
    det_anchors: int
    det_fixed_size: tuple | None  # (width, height) when the model fixes its input size
    rec_session: object
    rec_input_name: str
    rec_mean: float
    rec_std: float
    providers: dict  # model file name -> providers ONNX Runtime reports as active
    rec_max_chunk: int  # 1 for dynamically quantized recognizers (see uses_dynamic_quantization)
    det_path: str = ""
    rec_path: str = ""


def find_model_pack(model_root: str, pack: str) -> Path:
    """Return the pack folder: <root>/models/<pack>, or <root>/<pack>; download it when missing."""
    root = Path(model_root).expanduser()
    for candidate in (root / "models" / pack, root / pack):
        if candidate.is_dir() and any(candidate.glob("*.onnx")):
            return candidate
    try:
        from insightface.utils import ensure_available
        return Path(ensure_available("models", pack, root=str(root)))
    except Exception as error:  # any download failure becomes one clear message
        raise BadInput(
            f"model pack {pack!r} not found in {root / 'models' / pack} and could not be downloaded "
            f"({type(error).__name__}: {error}). Put the pack's .onnx files there (a SCRFD "
            f"detector such as det_10g.onnx and an ArcFace recognizer such as w600k_r50.onnx), or "
            f"set --model-root / --model-pack") from None


def classify_pack_models(pack_dir: Path) -> tuple:
    """Return (detector path, recognizer path) by the ONNX graphs' inputs and outputs."""
    import onnx
    detector = recognizer = None
    for path in sorted(pack_dir.glob("*.onnx")):
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception as error:
            raise BadInput(f"{path}: not a valid ONNX model ({error}); download the pack again")
        dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        if len(graph.output) >= 5 and detector is None:
            detector = path
        elif len(dims) == 4 and dims[2] == dims[3] and dims[2] not in (96, 192) \
                and dims[2] >= 112 and dims[2] % 16 == 0 and recognizer is None:
            recognizer = path  # insightface's rule; 192 px are landmark and 96 px attribute models
    if detector is None or recognizer is None:
        raise BadInput(f"{pack_dir}: needs a SCRFD detector and an ArcFace recognizer .onnx; "
                       f"found {[p.name for p in pack_dir.glob('*.onnx')]}")
    return detector, recognizer


def uses_dynamic_quantization(model_path: Path) -> bool:
    """Return True if the graph quantizes activations per call (DynamicQuantizeLinear).

    Such a model computes one scale over its whole input, so a face embedded together with
    others comes out different (measured: cosine down to 0.95 on buffalo_sc_int8): results
    would depend on how frames happened to be batched. Those models get one face per call.
    """
    import onnx
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return any(node.op_type == "DynamicQuantizeLinear" for node in graph.node)


def provider_candidates(choice: str, available: list, trt_cache: Path) -> list:
    """Return the providers (with options) to ask ONNX Runtime for, best first."""
    wanted = [p for p in _PROVIDER_ORDER[choice] if p in available]
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    options = {
        "TensorrtExecutionProvider": {
            "trt_fp16_enable": True, "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(trt_cache), "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(trt_cache)},
        "CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"},
    }
    return [(p, options.get(p, {})) for p in wanted]


def session_options(threads: int):
    """Return ONNX Runtime session options that do not spin idle threads."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Two sessions alternating on few cores slow each other 1.6-2.2x when idle threads spin.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load_model(path: Path, providers: list, threads: int):
    """Return an insightface model object (SCRFD or ArcFaceONNX) on the given providers."""
    from insightface.model_zoo import model_zoo
    names = [p for p, _ in providers]
    opts = [o for _, o in providers]
    model = model_zoo.get_model(str(path), providers=names, provider_options=opts,
                                sess_options=session_options(threads))
    if model is None:
        raise BadInput(f"{path}: insightface does not recognise this model")
    return model


def load_face_models(settings: Settings, provider_choice: str, threads: int) -> FaceModels:
    """Return the pack's detector and recognizer loaded on the best providers that really load."""
    import onnxruntime as ort
    ort.set_default_logger_severity(3)
    det_path, rec_path = classify_pack_models(find_model_pack(settings.MODEL_ROOT,
                                                              settings.MODEL_PACK_NAME))
    trt_cache = Path(settings.TRT_CACHE_DIR)
    providers = provider_candidates(provider_choice, ort.get_available_providers(), trt_cache)
    if providers[0][0] == "TensorrtExecutionProvider":
        trt_cache.mkdir(parents=True, exist_ok=True)
        if not any(trt_cache.glob("*.engine")):
            print("[*] WARMUP: Generating TensorRT engine... (first run only; minutes)", flush=True)
    detector = load_model(det_path, providers, threads)
    recognizer = load_model(rec_path, providers, threads)
    outputs = detector.session.get_outputs()
    if len(outputs) not in _SCRFD_LAYOUTS:
        raise BadInput(f"{det_path}: unknown detector layout, {len(outputs)} outputs with shapes "
                       f"{[o.shape for o in outputs]}; expected SCRFD with 6, 9, 10 or 15")
    strides, anchors, has_kps = _SCRFD_LAYOUTS[len(outputs)]
    if not has_kps:
        raise BadInput(f"{det_path}: this SCRFD model has no keypoints; faces cannot be aligned")
    shape = detector.session.get_inputs()[0].shape
    fixed = (shape[3], shape[2]) if all(isinstance(v, int) for v in shape[2:4]) else None
    return FaceModels(
        det_session=detector.session, det_input_name=detector.input_name,
        det_output_names=[o.name for o in outputs], det_strides=strides, det_anchors=anchors,
        det_fixed_size=fixed, rec_session=recognizer.session, rec_input_name=recognizer.input_name,
        rec_mean=recognizer.input_mean, rec_std=recognizer.input_std,
        providers={det_path.name: detector.session.get_providers(),
                   rec_path.name: recognizer.session.get_providers()},
        rec_max_chunk=1 if uses_dynamic_quantization(rec_path) else 1 << 30,
        det_path=str(det_path), rec_path=str(rec_path))


def detector_input_size(models: FaceModels, settings: Settings) -> tuple:
    """Return the (width, height) fed to the detector: DET_SIZE x PRE_UPSCALE_FACTOR, or fixed."""
    if models.det_fixed_size:
        return models.det_fixed_size
    return tuple(int(round(side * settings.PRE_UPSCALE_FACTOR / 32)) * 32
                 for side in settings.DET_SIZE)


def letterbox(image: np.ndarray, input_size: tuple) -> tuple:
    """Return (detector blob [1,3,H,W] float32, scale) with the image resized into the top-left."""
    import cv2
    input_w, input_h = input_size
    height, width = image.shape[:2]
    if height / width > input_h / input_w:
        new_h, new_w = input_h, int(input_h / (height / width))
    else:
        new_w, new_h = input_w, int(input_w * (height / width))
    canvas = np.zeros((input_h, input_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    blob = cv2.dnn.blobFromImage(canvas, 1.0 / _DET_STD, (input_w, input_h),
                                 (_DET_MEAN, _DET_MEAN, _DET_MEAN), swapRB=True)
    return blob, new_h / height


@lru_cache(maxsize=64)
def anchor_centers(height: int, width: int, stride: int, anchors: int) -> np.ndarray:
    """Return [height*width*anchors, 2] anchor centres (x, y) in detector-input pixels."""
    grid = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32) * stride
    return np.repeat(grid.reshape(-1, 2), anchors, axis=0)


def decode_scrfd(outputs: list, strides: tuple, anchors: int, input_size: tuple,
                 scale: float, threshold: float) -> tuple:
    """Return (boxes [N,5] x1,y1,x2,y2,score, kps [N,5,2]) in frame pixels for one image.

    Outputs come in three groups - scores, box distances, keypoint distances - each with one
    entry per stride, in stride units; a leading batch axis of 1 is accepted.
    """
    level_count = len(strides)
    all_scores, all_boxes, all_kps = [], [], []
    for level, stride in enumerate(strides):
        scores = outputs[level].reshape(-1)
        keep = np.nonzero(scores >= threshold)[0]
        centers = anchor_centers(input_size[1] // stride, input_size[0] // stride, stride,
                                 anchors)[keep]
        distances = outputs[level + level_count].reshape(-1, 4)[keep] * stride
        kps = outputs[level + 2 * level_count].reshape(-1, 10)[keep] * stride
        all_scores.append(scores[keep])
        all_boxes.append(np.hstack([centers - distances[:, :2], centers + distances[:, 2:]]))
        all_kps.append(kps.reshape(-1, 5, 2) + centers[:, None, :])
    scores = np.concatenate(all_scores)
    order = np.argsort(-scores, kind="stable")
    boxes = np.hstack([np.concatenate(all_boxes) / scale, scores[:, None]])[order]
    kps = (np.concatenate(all_kps) / scale)[order]
    keep = nms(boxes.astype(np.float32), _NMS_IOU)
    return boxes[keep].astype(np.float32), kps[keep].astype(np.float32)


def nms(boxes: np.ndarray, iou_threshold: float) -> list:
    """Return indices kept by greedy non-maximum suppression (SCRFD's '+1 pixel' areas)."""
    x1, y1, x2, y2, scores = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        overlap_w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        overlap_h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = overlap_w * overlap_h
        order = rest[inter / (areas[best] + areas[rest] - inter) <= iou_threshold]
    return keep


def detect_faces(models: FaceModels, images: list, settings: Settings) -> list:
    """Return [(boxes [N,5], kps [N,5,2])] per image, in that image's pixels."""
    input_size = detector_input_size(models, settings)
    results = []
    for image in images:
        blob, scale = letterbox(image, input_size)
        outputs = models.det_session.run(models.det_output_names, {models.det_input_name: blob})
        results.append(decode_scrfd(outputs, models.det_strides, models.det_anchors, input_size,
                                    scale, settings.det_prob_threshold))
    return results


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Return the 2x3 least-squares similarity (Umeyama 1991) mapping src points onto dst."""
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.ones(2)
    if np.linalg.det(covariance) < 0:
        signs[1] = -1
    rotation = u @ np.diag(signs) @ vt
    scale = (singular * signs).sum() / src_c.var(axis=0).sum()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def align_face(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """Return the size x size ArcFace crop for one face's 5 keypoints."""
    import cv2
    matrix = similarity_transform(kps.astype(np.float64), _ARCFACE_TEMPLATE_PX * size / 112)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def embed_faces(models: FaceModels, crops: list, chunk_size: int) -> np.ndarray:
    """Return L2-normalised embeddings [len(crops), dim] computed chunk_size crops at a time."""
    import cv2
    chunks = []
    chunk_size = min(chunk_size, models.rec_max_chunk)
    for start in range(0, len(crops), chunk_size):
        blob = cv2.dnn.blobFromImages(crops[start:start + chunk_size], 1.0 / models.rec_std,
                                      (112, 112), (models.rec_mean,) * 3, swapRB=True)
        chunks.append(models.rec_session.run(None, {models.rec_input_name: blob})[0])
    embeddings = np.concatenate(chunks).astype(np.float32)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def worker_main(name, settings, layout, videos, references, filled_q, free_q, result_q,
                stop_event, threads_per_session):
    """Load the models, then run GPU_WORKER_THREADS threads over the filled ring slots."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shm = shared_memory.SharedMemory(name=layout.name)
    ring = ring_view(shm, layout)
    try:
        models = load_face_models(settings, settings.PROVIDERS, threads_per_session)
        result_q.put(("ready", name, models.providers, models.rec_max_chunk == 1))
        context = WorkerContext(settings, ring, videos, *reference_matrix(references),
                                [r.name for r in references], models)
        run_worker_threads(context, filled_q, free_q, result_q, stop_event)
        result_q.put(("done", name))
    except BaseException:
        result_q.put(("error", name, traceback.format_exc()))
        raise
    finally:
        del ring
        shm.close()


@dataclass
class WorkerContext:
    """What a worker thread needs to turn ring slots into results."""

    settings: Settings
    ring: np.ndarray
    videos: list
    ref_embeddings: np.ndarray
    ref_owners: np.ndarray
    people: list
    models: FaceModels


def run_worker_threads(context, filled_q, free_q, result_q, stop_event) -> None:
    """Run the worker threads to the end; re-raise the first error any of them hit."""
    errors = []

    def thread_body():
        try:
            while (batch := take_batch(filled_q, stop_event, context.settings.BATCH_SIZE)):
                result_q.put(("frames", process_batch(context, batch, free_q)))
                if batch[-1] is None:
                    return
        except BaseException as error:  # passed to the worker's main thread below
            errors.append(error)
            stop_event.set()

    threads = [threading.Thread(target=thread_body, name=f"infer-{i}", daemon=True)
               for i in range(context.settings.GPU_WORKER_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def take_batch(filled_q, stop_event, batch_size: int) -> list:
    """Return up to batch_size filled-slot messages; a trailing None means 'no more frames'."""
    first = get_with_stop(filled_q, stop_event)
    if first is None:
        return []
    batch = [first]
    while len(batch) < batch_size:
        try:
            item = filled_q.get_nowait()
        except queue.Empty:
            break
        batch.append(item)
        if item is None:
            break
    return batch


def process_batch(context: WorkerContext, batch: list, free_q) -> list:
    """Return one (video_idx, frame_idx, time_s, faces) per frame; frees each slot when done."""
    frames = [item for item in batch if item is not None]
    if not frames:
        return []
    settings, models = context.settings, context.models
    images = [context.ring[slot, :h, :w] for (_, _, _, h, w, slot) in frames]
    try:
        detections = detect_faces(models, images, settings)
        if settings.debug_det:
            for frame, image, found in zip(frames, images, detections):
                save_debug_detections(context, frame, image, found)
        crops = [align_face(images[i], kps) for i, (_, all_kps) in enumerate(detections)
                 for kps in all_kps]
        embeddings = embed_faces(models, crops, settings.REC_CHUNK_SIZE) if crops else None
        distances = (person_distances(embeddings, context.ref_embeddings, context.ref_owners,
                                      len(context.people)) if crops else None)
        results, face_idx = [], 0
        for frame, image, (boxes, kps) in zip(frames, images, detections):
            faces = describe_faces(context, boxes, distances, face_idx)
            face_idx += len(boxes)
            if any(f["name"] for f in faces):
                save_snapshot(context, frame, image, faces)
            results.append((frame[0], frame[1], frame[2], faces))
        return results
    finally:
        del images
        for frame in frames:
            free_q.put(frame[5])


def describe_faces(context: WorkerContext, boxes, distances, first: int) -> list:
    """Return a dict per face of one frame: box, score, closest person, distance, and the match."""
    faces = []
    for i, box in enumerate(boxes):
        row = distances[first + i]
        best, name, distance = match_face(row, context.settings.CUSTOM_THRESHOLD)
        face = {"bbox": [round(float(v), 1) for v in box[:4]], "det_score": round(float(box[4]), 4),
                "closest": context.people[best], "distance": round(float(distance), 4),
                "name": context.people[best] if name else None}
        if context.settings.debug_rec:
            face["all_distances"] = {p: round(float(d), 4) for p, d in zip(context.people, row)}
        faces.append(face)
    return faces


def padded_box(box: list, padding_pct: float, width: int, height: int) -> tuple:
    """Return the box (ints) grown by padding_pct of its size on each side, clamped to the frame."""
    x1, y1, x2, y2 = box
    pad_x, pad_y = (x2 - x1) * padding_pct / 100, (y2 - y1) * padding_pct / 100
    return (max(0, int(x1 - pad_x)), max(0, int(y1 - pad_y)),
            min(width - 1, int(x2 + pad_x)), min(height - 1, int(y2 + pad_y)))


def person_color(name: str, people: list) -> tuple:
    """Return the BGR colour of a person (stable for the run)."""
    return _PALETTE_BGR[people.index(name) % len(_PALETTE_BGR)]


def snapshot_path(output_dir: Path, info: VideoInfo, frame_idx: int, time_s: float) -> Path:
    """Return where the snapshot of one frame goes."""
    return output_dir / info.output_name / f"frame_{frame_idx:07d}_{time_s:09.3f}s.jpg"


def save_snapshot(context: WorkerContext, frame: tuple, image: np.ndarray, faces: list) -> None:
    """Write the frame with each matched face boxed and labelled with its distance."""
    import cv2
    canvas = np.ascontiguousarray(image)
    height, width = canvas.shape[:2]
    for face in faces:
        if not face["name"]:
            continue
        color = person_color(face["name"], context.people)
        x1, y1, x2, y2 = padded_box(face["bbox"], context.settings.BOX_PADDING_PERCENTAGE, width, height)
        thickness = max(2, round(min(width, height) / 360))
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness)
        label = f"{face['name']} d={face['distance']:.3f}"
        cv2.putText(canvas, label, (x1, max(14, y1 - 6)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.5 * thickness / 2 + 0.1, color, thickness, cv2.LINE_AA)
    info = context.videos[frame[0]]
    path = snapshot_path(Path(context.settings.OUTPUT_DIR), info, frame[1], frame[2])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, canvas)


def write_image(path: Path, image: np.ndarray) -> None:
    """Write a JPEG atomically (a .part file renamed), so no half-written image is left."""
    import cv2
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise OSError(f"could not encode {path}")
    part = path.with_name(path.name + ".part")
    part.write_bytes(data.tobytes())
    os.replace(part, path)


def save_debug_detections(context: WorkerContext, frame: tuple, image: np.ndarray, found) -> None:
    """Write the frame with every raw detection (box, score, keypoints) before recognition."""
    import cv2
    canvas = np.ascontiguousarray(image)
    for box, kps in zip(*found):
        x1, y1, x2, y2 = (int(v) for v in box[:4])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 0, 255), 1)
        cv2.putText(canvas, f"{box[4]:.2f}", (x1, max(10, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, (0, 0, 255), 1, cv2.LINE_AA)
        for x, y in kps:
            cv2.circle(canvas, (int(x), int(y)), 1, (0, 255, 0), 2)
    info = context.videos[frame[0]]
    path = Path(context.settings.debug_det_dir) / info.output_name / f"frame_{frame[1]:07d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, canvas)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 5 Matching
# ──────────────────────────────────────────────────────────────────────────────────────────────
def person_distances(embeddings: np.ndarray, ref_embeddings: np.ndarray, ref_owners: np.ndarray,
                     person_count: int) -> np.ndarray:
    """Return cosine distances [faces, people]: 1 - similarity to each person's closest photo."""
    similarity = embeddings.astype(np.float64) @ ref_embeddings.astype(np.float64).T
    best = np.full((len(embeddings), person_count), -1.0)
    for person in range(person_count):
        best[:, person] = similarity[:, ref_owners == person].max(axis=1)
    return 1.0 - best


def match_face(distances: np.ndarray, threshold: float) -> tuple:
    """Return (closest person index, matched?, distance): matched when distance <= threshold."""
    best = int(np.argmin(distances))
    distance = float(distances[best])
    return best, distance <= threshold, distance


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 6 Ranges and clips
# ──────────────────────────────────────────────────────────────────────────────────────────────
def merge_sightings(times_s: list, gap_s: float) -> list:
    """Return [(first_s, last_s)]: sightings closer than gap_s (strictly) join one range."""
    ranges = []
    for time_s in sorted(times_s):
        if ranges and time_s - ranges[-1][1] < gap_s:
            ranges[-1][1] = time_s
        else:
            ranges.append([time_s, time_s])
    return [tuple(r) for r in ranges]


def widen_range(first_s: float, last_s: float, frame_s: float, before_s: float, after_s: float,
                duration_s: float) -> tuple:
    """Return [start_s, end_s): the sightings' span plus one frame, widened, clamped to the video."""
    start_s = max(0.0, first_s - before_s)
    end_s = last_s + frame_s + after_s
    if duration_s > 0:  # a header duration shorter than the frames seen is not trusted
        end_s = min(max(duration_s, last_s + frame_s), end_s)
    return start_s, end_s


def person_ranges(name: str, sightings: list, info: VideoInfo, settings: Settings) -> list:
    """Return the TimeRanges of one person from their (time_s, distance) sightings."""
    frame_s = 1.0 / info.fps if info.fps > 0 else 0.0
    merged = []
    for first_s, last_s in merge_sightings([t for t, _ in sightings], settings.MERGE_GAP_TOLERANCE):
        start_s, end_s = widen_range(first_s, last_s, frame_s, settings.CLIP_DURATION_BEFORE,
                                     settings.CLIP_DURATION_AFTER, info.duration_s)
        if merged and start_s <= merged[-1][1]:  # widened ranges that overlap become one clip
            merged[-1] = [merged[-1][0], max(end_s, merged[-1][1]), merged[-1][2], last_s]
        else:
            merged.append([start_s, end_s, first_s, last_s])
    ranges = []
    for start_s, end_s, first_s, last_s in merged:
        inside = [d for t, d in sightings if first_s <= t <= last_s]
        ranges.append(TimeRange(name, start_s, end_s, min(inside), first_s, last_s))
    return ranges


def clip_file_name(time_range: TimeRange) -> str:
    """Return '[StartSec]s_[Name]_d[Distance].mp4'."""
    safe_name = re.sub(r'[<>:"/\\|?*\x00-\x1f]', "_", time_range.name)
    return f"{time_range.start_s:.2f}s_{safe_name}_d{time_range.best_distance:.3f}.mp4"


def container_seek_s(time_s: float, info: VideoInfo) -> float:
    """Return ffmpeg's input -ss for a frame time: frame clock -> container clock."""
    return max(0.0, time_s + info.video_start_offset_s)


def build_clip_command(ffmpeg: str, info: VideoInfo, time_range: TimeRange, part_path: Path) -> list:
    """Return the ffmpeg argument list that cuts one range, re-encoded for a frame-accurate start."""
    return [ffmpeg, "-nostdin", "-y", "-v", "error",
            "-ss", f"{container_seek_s(time_range.start_s, info):.3f}", "-i", info.path,
            "-t", f"{time_range.end_s - time_range.start_s:.3f}",
            "-map", "0:v:0", "-map", "0:a:0?",
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", "160k", "-movflags", "+faststart", "-f", "mp4", str(part_path)]


def run_checked(cmd: list, what: str, timeout_s: float = 600) -> None:
    """Run a command; raise ClipError with the exit code and stderr's last lines on failure."""
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ClipError(f"{what}: ffmpeg took longer than {timeout_s:.0f} s") from None
    except OSError as error:
        raise ClipError(f"{what}: cannot run {cmd[0]} ({error})") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.decode(errors="replace").strip().splitlines()[-5:])
        raise ClipError(f"{what}: ffmpeg exit code {done.returncode}\n{tail}")


def cut_clip(ffmpeg: str, info: VideoInfo, time_range: TimeRange, clip_dir: Path) -> Path:
    """Write one clip via a .part file renamed into place; return its path."""
    clip_dir.mkdir(parents=True, exist_ok=True)
    final = clip_dir / clip_file_name(time_range)
    part = final.with_name(final.name + ".part")
    what = f"{Path(info.path).name} {time_range.start_s:.2f}-{time_range.end_s:.2f}s"
    try:
        run_checked(build_clip_command(ffmpeg, info, time_range, part), what)
        os.replace(part, final)
    finally:
        part.unlink(missing_ok=True)
    return final


def find_ffmpeg(ffmpeg_dir: str) -> str | None:
    """Return the ffmpeg to use: FFMPEG_DIR/ffmpeg(.exe), then PATH, then imageio-ffmpeg's."""
    for name in ("ffmpeg.exe", "ffmpeg"):
        candidate = Path(ffmpeg_dir) / name
        if candidate.is_file():
            return str(candidate.resolve())
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return None


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 7 Reports
# ──────────────────────────────────────────────────────────────────────────────────────────────
def format_hms(time_s: float) -> str:
    """Return HH:MM:SS.mmm for a time in seconds."""
    millis = int(round(time_s * 1000))
    return f"{millis // 3_600_000:02d}:{millis // 60_000 % 60:02d}:{millis // 1000 % 60:02d}.{millis % 1000:03d}"


def video_report(result: VideoResult, output_dir: Path, frame_interval: int) -> dict:
    """Return the results.json entry of one video."""
    info = result.info
    status = "ok" if result.finished and not result.errors else (
        "incomplete" if result.processed_frame_count else "failed")
    return {
        "file": info.path, "output_folder": info.output_name, "status": status,
        "errors": result.errors, "fps": round(info.fps, 6), "frame_count": info.frame_count,
        "duration_s": round(info.duration_s, 6), "width": info.width, "height": info.height,
        "video_start_offset_s": round(info.video_start_offset_s, 6),
        "frame_interval": frame_interval, "processed_frame_count": result.processed_frame_count,
        "detections": sorted(result.detections, key=lambda d: (d["frame"], d["name"])),
        "ranges": [range_report(r, result.clips[i] if i < len(result.clips) else None, output_dir)
                   for i, r in enumerate(result.ranges)],
    }


def range_report(time_range: TimeRange, clip: str | None, output_dir: Path) -> dict:
    """Return the results.json entry of one range."""
    return {
        "name": time_range.name, "start": round(time_range.start_s, 3),
        "end": round(time_range.end_s, 3), "start_hms": format_hms(time_range.start_s),
        "end_hms": format_hms(time_range.end_s),
        "first_sighting": round(time_range.first_sighting_s, 3),
        "last_sighting": round(time_range.last_sighting_s, 3),
        "best_distance": round(time_range.best_distance, 4),
        "best_similarity": round(1 - time_range.best_distance, 4),
        "clip": Path(os.path.relpath(clip, output_dir)).as_posix() if clip else None,
    }


def write_json_atomic(path: Path, data) -> None:
    """Write JSON through a temporary file and os.replace, so no half-written file is left."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(part, path)


def write_reports(run: dict, results: list, output_dir: Path, settings: Settings) -> None:
    """Write results.json and results.csv (one row per range) for everything found so far."""
    videos = [video_report(r, output_dir, settings.FRAME_INTERVAL) for r in results]
    write_json_atomic(output_dir / "results.json", {**run, "videos": videos})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["video", "name", "start_s", "end_s", "start_hms", "end_hms",
                     "best_distance", "best_similarity", "clip"])
    for entry in videos:
        for r in entry["ranges"]:
            writer.writerow([entry["file"], r["name"], r["start"], r["end"], r["start_hms"],
                             r["end_hms"], r["best_distance"], r["best_similarity"], r["clip"] or ""])
    part = output_dir / "results.csv.part"
    part.write_text(buffer.getvalue(), encoding="utf-8")
    os.replace(part, output_dir / "results.csv")


def summary_table(results: list) -> str:
    """Return the end-of-run table: one line per video and person found."""
    lines = [f"{'video':<36} {'frames':>7}  {'person':<24} {'ranges':>6} {'best d':>7}  status"]
    for result in results:
        name = Path(result.info.path).name[:36]
        report = video_report(result, Path("."), 1)
        people = sorted({r.name for r in result.ranges})
        if not people:
            lines.append(f"{name:<36} {result.processed_frame_count:>7}  {'(nobody)':<24} "
                         f"{0:>6} {'':>7}  {report['status']}")
        for person in people:
            mine = [r for r in result.ranges if r.name == person]
            lines.append(f"{name:<36} {result.processed_frame_count:>7}  {person:<24} "
                         f"{len(mine):>6} {min(r.best_distance for r in mine):>7.3f}  {report['status']}")
    return "\n".join(lines)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 8 Orchestration
# ──────────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class Pipeline:
    """The processes, queues and shared memory of one run; the parent owns all of it."""

    ctx: object
    layout: RingLayout
    shm: shared_memory.SharedMemory
    jobs_q: object
    free_q: object
    filled_q: object
    result_q: object
    stop_event: object
    processes: list = field(default_factory=list)
    finished_children: set = field(default_factory=set)


def start_pipeline(settings: Settings, videos: list, references: list) -> Pipeline:
    """Create the queues and ring, then start the decoder and worker processes."""
    ctx = mp.get_context("spawn")
    layout = ring_layout_for(videos, settings.MAX_BUFFER_SLOTS, str(os.getpid()))
    shm = create_ring(layout)
    try:
        pipe = Pipeline(ctx, layout, shm, ctx.Queue(), new_slot_queue(ctx, layout.slot_count),
                        ctx.Queue(maxsize=layout.slot_count + 64), ctx.Queue(), ctx.Event())
        for info in videos:
            pipe.jobs_q.put(info)
        for _ in range(settings.NUM_CPU_LOADERS):
            pipe.jobs_q.put(None)
        for i in range(settings.NUM_CPU_LOADERS):
            start_child(pipe, f"decoder-{i}", decoder_main, layout, pipe.jobs_q, pipe.free_q,
                        pipe.filled_q, pipe.result_q, pipe.stop_event, settings.FRAME_INTERVAL)
        threads = max(1, (os.cpu_count() or 2) // (settings.NUM_GPU_PROCESSES * settings.GPU_WORKER_THREADS))
        for i in range(settings.NUM_GPU_PROCESSES):
            start_child(pipe, f"worker-{i}", worker_main, settings, layout, videos, references,
                        pipe.filled_q, pipe.free_q, pipe.result_q, pipe.stop_event, threads)
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    return pipe


def start_child(pipe: Pipeline, name: str, target, *args) -> None:
    """Start one named child process of the pipeline."""
    process = pipe.ctx.Process(target=target, name=name, args=(name, *args))
    process.start()
    pipe.processes.append(process)


def check_children(pipe: Pipeline, drain) -> None:
    """Raise PipelineBroken if a child exited without saying 'done'.

    A child's last messages can still be in the queue when its exit code is visible, so the
    queue is drained (with drain(), for up to a second) before a silent exit counts as broken.
    """
    gone = [p for p in pipe.processes
            if p.exitcode is not None and p.name not in pipe.finished_children]
    deadline = time.monotonic() + 1.0
    while gone and time.monotonic() < deadline:
        drain()
        gone = [p for p in gone if p.name not in pipe.finished_children]
    if gone:
        raise PipelineBroken(gone[0].name, gone[0].exitcode,
                             "it exited without an error report (killed, or out of memory?)")


def shutdown_pipeline(pipe: Pipeline) -> None:
    """Stop and join every child, terminate stragglers, then close and unlink the ring."""
    pipe.stop_event.set()
    deadline = time.monotonic() + _JOIN_TIMEOUT_S
    for process in pipe.processes:
        process.join(timeout=max(0.1, deadline - time.monotonic()))
    for process in pipe.processes:
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
    for q in (pipe.jobs_q, pipe.free_q, pipe.filled_q, pipe.result_q):
        q.cancel_join_thread()
        q.close()
    pipe.shm.close()
    pipe.shm.unlink()


class RunState:
    """The parent's bookkeeping: results per video, progress, what to finalise next."""

    def __init__(self, videos: list, settings: Settings, ffmpeg: str | None, run: dict):
        self.settings, self.ffmpeg, self.run = settings, ffmpeg, run
        self.results = [VideoResult(info) for info in videos]
        self.output_dir = Path(settings.OUTPUT_DIR)
        self.decoders_done = 0
        self.failures = []
        self.debug_rec_file = None

    def record_frames(self, frames: list) -> int:
        """Store one batch of frame results; return how many frames it held."""
        for video_idx, frame_idx, time_s, faces in frames:
            result = self.results[video_idx]
            result.processed_frame_count += 1
            for face in faces:
                if self.debug_rec_file and "all_distances" in face:
                    self.log_debug_rec(result.info, frame_idx, time_s, face)
                if face["name"]:
                    result.detections.append({
                        "frame": frame_idx, "time": round(time_s, 6), "time_hms": format_hms(time_s),
                        "name": face["name"], "distance": face["distance"],
                        "similarity": round(1 - face["distance"], 4), "bbox": face["bbox"],
                        "det_score": face["det_score"]})
            self.maybe_finish(video_idx)
        return len(frames)

    def log_debug_rec(self, info: VideoInfo, frame_idx: int, time_s: float, face: dict) -> None:
        """Print and log one face's distances to every person (debug_rec)."""
        line = "\t".join([Path(info.path).name, str(frame_idx), f"{time_s:.3f}",
                          ",".join(f"{v:.0f}" for v in face["bbox"]), face["name"] or "-",
                          *(f"{p}={d:.4f}" for p, d in face["all_distances"].items())])
        self.debug_rec_file.write(line + "\n")
        print("[debug_rec]", line)

    def video_decoded(self, video_idx: int, sent: int, error: str | None) -> None:
        """Note that a video's decoder has sent all its frames."""
        result = self.results[video_idx]
        result.sent_frame_count = sent
        if error and error != "stopped":
            result.errors.append(error)
            self.failures.append(error)
        self.maybe_finish(video_idx)

    def maybe_finish(self, video_idx: int) -> None:
        """Finalise a video once every frame its decoder sent has come back."""
        result = self.results[video_idx]
        if result.finished or result.sent_frame_count is None:
            return
        if result.processed_frame_count < result.sent_frame_count:
            return
        result.finished = True
        self.finish_video(result)

    def finish_video(self, result: VideoResult) -> None:
        """Compute ranges, cut clips and rewrite the reports for one finished video."""
        by_person = {}
        for d in result.detections:
            by_person.setdefault(d["name"], []).append((d["time"], d["distance"]))
        for name in sorted(by_person):
            result.ranges.extend(person_ranges(name, by_person[name], result.info, self.settings))
        clip_dir = self.output_dir / result.info.output_name / "clips"
        for time_range in result.ranges:
            result.clips.append(self.cut_one(result, time_range, clip_dir))
        write_reports(self.run, self.results, self.output_dir, self.settings)

    def cut_one(self, result: VideoResult, time_range: TimeRange, clip_dir: Path) -> str | None:
        """Cut one clip; on failure record the error and return None."""
        if self.ffmpeg is None:
            return None
        try:
            return str(cut_clip(self.ffmpeg, result.info, time_range, clip_dir))
        except (ClipError, OSError) as error:
            result.errors.append(str(error))
            self.failures.append(str(error))
            return None


def handle_message(message: tuple, state: RunState, pipe: Pipeline, bars: dict) -> None:
    """Apply one message from a child to the run state."""
    kind = message[0]
    if kind == "frames":
        bars["frames"].update(state.record_frames(message[1]))
    elif kind == "video_done":
        state.video_decoded(*message[1:])
    elif kind == "ready":
        for model, providers in message[2].items():
            bars["frames"].write(f"[*] {message[1]}: {model} runs on {providers[0]}")
        if message[3]:
            bars["frames"].write(f"[*] {message[1]}: the recognizer is dynamically quantized (int8): "
                                 f"one face per call, so results do not depend on batching")
    elif kind == "done":
        pipe.finished_children.add(message[1])
        if message[1].startswith("decoder-"):
            state.decoders_done += 1
            if state.decoders_done == state.settings.NUM_CPU_LOADERS:
                for _ in range(state.settings.NUM_GPU_PROCESSES * state.settings.GPU_WORKER_THREADS):
                    pipe.filled_q.put(None)
    elif kind == "error":
        raise PipelineBroken(message[1], None, message[2])
    finished = sum(r.finished for r in state.results)
    if finished != bars["videos"].n:
        bars["videos"].update(finished - bars["videos"].n)


def run_pipeline(state: RunState, videos: list, references: list) -> None:
    """Run decoders and workers over every video until all children are done."""
    from tqdm import tqdm
    settings = state.settings
    total = sum(math.ceil(v.frame_count / settings.FRAME_INTERVAL) for v in videos)
    pipe = start_pipeline(settings, videos, references)
    bars = {"videos": tqdm(total=len(videos), desc="videos", unit="video", position=0),
            "frames": tqdm(total=total, desc="frames", unit="frame", position=1, smoothing=0.1)}
    try:
        def receive():
            try:
                handle_message(pipe.result_q.get(timeout=_QUEUE_TIMEOUT_S), state, pipe, bars)
            except queue.Empty:
                pass

        next_check = time.monotonic()
        while len(pipe.finished_children) < len(pipe.processes):
            receive()
            if time.monotonic() >= next_check:  # also while messages keep coming
                check_children(pipe, receive)
                next_check = time.monotonic() + _QUEUE_TIMEOUT_S
    finally:
        for bar in bars.values():
            bar.close()
        shutdown_pipeline(pipe)


def prepare_references(settings: Settings) -> tuple:
    """Return (references, problems) computed with the CPU provider in the parent."""
    models = load_face_models(settings, "cpu", max(1, (os.cpu_count() or 2)))
    references, problems, notes = load_references(Path(settings.REFERENCE_DIR), models, settings)
    report_problems("reference photos skipped", problems)
    report_problems("reference photos", notes)
    if not references:
        raise BadInput(f"no usable reference photo in {settings.REFERENCE_DIR}: add a photo per "
                       f"person named after them (e.g. Barack_Obama.jpg) showing the face clearly")
    return references, problems


def probe_all(paths: list, video_dir: Path) -> tuple:
    """Return ([VideoInfo] for the usable videos, [problems])."""
    videos, problems = [], []
    for path, output_name in zip(paths, unique_output_names(paths, video_dir.resolve())):
        try:
            videos.append(probe_video(path, len(videos), output_name))
        except BadInput as error:
            problems.append(str(error))
    return videos, problems


def run_header(settings: Settings, references: list, ffmpeg: str | None) -> dict:
    """Return the run-level fields of results.json."""
    return {"tool": "find-people-in-videos", "format_version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": False,
            "threshold_kind": "cosine distance = 1 - cosine similarity; match when <= CUSTOM_THRESHOLD",
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.values.items()},
            "people": [{"name": r.name, "photos": r.photos} for r in references],
            "ffmpeg": ffmpeg, "failures": []}


def report_problems(title: str, problems: list) -> None:
    """Print a titled list of problems (nothing when empty)."""
    if problems:
        print(f"[!] {title}:")
        for problem in problems:
            print(f"    - {problem}")


def main(argv=None) -> int:
    """Run the whole search; return the exit code.

    0: all went well; 1: something was skipped or failed (listed at the end); 2: bad settings,
    no videos, no usable reference or no models; 130: interrupted (results so far are saved).
    """
    try:
        settings = load_settings(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, value in changed_settings(settings).items():
        print(f"[*] {name} = {value!r}")
    output_dir = Path(settings.OUTPUT_DIR)
    try:
        video_paths = list_videos(Path(settings.VIDEO_DIR))
        if not video_paths:
            raise BadInput(f"no videos in {settings.VIDEO_DIR}: put .mp4/.mkv/.avi/... files there")
        references, ref_problems = prepare_references(settings)
        output_dir.mkdir(parents=True, exist_ok=True)
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"[*] people: {', '.join(f'{r.name} ({len(r.photos)} photo(s))' for r in references)}")
    ffmpeg = find_ffmpeg(settings.FFMPEG_DIR)
    print(f"[*] ffmpeg: {ffmpeg or 'NOT FOUND - clips will not be cut (pip install imageio-ffmpeg)'}")
    if ffmpeg is None:
        ref_problems.append(f"no ffmpeg in {settings.FFMPEG_DIR}/, on PATH or from imageio-ffmpeg: "
                            f"clips were not cut")
    videos, video_problems = probe_all(video_paths, Path(settings.VIDEO_DIR))
    report_problems("videos skipped", video_problems)
    run = run_header(settings, references, ffmpeg)
    state = RunState(videos, settings, ffmpeg, run)
    state.failures.extend(ref_problems + video_problems)
    exit_code = 0
    if settings.debug_rec:
        state.debug_rec_file = open(output_dir / "debug_rec.tsv", "w", encoding="utf-8")
    try:
        if videos:
            run_pipeline(state, videos, references)
        run["complete"] = all(r.finished for r in state.results)
    except PipelineBroken as error:
        print(f"\n[!] pipeline broken: {error}", file=sys.stderr)
        state.failures.append(f"pipeline broken: {error.name} (exit code {error.exitcode})")
        exit_code = 1
    except KeyboardInterrupt:
        print("\n[!] interrupted: results so far are saved, marked incomplete", file=sys.stderr)
        exit_code = 130
    finally:
        if state.debug_rec_file:
            state.debug_rec_file.close()
        run["failures"] = state.failures
        write_reports(run, state.results, output_dir, settings)
    print(summary_table(state.results))
    report_problems("problems", state.failures)
    print(f"[*] results: {output_dir / 'results.json'}")
    if exit_code == 0 and (state.failures or not run["complete"]):
        exit_code = 1
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
