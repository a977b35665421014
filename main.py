"""Find the people shown in reference photos inside a folder of videos.

Run (after `pip install -r requirements.txt`):
    python main.py                                   # in_video/ + samples_jpg/ -> found_fragments_colored_/
    python main.py --custom-threshold 0.6 --frame-interval 2 --providers cpu
    python main.py --help                            # every setting, with its default

Data flow (all processes come from one `spawn` context owned by the parent):

    parent ──jobs_q──> decoder-i  (NUM_CPU_LOADERS processes, PyAV or OpenCV; one video at a time)
                          │  free_q: slot indices ready to be written   (parent fills, workers return)
                          │  ring:   shared memory, MAX_BUFFER_SLOTS frames of the largest video
                          │          (fewer if /dev/shm or RAM is short: plan_ring says so)
                          v  filled_qs[video_idx % workers]: (video_idx, seq, frame_idx, time_s,
                          │      height, width, slot), then an end marker with slot None
                       worker-j   (NUM_GPU_PROCESSES processes x GPU_WORKER_THREADS threads)
                          │  threads: SCRFD detection of a batch, in parallel
                          │  FrameSequencer -> VideoTracker, in frame order per video: link faces
                          │  into tracks, recognise (align + ArcFace) a few times per track, name
                          │  tracks from agreeing evidence, write snapshots, return the slot
                          v
    parent <──result_q── ("video_start" | "progress" | "track" | "video_tracked" | "video_done" |
       │                  "ready" | "note" | "stats" | "error" | "done", ...); a reader thread moves
       │                  them into the parent's inbox, which the main loop reads (forward_results)
       └─> ranges per person -> clip thread (ffmpeg) -> results.json / results.csv / summary,
           and per finished video <video folder>/video.json, which a rerun reuses (RESUME)

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
import contextlib
import csv
import hashlib
import io
import itertools
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
MAX_BUFFER_SLOTS = 32  # frames in the shared-memory ring, 2..4096; memory = slots x largest frame; fewer if short
REC_CHUNK_SIZE = 32  # aligned faces per recognizer call, 1..1024
# Detection
MODEL_PACK_NAME = "buffalo_l"  # InsightFace pack folder name, e.g. buffalo_l, buffalo_s, buffalo_sc
DET_SIZE = (640, 640)  # px (width, height) of the detector input, multiples of 32, 32..4096
PRE_UPSCALE_FACTOR = 1.0  # 1.0..4.0; detector input = DET_SIZE x this, for small faces in big frames
det_prob_threshold = 0.25  # 0..1; minimum SCRFD face score kept before recognition
BOX_PADDING_PERCENTAGE = 10  # %, 0..100; box padding on each side in snapshots
# Matching
CUSTOM_THRESHOLD = 0.60  # cosine DISTANCE (1 - cosine similarity), 0..2; match when <= this; lower is stricter
MATCH_MARGIN = 0.05  # cosine distance, 0..2; the best person must beat the second best by this much
MIN_TRACK_HITS = 2  # 1..100; recognitions of a face track that must agree before it is named
MIN_FACE_SIZE = 32  # px, 0..1000; smaller faces are tracked but not recognised (ArcFace needs detail)
RECOGNITION_INTERVAL = 5  # processed frames, 1..1000; re-recognise a track after this, doubling up to 8x
TRACK_MAX_GAP = 1.0  # s, 0..60; a face track ends after this long unseen (and at every shot cut)
# Clips
FRAME_INTERVAL = 1  # process every N-th decoded frame, 1..1000
CLIP_DURATION_BEFORE = 2.0  # s, 0..600; clip starts this long before the first sighting
CLIP_DURATION_AFTER = 2.0  # s, 0..600; clip ends this long after the last sighting
MERGE_GAP_TOLERANCE = 2.0  # s, 0..3600; sightings of one person closer than this form one range
CLIP_MODE = "accurate"  # accurate: re-encoded, frame-exact start | fast: stream copy from the keyframe before
# Folders
VIDEO_DIR = "in_video"  # folder of videos to search (searched recursively)
REFERENCE_DIR = "samples_jpg"  # reference photos: Name.jpg, Name_2.jpg, or a subfolder Name/
OUTPUT_DIR = "found_fragments_colored_"  # snapshots, clips, results.json, results.csv
RESUME = True  # reuse the videos an earlier run finished in OUTPUT_DIR when nothing they depend on changed
MODEL_ROOT = "~/.insightface"  # holds models/<MODEL_PACK_NAME>/ (a folder holding <pack>/ also works)
TRT_CACHE_DIR = "insightface_trt_cache"  # TensorRT engines and timing cache
FFMPEG_DIR = "ffmpeg"  # optional local ffmpeg binary (ffmpeg or ffmpeg.exe); then PATH; then imageio-ffmpeg
# Advanced
PROVIDERS = "auto"  # auto | tensorrt | cuda | cpu; auto takes the best that really loads
GPU_DEVICE_IDS = ()  # GPUs for the workers, each 0..63, e.g. (0, 1); () = all visible; worker i takes the (i mod n)-th
FRAMES_ON_DEVICE = "auto"  # auto | on | off; batched detector, resize and face alignment on the models' device (auto: with CUDA/TensorRT)
TRT_FP16 = True  # TensorRT in half precision (faster; distances differ slightly from fp32)
debug_det = False  # save every frame's raw detections (before recognition) as images
debug_det_dir = "debug_det"  # where debug_det writes
debug_rec = False  # log each recognition's distance to every person (also to OUTPUT_DIR/debug_rec.tsv)
# ──────────────────────────────────────────────────────────────────────────────────────────────
SETTING_NAMES = (
    "NUM_GPU_PROCESSES", "GPU_WORKER_THREADS", "NUM_CPU_LOADERS", "BATCH_SIZE", "MAX_BUFFER_SLOTS",
    "REC_CHUNK_SIZE", "MODEL_PACK_NAME", "DET_SIZE", "PRE_UPSCALE_FACTOR", "det_prob_threshold",
    "BOX_PADDING_PERCENTAGE", "CUSTOM_THRESHOLD", "MATCH_MARGIN", "MIN_TRACK_HITS", "MIN_FACE_SIZE",
    "RECOGNITION_INTERVAL", "TRACK_MAX_GAP", "FRAME_INTERVAL", "CLIP_DURATION_BEFORE",
    "CLIP_DURATION_AFTER", "MERGE_GAP_TOLERANCE", "CLIP_MODE", "VIDEO_DIR", "REFERENCE_DIR", "OUTPUT_DIR",
    "RESUME", "MODEL_ROOT", "TRT_CACHE_DIR", "FFMPEG_DIR", "PROVIDERS", "GPU_DEVICE_IDS",
    "FRAMES_ON_DEVICE", "TRT_FP16", "debug_det", "debug_det_dir", "debug_rec",
)

# Internal constants ---------------------------------------------------------------------------
_VIDEO_EXTENSIONS = {".mp4", ".mkv", ".avi", ".mov", ".m4v", ".webm", ".wmv", ".flv", ".mpg",
                     ".mpeg", ".ts", ".mts", ".m2ts", ".3gp"}
_IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}  # what OpenCV reads
_IGNORED_FILES = {".ds_store", "thumbs.db", "desktop.ini", ".gitkeep"}  # system files, not photos
_REF_SMALL_FACE_PX = 56  # a reference face smaller than this (shorter side, half ArcFace's 112 px crop) gets a warning
_SAME_FACE_REF_SIMILARITY = 0.9  # cosine: photos of two labels this alike show the same face
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
_TRT_UNSUPPORTED_OPS = {"ConvInteger", "DynamicQuantizeLinear", "MatMulInteger"}  # int8 graphs
_BATCHED_EDIT_VERSION = 1  # of make_detector_batchable: a change gets new batch-capable copies
_DEVICE_CANDIDATES = 1000  # anchors per frame brought back from the device (the best scores); when
# all of them pass det_prob_threshold there may be more, and that frame's whole outputs come back
_PROVIDER_ORDER = {  # --providers value -> ONNX Runtime providers to try, best first
    "auto": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
}
# Face tracks (section 5): why each value, in the comment.
_LINK_MIN_IOU = 0.3  # a detection continues a track when their boxes overlap at least this much
_TOUCH_IOU = 0.05  # boxes overlapping more than this touch (see link_detections)
_SPLIT_MAX_SIMILARITY = 0.3  # cosine: a track's new embedding below this is someone else: split
_RELINK_MIN_SIMILARITY = 0.5  # cosine: a new face this close to a recently unseen track continues it
_SAME_FACE_SIMILARITY = 0.5  # cosine: an unsure look this close to a sure one is the same face
_FACE_CHANGE_LIMIT = 0.55  # mean change of a face's normalised 16x16 grey patch from one frame to
# the next that makes it due for recognition: on the shared clips the same face changed by at most
# 0.52 in 99 % of frames, while a different face differed by at least 0.55 in 99 % of pairs  # cosine: a new face this close to a recently unseen track continues it
_SHOT_CUT_MAD = 20.0  # grey levels: mean change of a 64x36 thumbnail; the shared clips' cuts: 27-31
_GROWTH_FOR_RECHECK = 1.3  # re-recognise when a face is this much larger than at its best look
_FRONTAL_GAIN_FOR_RECHECK = 0.25  # ... or this much more frontal (0 = profile, 1 = frontal)
_MAX_PENDING_SNAPSHOTS = 8  # snapshots kept in memory per track until it is named
_MAX_UNVERIFIED_S = 1.0  # s: a named track is re-recognised at least this often
_SURE_FACE_SCORE = 0.5  # SCRFD score from which a new track is recognised at once (insightface's default)
_DECODER_CHECK_FRAMES = 8  # first kept frames checked for a decoder that returns blank/stale pictures
_DECODER_CHECK_BYTES = 128 * 2**20  # ... but no more than fit in this (at least 2 frames: 8K is 100 MB)
_BLANK_STD_GREY = 2.0  # grey levels: a picture whose spread is below this is blank (black, green, grey)
_FROZEN_MAD_GREY = 0.5  # grey levels: pictures closer than this (mean difference) are the same picture
_PICTURE_SAMPLE_S = 1.0  # s: the decoder samples a picture this often (videos all blank or frozen)
_MIN_PICTURE_SAMPLES = 3  # ... and judges only videos with at least this many samples
_MIN_RING_SLOTS = 2  # the fewest ring slots the pipeline runs with: one being decoded, one in a worker
_KEYFRAME_SEEK_PAST_S = 0.001  # fast clips: seek this far past the keyframe, so ffmpeg starts on it
# Resume (section 7): a video's saved results are reused only if these settings are unchanged.
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
_PALETTE_BGR = [(0, 200, 255), (255, 120, 0), (80, 220, 80), (200, 60, 255), (255, 255, 0),
                (60, 60, 255), (0, 255, 180), (255, 0, 160), (160, 160, 255), (0, 140, 255)]


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Records
# ──────────────────────────────────────────────────────────────────────────────────────────────
class BadInput(Exception):
    """A user file (video, photo, model, folder) that cannot be used; the message names it."""


class ClipError(Exception):
    """ffmpeg failed to cut a clip; the message names the video, range, exit code and stderr."""


class OutputError(Exception):
    """A file in OUTPUT_DIR could not be written (disk full, no permission); the message names it."""


class PipelineBroken(Exception):
    """A decoder or worker process died or failed; carries its name, exit code and traceback."""

    def __init__(self, name: str, exitcode, remote_traceback: str = ""):
        how = "failed" if exitcode is None else f"stopped (exit code {exitcode})"
        super().__init__(f"{name} {how}\n{remote_traceback}".rstrip())
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
    width: int  # px, as displayed (after rotation_deg)
    height: int  # px, as displayed
    fps: float  # average frame rate, for display and frame durations only
    frame_count: int  # from the header; an estimate when the header has none
    duration_s: float  # of the video stream, from its first frame
    time_base: Fraction  # of the video stream
    origin_pts: int  # pts of the first video frame: time 0
    video_start_offset_s: float  # video start minus container start (Hamilton clip: 0.844)
    has_audio: bool
    rotation_deg: int = 0  # 0/90/180/270: decoded frames are turned this far counter-clockwise
    frame_count_from_header: bool = False  # frame_count is the header's count, not an estimate
    video_stream_idx: int = 0  # which of the container's video streams (a cover picture is skipped)


@dataclass(frozen=True)
class GpuSlot:
    """The GPU one worker process uses, and what its TensorRT engines are keyed by."""

    id: int  # CUDA device index: PCI bus order among the GPUs CUDA_VISIBLE_DEVICES leaves visible
    name: str  # the GPU model, e.g. "NVIDIA H200"
    tensorrt: str | None  # TensorRT version, None when it is not installed


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
    tracked: bool = False  # its worker has ended all its face tracks
    ranges: list = field(default_factory=list)
    clips: list = field(default_factory=list)  # (path or None, clip start s) per range, in order
    snapshots: set = field(default_factory=set)  # file names of the snapshots its tracks left
    errors: list = field(default_factory=list)
    finished: bool = False
    reused: dict | None = None  # its results.json entry, saved by an earlier run (see RESUME)


# ──────────────────────────────────────────────────────────────────────────────────────────────
# Settings loader
# ──────────────────────────────────────────────────────────────────────────────────────────────
_LIMITS = {  # name -> (minimum, maximum) for numbers; choices for strings
    "NUM_GPU_PROCESSES": (1, 16), "GPU_WORKER_THREADS": (1, 16), "NUM_CPU_LOADERS": (1, 32),
    "BATCH_SIZE": (1, 256), "MAX_BUFFER_SLOTS": (2, 4096), "REC_CHUNK_SIZE": (1, 1024),
    "DET_SIZE": (32, 4096), "PRE_UPSCALE_FACTOR": (1.0, 4.0), "det_prob_threshold": (0.0, 1.0),
    "BOX_PADDING_PERCENTAGE": (0, 100), "CUSTOM_THRESHOLD": (0.0, 2.0), "MATCH_MARGIN": (0.0, 2.0),
    "MIN_TRACK_HITS": (1, 100), "MIN_FACE_SIZE": (0, 1000), "RECOGNITION_INTERVAL": (1, 1000),
    "TRACK_MAX_GAP": (0.0, 60.0), "FRAME_INTERVAL": (1, 1000),
    "CLIP_DURATION_BEFORE": (0.0, 600.0), "CLIP_DURATION_AFTER": (0.0, 600.0),
    "MERGE_GAP_TOLERANCE": (0.0, 3600.0), "PROVIDERS": tuple(_PROVIDER_ORDER),
    "CLIP_MODE": ("accurate", "fast"), "GPU_DEVICE_IDS": (0, 63), "FRAMES_ON_DEVICE": ("auto", "on", "off"),
}
_FLAG_ALIASES = {"VIDEO_DIR": ["--videos"], "REFERENCE_DIR": ["--refs"], "OUTPUT_DIR": ["--output"],
                 "MODEL_ROOT": [], "MODEL_PACK_NAME": ["--model-pack"], "PROVIDERS": []}
_NEGATING_FLAGS = {"RESUME": ("--force", "search every video again (the same as --no-resume)")}


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
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*) = .*?  # (.*)$", line)
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


def parse_id_list(text: str) -> tuple:
    """Return device numbers from '0,1' or '0 1'; 'all' or '' give () (every visible GPU)."""
    parts = [p for p in re.split(r"[,\s]+", text.strip().strip("()")) if p]
    if parts in ([], ["all"]):
        return ()
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU numbers such as 0,1 or 'all', got {text!r}") from None


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
        elif name == "GPU_DEVICE_IDS":
            kwargs.update(type=parse_id_list, metavar="N[,N...]|all")
        elif name in ("PROVIDERS", "CLIP_MODE", "FRAMES_ON_DEVICE"):
            kwargs["choices"] = _LIMITS[name]
        else:
            kwargs["type"] = float if isinstance(default, float) else type(default)
        parser.add_argument(*flags, **kwargs)
        if name in _NEGATING_FLAGS:  # a flag that sets a boolean setting to False
            flag, text = _NEGATING_FLAGS[name]
            parser.add_argument(flag, dest=name, action="store_false", default=argparse.SUPPRESS,
                                help=text)
    parser.add_argument("--check", action="store_true",
                        help="print what would run (versions, providers, GPUs, models, ffmpeg, "
                             "videos, photos and their problems) and change nothing")
    parser.add_argument("--demo", action="store_true",
                        help="build a small demo (video + reference photo) in a temporary folder "
                             "and run the whole search on it")
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
    return settings_from_args(build_arg_parser().parse_args(argv))


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Return validated Settings from parsed arguments; raise ValueError naming a bad flag."""
    values = {name: getattr(args, name) for name in SETTING_NAMES}
    values["DET_SIZE"] = tuple(values["DET_SIZE"])
    values["GPU_DEVICE_IDS"] = tuple(values["GPU_DEVICE_IDS"])
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


def label_key(label: str) -> str:
    """Return a label as compared for duplicates: case, spaces, '_' and '-' ignored."""
    return re.sub(r"[\s_\-]+", "", label).casefold()


def reference_files(folder: Path) -> list:
    """Return the files in the folder and its first-level subfolders (system files left out);
    raise BadInput if the folder does not exist."""
    if not folder.is_dir():
        raise BadInput(f"reference folder {folder} does not exist: create it and put one photo "
                       f"per person in it, named after the person (e.g. Barack_Obama.jpg)")
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and len(p.relative_to(folder).parts) <= 2
            and p.name.lower() not in _IGNORED_FILES and not p.name.startswith("._")]


def scan_reference_folder(folder: Path) -> tuple:
    """Return ({label: [photo paths]}, {label: the spellings merged into it}, [files in other
    formats]) for the folder and its first-level subfolders. Labels that differ only in case,
    spaces, '_' or '-' are one person, named by the first spelling (files sorted)."""
    photos, spellings, others, first = {}, {}, [], {}
    for path in reference_files(folder):
        if path.suffix.lower() not in _IMAGE_EXTENSIONS:
            others.append(path)
            continue
        spelled = reference_label(path, folder)
        label = first.setdefault(label_key(spelled), spelled)
        photos.setdefault(label, []).append(path)
        spellings.setdefault(label, set()).add(spelled)
    return photos, spellings, others


def list_reference_photos(folder: Path) -> dict:
    """Return {label: [photo paths]} (see scan_reference_folder)."""
    return scan_reference_folder(folder)[0]


def reference_folder_notes(spellings: dict, others: list) -> tuple:
    """Return ([skipped files: other formats], [notes: label spellings merged]) of a scan."""
    skipped = [f"{path}: not a supported photo format ({path.suffix or 'no extension'}); "
               f"convert it to .jpg or .png (skipped)" for path in others]
    notes = [f"labels {', '.join(repr(s) for s in sorted(names))} differ only in case, spaces, '_' "
             f"or '-': their photos are used as one person, {label!r}"
             for label, names in spellings.items() if len(names) > 1]
    return skipped, notes


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
    photos, spellings, others = scan_reference_folder(folder)
    problems, notes = reference_folder_notes(spellings, others)
    references = []
    for label, paths in photos.items():
        embeddings, used = [], []
        for path in paths:
            try:
                embedding, note = embed_reference_photo(path, models, settings)
            except BadInput as error:
                problems.append(str(error))
                continue
            notes += [note] if note else []
            embeddings.append(embedding)
            used.append(str(path))
        if embeddings:
            references.append(Reference(label, used, np.stack(embeddings)))
    return drop_photos_of_the_same_face(references, problems), problems, notes


def embed_reference_photo(path: Path, models, settings: Settings) -> tuple:
    """Return (embedding of the photo's largest sure face, note or None); raise BadInput naming
    the photo when it is unreadable, shows no face, or the face is too small to recognise."""
    image = read_image(path)
    boxes, kps = detect_faces(models, [image], settings)[0]
    sure = boxes[:, 4] >= _SURE_FACE_SCORE  # a big doubtful detection must not win
    if sure.any():
        boxes, kps = boxes[sure], kps[sure]
    if len(boxes) == 0:
        raise BadInput(f"{path}: no face found; use a photo where the face is clearly visible (skipped)")
    pick = largest_face_index(boxes)
    size_px = face_size_px(boxes[pick])
    if size_px < max(settings.MIN_FACE_SIZE, 1):
        raise BadInput(f"{path}: the face is only {size_px:.0f} px, too small to recognise (below "
                       f"MIN_FACE_SIZE {settings.MIN_FACE_SIZE}); use a larger or closer photo (skipped)")
    notes = [f"{len(boxes)} faces found, using the largest"] if len(boxes) > 1 else []
    if size_px < _REF_SMALL_FACE_PX:
        notes.append(f"the face is small ({size_px:.0f} px); a photo with the face at least "
                     f"{_REF_SMALL_FACE_PX} px tall recognises more reliably")
    crop = align_face(image, kps[pick])
    note = f"{path}: {'; '.join(notes)}" if notes else None
    return embed_faces(models, [crop], settings.REC_CHUNK_SIZE)[0], note


def drop_photos_of_the_same_face(references: list, problems: list) -> list:
    """Return the references without photos whose face is another label's (the same photo under
    two names: neither could ever be named, as no match would beat the other by MATCH_MARGIN);
    each dropped photo is added to problems."""
    kept = []
    for reference in references:
        keep = []
        for photo, embedding in zip(reference.photos, reference.embeddings):
            twin = next(((other, p) for other in kept for p, e in zip(other.photos, other.embeddings)
                         if float(e @ embedding) >= _SAME_FACE_REF_SIMILARITY), None)
            if twin is None:
                keep.append((photo, embedding))
            else:
                problems.append(f"{photo} ({reference.name}) shows the same face as {twin[1]} "
                                f"({twin[0].name}): one person under two names can never be told "
                                f"apart; keep the photo under one name (skipped)")
        if keep:
            kept.append(Reference(reference.name, [p for p, _ in keep], np.stack([e for _, e in keep])))
    return kept


def reference_matrix(references: list) -> tuple:
    """Return (embeddings [photos, dim], person index of each photo)."""
    embeddings = np.concatenate([r.embeddings for r in references]).astype(np.float32)
    owners = np.concatenate([np.full(len(r.embeddings), i) for i, r in enumerate(references)])
    return embeddings, owners


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 2 Decoding
# ──────────────────────────────────────────────────────────────────────────────────────────────
def list_videos(folder: Path) -> list:
    """Return the video files under a folder, sorted, and any folders named like a video (probe_all
    reports those by name; the videos inside them are listed too); raise BadInput if the folder is
    missing."""
    if not folder.is_dir():
        raise BadInput(f"video folder {folder} does not exist: create it and put your videos in it "
                       f"(or see a complete example first with: python main.py --demo)")
    return sorted(p.resolve() for p in folder.rglob("*")
                  if p.suffix.lower() in _VIDEO_EXTENSIONS and (p.is_file() or p.is_dir()))


def unique_output_names(paths: list, root: Path) -> list:
    """Return one output folder name per video: its stem, or where stems clash, its path under
    root with the extension (a/x.mp4 -> a_x_mp4)."""
    stems = [p.stem for p in paths]

    def long_name(path: Path) -> str:
        relative = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        return "_".join([*relative.parent.parts, relative.stem, relative.suffix.lstrip(".")])
    return [p.stem if stems.count(p.stem) == 1 else long_name(p) for p in paths]


def read_head(path: Path) -> bytes:
    """Return the first 64 bytes of a file; raise BadInput for a folder, an unreadable or an
    empty file, saying what to do."""
    if path.is_dir():
        raise BadInput(f"{path}: is a folder named like a video, not a video; the videos inside it "
                       f"are searched. Rename the folder (without '{path.suffix}') to silence this")
    try:
        with open(path, "rb") as file:
            head = file.read(64)
    except PermissionError:
        raise BadInput(f"{path}: permission denied, this user cannot read it; make it readable "
                       f"(chmod a+r, or ask its owner), or remove it from the folder") from None
    except OSError as error:  # EIO from a failing disk or network share, a broken link, ...
        raise BadInput(f"{path}: cannot be read ({error.strerror or error}); check the disk or "
                       f"the network share it is on (dmesg lists read errors), copy it again, or "
                       f"remove it from the folder") from None
    if not head:
        raise BadInput(f"{path}: is empty (0 bytes), probably an unfinished copy or download; copy "
                       f"it again, or remove it from the folder")
    return head


def describe_content(head: bytes) -> str | None:
    """Return what a file's first bytes show it to be ("a text file", "a JPEG image", "an MP4/MOV
    file", ...), or None when they do not tell."""
    signatures = [(b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"),
                  (b"GIF8", "a GIF image"), (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive")]
    for signature, what in signatures:
        if head.startswith(signature):
            return what
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
        return "an MP4/MOV file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:  # the 64 bytes may end inside a character
        text = head[:error.start].decode("utf-8") if error.start >= len(head) - 3 else ""
    return "a text file" if text and all(c.isprintable() or c in "\r\n\t" for c in text) else None


def unreadable_message(path: Path, head: bytes, error: Exception) -> str:
    """Return the message for a file ffmpeg cannot open: what it is, and what to do."""
    what = describe_content(head)
    if what == "an MP4/MOV file":
        return (f"{path}: is an MP4/MOV file that ffmpeg cannot read ({error}); it is truncated "
                f"(its index, the 'moov' atom, is missing when a download or recording did not "
                f"finish) or damaged: copy it again, or repair it (e.g. with untrunc)")
    if what is not None:
        photo_hint = " (photos of people belong in the reference folder)" if "image" in what else ""
        return f"{path}: is {what}, not a video; remove it from the video folder{photo_hint}"
    return (f"{path}: cannot be opened as a video ({error}); check that it plays in a video "
            f"player: if it does not, it is damaged, so copy it again or remove it from the folder")


def probe_video(path: Path, idx: int, output_name: str) -> VideoInfo:
    """Return the video's facts from its headers and first frame; raise BadInput naming the file,
    what is wrong and what to do."""
    import av
    head = read_head(path)
    try:
        with av.open(str(path)) as container:
            stream = video_stream_of(path, container)
            rotation = first_frame_rotation(path, container, stream)
            return video_info(path, idx, output_name, container, stream, rotation)
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise BadInput(unreadable_message(path, head, error)) from None


def first_frame_rotation(path: Path, container, stream) -> float:
    """Return the display rotation (degrees counter-clockwise) of the first decodable frame;
    raise BadInput when no frame can be decoded."""
    damaged_pts = []
    first = next(decoded_frames(container, stream, damaged_pts), None)
    if first is None:
        reason = f" ({len(damaged_pts)} damaged packets)" if damaged_pts else ""
        raise BadInput(f"{path}: no frame can be decoded{reason}; the file is truncated or "
                       f"damaged: copy it again, or remove it from the folder")
    return first.rotation


def video_stream_of(path: Path, container):
    """Return the container's first video stream that is not a cover picture; raise BadInput for
    an audio-only file (with or without a cover picture) or a still image."""
    import av
    cover = av.stream.Disposition.attached_pic  # a song's cover art, stored as a video stream
    covers = [s for s in container.streams.video if s.disposition & cover]
    moving = [s for s in container.streams.video if s not in covers]
    if not moving:
        audio = [s.codec_context.name for s in container.streams.audio]
        what = f"audio only: {', '.join(audio)}" if audio else "no audio either"
        what += ", with a cover picture" if covers else ""
        raise BadInput(f"{path}: has no video stream ({what}), so there is nothing to search; "
                       f"remove it from the folder")
    if container.format.name.endswith("_pipe") or container.format.name == "image2":
        raise BadInput(f"{path}: is a still image ({container.format.name}), not a video; remove "
                       f"it from the video folder (photos of people belong in the reference folder)")
    stream = moving[0]
    if not stream.width or not stream.height:
        raise BadInput(f"{path}: video stream has no frame size; the file may be damaged")
    return stream


def video_info(path: Path, idx: int, output_name: str, container, stream, rotation: float) -> VideoInfo:
    """Return the VideoInfo of an open video; width and height are as displayed (rotated)."""
    time_base = Fraction(stream.time_base)
    origin_pts = stream.start_time if stream.start_time is not None else 0
    container_start_s = (container.start_time or 0) / 1_000_000
    fps = float(stream.average_rate or stream.guessed_rate or 25)
    if stream.duration:
        duration_s = float(stream.duration * time_base)
    else:
        duration_s = (container.duration or 0) / 1_000_000
    rotation_deg = display_rotation_deg(rotation)
    width, height = (stream.height, stream.width) if rotation_deg in (90, 270) else \
        (stream.width, stream.height)
    return VideoInfo(
        idx=idx, path=str(path), output_name=output_name, width=width, height=height, fps=fps,
        frame_count=stream.frames or int(round(duration_s * fps)), duration_s=duration_s,
        time_base=time_base, origin_pts=origin_pts,
        video_start_offset_s=float(origin_pts * time_base) - container_start_s,
        has_audio=bool(container.streams.audio), rotation_deg=rotation_deg,
        frame_count_from_header=bool(stream.frames),
        video_stream_idx=list(container.streams.video).index(stream))


def display_rotation_deg(rotation: float) -> int:
    """Return a display matrix's rotation (degrees counter-clockwise, -180..180, as PyAV's
    frame.rotation gives it) as 0, 90, 180 or 270."""
    return int(round(rotation / 90)) % 4 * 90


def frame_time_s(pts: int, origin_pts: int, time_base: Fraction) -> float:
    """Return a frame's time in seconds from the first video frame (exact until this conversion)."""
    return float((pts - origin_pts) * time_base)


def to_display(image: np.ndarray, rotation_deg: int) -> np.ndarray:
    """Return a decoded image turned counter-clockwise by rotation_deg, as players show it."""
    return np.ascontiguousarray(np.rot90(image, rotation_deg // 90)) if rotation_deg else image


def bob_deinterlace(image: np.ndarray) -> np.ndarray:
    """Return an interlaced frame's top field (its even lines) stretched to full height: the
    picture of one instant, without the combing that two fields woven together show."""
    import cv2
    return cv2.resize(image[0::2], (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)


def pyav_frames(info: VideoInfo, frame_interval: int, damaged_pts: list):
    """Yield (frame_idx, time_s, BGR array as displayed, or None for a frame that is not kept)
    for every frame PyAV decodes; interlaced frames are deinterlaced (bob). Packets the decoder
    rejects are skipped, as the ffmpeg command line does, and their pts added to damaged_pts."""
    import av
    with av.open(info.path) as container:
        stream = container.streams.video[info.video_stream_idx]
        stream.thread_type = "AUTO"
        last_pts = None
        frame_duration = 1 / Fraction(info.fps).limit_denominator(100000) / info.time_base
        for frame_idx, frame in enumerate(decoded_frames(container, stream, damaged_pts)):
            pts = frame.pts
            if pts is None:  # rare: a frame without a timestamp follows its predecessor
                pts = info.origin_pts if last_pts is None else last_pts + int(frame_duration)
            last_pts = pts
            image = None
            if frame_idx % frame_interval == 0:
                image = frame.to_ndarray(format="bgr24")
                if frame.interlaced_frame:
                    image = bob_deinterlace(image)
                image = to_display(image, info.rotation_deg)
            yield frame_idx, frame_time_s(pts, info.origin_pts, info.time_base), image


def decoded_frames(container, stream, damaged_pts: list):
    """Yield the frames of one stream of an open container, skipping the packets the decoder
    rejects (their pts go to damaged_pts), as the ffmpeg command line does."""
    for packet in container.demux(stream):
        yield from decode_packet(packet, damaged_pts)


def decode_packet(packet, damaged_pts: list) -> list:
    """Return the frames one packet decodes to; a packet the decoder rejects as invalid data
    gives none, and its pts is added to damaged_pts."""
    import av
    try:
        return packet.decode()
    except av.error.InvalidDataError:
        damaged_pts.append(packet.pts)
        return []


def packet_times_s(info: VideoInfo, keyframes_only: bool = False) -> list:
    """Return the sorted times (s, frame clock) of the video stream's packets (every frame's exact
    timestamp), or of its keyframes only, read without decoding."""
    import av
    with av.open(info.path) as container:
        stream = container.streams.video[info.video_stream_idx]
        return sorted(frame_time_s(packet.pts, info.origin_pts, info.time_base)
                      for packet in container.demux(stream)
                      if packet.pts is not None and (packet.is_keyframe or not keyframes_only))


def nearest_time_s(times_s: list, approx_s: float, tolerance_s: float) -> float:
    """Return the time in sorted times_s nearest to approx_s, or approx_s itself when none is
    within tolerance_s."""
    import bisect
    i = bisect.bisect_left(times_s, approx_s)
    near = [t for t in times_s[max(0, i - 1):i + 1] if abs(t - approx_s) <= tolerance_s]
    return min(near, key=lambda t: abs(t - approx_s)) if near else approx_s


def opencv_frames(info: VideoInfo, frame_interval: int):
    """Yield what pyav_frames yields, decoded by OpenCV (the fallback decoder). Each time is the
    packet timestamp (exact, read by PyAV's demuxer) nearest to OpenCV's position, which counts
    from the first frame too; OpenCV's own where no packet is within half a frame."""
    import cv2
    times_s = packet_times_s(info)
    capture = cv2.VideoCapture(info.path, cv2.CAP_FFMPEG)
    capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)  # rotated below, exactly as PyAV's frames
    try:
        frame_idx = 0
        while capture.grab():
            time_s = nearest_time_s(times_s, capture.get(cv2.CAP_PROP_POS_MSEC) / 1000,
                                    0.5 / info.fps)
            image = None
            if frame_idx % frame_interval == 0:
                ok, image = capture.retrieve()
                image = to_display(image, info.rotation_deg) if ok else None
            yield frame_idx, time_s, image
            frame_idx += 1
    finally:
        capture.release()


def grey_sample(image: np.ndarray) -> np.ndarray:
    """Return every 8th pixel of every 8th row as grey levels (float32): enough to tell a blank
    or repeated picture."""
    return image[::8, ::8].mean(axis=2, dtype=np.float32)


def frames_look_broken(images: list) -> bool:
    """Return True when there is no picture, every picture is blank (near-uniform: black, green,
    grey), or they are all the same picture (a decoder repeating a stale frame)."""
    if not images:
        return True
    grey = [grey_sample(image) for image in images]
    if all(g.std() < _BLANK_STD_GREY for g in grey):
        return True
    return len(grey) > 1 and all(np.abs(g - grey[0]).mean() < _FROZEN_MAD_GREY for g in grey[1:])


class PictureSampler:
    """Samples about one picture per second of a video to tell whether every one was blank or
    frozen: a decoder returning success with such pictures makes 'nobody found' look like a
    result (the first frames are checked in working_decoder_frames; this covers the rest). Keeps
    only the last sample."""

    def __init__(self):
        self.count, self.alive, self.next_s, self.previous = 0, False, -math.inf, None

    def add(self, time_s: float, image: np.ndarray) -> None:
        """Sample this picture if a sample is due at time_s (s)."""
        if time_s < self.next_s:
            return
        self.next_s = time_s + _PICTURE_SAMPLE_S
        grey = grey_sample(image)
        blank = bool(grey.std() < _BLANK_STD_GREY)
        if self.previous is not None:  # alive: the picture changed, and not from blank to blank
            changed = float(np.abs(grey - self.previous[0]).mean()) >= _FROZEN_MAD_GREY
            self.alive |= changed and not (blank and self.previous[1])
        self.previous, self.count = (grey, blank), self.count + 1

    def problem(self, info: VideoInfo) -> str | None:
        """Return the message for a video whose samples (at least _MIN_PICTURE_SAMPLES) were all
        blank or frozen; None otherwise."""
        if self.count < _MIN_PICTURE_SAMPLES or self.alive:
            return None
        return (f"{info.path}: every picture was blank or frozen ({self.count} sampled, about "
                f"{_PICTURE_SAMPLE_S:g} s apart): 'nobody found' may be wrong; check that the file "
                f"plays in a video player, and if it does, re-encode it (ffmpeg -i IN -c:v libx264 "
                f"OUT.mp4) and search that")


def take_kept(frames, count: int) -> list:
    """Return the next items of a frame iterator, up to and including its count-th kept image."""
    taken = []
    for item in frames:
        taken.append(item)
        if sum(image is not None for _, _, image in taken) >= count:
            break
    return taken


def working_decoder_frames(info: VideoInfo, frame_interval: int, damaged_pts: list):
    """Return an iterator like pyav_frames': PyAV's frames, or OpenCV's when PyAV's first kept
    frames look broken (blank or frozen) and OpenCV's do not. A video that really opens on black
    or on a still picture looks the same in both, so it stays with PyAV."""
    primary = pyav_frames(info, frame_interval, damaged_pts)
    frame_bytes = info.width * info.height * 3
    head = take_kept(primary, max(2, min(_DECODER_CHECK_FRAMES, _DECODER_CHECK_BYTES // frame_bytes)))
    images = [image for _, _, image in head if image is not None]
    if not images or not frames_look_broken(images):  # no frame at all: decode_frames reports it
        return itertools.chain(head, primary)
    fallback = opencv_frames(info, frame_interval)
    fallback_head = take_kept(fallback, max(1, len(images)))
    if frames_look_broken([image for _, _, image in fallback_head if image is not None]):
        fallback.close()
        return itertools.chain(head, primary)
    primary.close()
    damaged_pts.clear()
    print(f"[!] {info.path}: PyAV decoded only blank or frozen pictures at the start, where "
          f"OpenCV's decoder shows a picture: this video is decoded with OpenCV", flush=True)
    return itertools.chain(fallback_head, fallback)


def decoding_problem(info: VideoInfo, decoded_count: int, last_time_s: float,
                     damaged_pts: list) -> str | None:
    """Return the message for a video whose decoding ended well before its header's frame count
    (or, without one, its duration), or skipped damaged packets; None when neither happened."""
    problems = []
    if info.frame_count_from_header:  # a damaged packet explains one missing frame
        early = decoded_count + len(damaged_pts) < info.frame_count - max(2, info.frame_count // 100)
    else:
        early = last_time_s + 1 / info.fps < info.duration_s - max(2.0, 0.1 * info.duration_s)
    if early:
        problems.append(f"decoding stopped at {last_time_s:.2f} s of {info.duration_s:.2f} s "
                        f"({decoded_count} of {info.frame_count} frames): the file is truncated, "
                        f"and the rest was not searched")
    if damaged_pts:
        times_s = sorted(frame_time_s(p, info.origin_pts, info.time_base)
                         for p in damaged_pts if p is not None)
        where = f" (at {', '.join(f'{t:.2f}' for t in times_s[:5])} s)" if times_s else ""
        problems.append(f"{len(damaged_pts)} damaged packet(s) could not be decoded{where}: the "
                        f"frames around them were not searched")
    if not problems:
        return None
    return (f"{info.path}: {'; '.join(problems)}. Copy the file again, or re-encode the readable "
            f"part (ffmpeg -i IN -c:v libx264 OUT.mp4) to silence this")


def decode_frames(info: VideoInfo, frame_interval: int):
    """Yield (frame_idx, time_s, BGR array as displayed) for every frame_interval-th decoded
    frame; at the end, raise BadInput if the file turned out truncated or damaged."""
    decoded_count, last_time_s, damaged_pts = 0, 0.0, []
    for frame_idx, time_s, image in working_decoder_frames(info, frame_interval, damaged_pts):
        decoded_count, last_time_s = frame_idx + 1, time_s
        if image is not None:
            yield frame_idx, time_s, image
    if problem := decoding_problem(info, decoded_count, last_time_s, damaged_pts):
        raise BadInput(problem)


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


def decoder_main(name, layout, jobs_q, free_q, filled_qs, result_q, stop_event, frame_interval):
    """Decode each video from jobs_q into ring slots; report per video; exit on a None job.

    All frames of a video go to one worker's queue (filled_qs[video_idx % workers]), in order,
    followed by an end marker, because that worker follows the video's faces frame by frame.
    """
    def body(ring):
        clock = StageClock()
        while (info := get_with_stop(jobs_q, stop_event)) is not None:
            result_q.put(("video_start", name, info.idx))
            filled_q = filled_qs[info.idx % len(filled_qs)]
            sent, error = decode_into_ring(info, ring, free_q, filled_q, stop_event, frame_interval,
                                           clock)
            if not stop_event.is_set():
                filled_q.put((info.idx, sent, None, None, 0, 0, None))  # end marker
            result_q.put(("video_done", info.idx, sent, error))
        for filled_q in filled_qs:  # flush every frame into the pipes before saying "done": the
            filled_q.close()  # parent then sends the workers' stop sentinels, which must come last
            if not parent_gone():
                filled_q.join_thread()
        result_q.put(("stats", name, clock.report()))
    run_child(name, layout, result_q, (free_q, *filled_qs), body)


def decode_into_ring(info, ring, free_q, filled_q, stop_event, frame_interval,
                     clock: StageClock) -> tuple:
    """Return (frames sent, error text or None) after streaming one video into the ring. Any
    failure is this video's error alone (the decoder goes on with the next video), and so are
    pictures that were all blank or frozen (see PictureSampler)."""
    import av
    sent, pictures, error = 0, PictureSampler(), None
    try:
        started = time.perf_counter()
        for frame_idx, time_s, image in decode_frames(info, frame_interval):
            clock.add("decode", time.perf_counter() - started)
            if image.size > ring[0].size:
                error = (f"{info.path}: frame {frame_idx} is {image.shape[1]}x{image.shape[0]}, "
                         f"larger than the header said; the rest of the video was skipped")
                break
            pictures.add(time_s, image)
            frame = (sent, frame_idx, time_s, image)
            if not send_frame(info, ring, free_q, filled_q, stop_event, clock, frame):
                return sent, "stopped"
            sent += 1
            started = time.perf_counter()
    except (av.error.FFmpegError, OSError) as failure:
        error = (f"{info.path}: decoding stopped after {sent} processed frames ({failure}); the "
                 f"file is truncated or damaged and the rest was not searched; copy it again, or "
                 f"re-encode the readable part (ffmpeg -i IN -c:v libx264 OUT.mp4)")
    except BadInput as failure:  # decoding ended early or skipped damaged packets
        error = str(failure)
    except Exception as failure:  # e.g. cv2.error in the OpenCV fallback: this video's error only
        error = unexpected_decoding_error(info, sent, failure)
    problems = [problem for problem in (error, pictures.problem(info)) if problem]
    return sent, "; ".join(problems) or None


def send_frame(info, ring, free_q, filled_q, stop_event, clock: StageClock, frame: tuple) -> bool:
    """Copy one (seq, frame_idx, time_s, image) into a free ring slot and queue it for its worker;
    return False once the run is stopping (no slot taken)."""
    seq, frame_idx, time_s, image = frame
    waited = time.perf_counter()
    slot = get_with_stop(free_q, stop_event)
    if slot is None:
        return False
    clock.add("wait_for_slot", time.perf_counter() - waited)
    write_slot(ring, slot, image)
    filled_q.put((info.idx, seq, frame_idx, time_s, image.shape[0], image.shape[1], slot))
    return True


def unexpected_decoding_error(info, sent: int, error: Exception) -> str:
    """Return the message for an unexpected failure while decoding a video: the exception as a
    traceback's last line shows it, and the line of code where it happened."""
    where = traceback.extract_tb(error.__traceback__)[-1]
    last_line = " ".join(traceback.format_exception_only(type(error), error)[-1].split())
    return (f"{info.path}: decoding failed after {sent} processed frames ({last_line}; at "
            f"{Path(where.filename).name}:{where.lineno} in {where.name}); the rest was not "
            f"searched. Check that the file plays in a video player, or re-encode it (ffmpeg -i IN "
            f"-c:v libx264 OUT.mp4); if it plays, please report this message")


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 3 Ring buffer
# ──────────────────────────────────────────────────────────────────────────────────────────────
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


def create_ring(layout: RingLayout) -> shared_memory.SharedMemory:
    """Create the ring's shared memory (parent only; the parent also unlinks it). A Ctrl-C
    meanwhile cannot leave a block behind that nobody owns: it is held until the block is made
    (shm_open, then sizing it), and the block is unlinked before the Ctrl-C goes on."""
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
            return q.get(timeout=_QUEUE_TIMEOUT_S)
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
    det_path: str = ""  # the pack's detector file
    rec_path: str = ""
    det_batched: bool = False  # det_session takes [N,3,H,W] and returns [N, anchors, C]
    det_file: str = ""  # the file det_session runs: det_path, or its batch-capable copy
    gpu: GpuSlot | None = None
    device: DeviceGraphs | None = None  # set when frames go to the models' device (FRAMES_ON_DEVICE)


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
        if not graph.input or not graph.output:  # an empty file parses as an empty model
            raise BadInput(f"{path}: not a valid ONNX model (empty or truncated); download the pack again")
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
    return "DynamicQuantizeLinear" in model_op_types(model_path)


@lru_cache(maxsize=16)
def model_op_types(model_path: Path) -> frozenset:
    """Return the op types a model's graph uses (read once per file)."""
    import onnx
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return frozenset(node.op_type for node in graph.node)


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def output_reshape(graph, output_name: str, producers: dict):
    """Return the Reshape node that flattens one SCRFD output (behind a Sigmoid, say), or None."""
    node = producers.get(output_name)
    while node is not None and node.op_type in ("Sigmoid", "Identity", "Mul", "Add"):
        node = producers.get(node.input[0])
    return node if node is not None and node.op_type == "Reshape" else None


def constant_values(graph, name: str):
    """Return a graph initializer's or Constant node's values as a NumPy array, or None."""
    from onnx import numpy_helper
    for tensor in graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def make_detector_batchable(model) -> str | None:
    """Edit an SCRFD graph in place so it takes [N,3,H,W] and returns [N, anchors, C] per output;
    return None, or why it cannot be done.

    InsightFace's det_500m/det_10g transpose each head [N,C,H,W] to [H,W,N,C] and reshape it to
    [-1, C]: with N > 1 the images' anchors come out interleaved, which is why only freeing the
    batch axis gives wrong results. The transpose becomes [N,H,W,C] and the reshape [N,-1,C]
    (0 = keep the batch); graphs that already reshape by their input's batch stay as they are.
    """
    from onnx import numpy_helper
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    for output in graph.output:
        reshape = output_reshape(graph, output.name, producers)
        transpose = producers.get(reshape.input[0]) if reshape is not None else None
        if transpose is None or transpose.op_type != "Transpose":
            return f"output {output.name} is not a transposed, reshaped head"
        perm = list(transpose.attribute[0].ints)
        if perm == [2, 3, 0, 1]:
            transpose.attribute[0].ints[:] = [0, 2, 3, 1]
        elif perm != [0, 2, 3, 1]:
            return f"output {output.name}: unexpected transpose {perm}"
        shape = constant_values(graph, reshape.input[1])
        if shape is not None:
            if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != 1):
                return f"output {output.name}: unexpected reshape to {shape.tolist()}"
            name = f"{reshape.output[0]}_batched_shape"
            graph.initializer.append(numpy_helper.from_array(
                np.array([0, -1, int(shape[-1])], np.int64), name))
            reshape.input[1] = name
        channels = output.type.tensor_type.shape.dim[-1].dim_value
        del output.type.tensor_type.shape.dim[:]
        for dim in ("batch", "anchors", channels):
            output.type.tensor_type.shape.dim.add().CopyFrom(onnx_dim(dim))
    graph.input[0].type.tensor_type.shape.dim[0].CopyFrom(onnx_dim("batch"))
    del graph.value_info[:]  # shapes inferred for batch 1 are stale now
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:  # the old [-1, C] shapes
        graph.initializer.remove(tensor)
    return None


def onnx_dim(value):
    """Return an ONNX tensor dimension: a number, or a named (symbolic) one."""
    from onnx import TensorShapeProto
    dim = TensorShapeProto.Dimension()
    if isinstance(value, str):
        dim.dim_param = value
    else:
        dim.dim_value = value
    return dim


def batch_outputs_match(original: Path, batched: bytes, input_hw: tuple, batch: int = 3) -> bool:
    """Return True when the batched graph gives, for each image of a random batch, the original
    graph's outputs for that image alone (CPU, within float tolerance)."""
    import onnxruntime as ort
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch, 3, *input_hw)).astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the original's declared output shapes hold for one size only
    single = ort.InferenceSession(str(original), options, providers=["CPUExecutionProvider"])
    multi = ort.InferenceSession(batched, options, providers=["CPUExecutionProvider"])
    name = single.get_inputs()[0].name
    together = multi.run(None, {name: images})
    for i in range(batch):
        alone = single.run(None, {name: images[i:i + 1]})
        for a, b in zip(alone, together):
            if a.size != b[i].size or not np.allclose(a.reshape(b[i].shape), b[i], rtol=1e-4, atol=1e-5):
                return False
    return True


def batched_detector(det_path: Path, cache_dir: Path) -> tuple:
    """Return (path of a batch-capable copy of the detector or None, note for the user).

    The copy is made once per source file (keyed by its SHA-256 and by _BATCHED_EDIT_VERSION)
    in cache_dir/batched/, by one process at a time (a file lock), and proven equal to the
    original on a random batch before it is used; a copy that no longer loads is made again.
    """
    from filelock import FileLock
    target = (cache_dir / "batched" /
              f"{det_path.stem}-{file_sha256(det_path)[:16]}-v{_BATCHED_EDIT_VERSION}.onnx")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if target.is_file() and loads_as_onnx(target):
                return target, f"batched detector: {target}"
            return make_batched_detector(det_path, target)
    except OSError as error:
        return None, f"cannot write {target} ({error}); frames go through the detector one at a time"


def loads_as_onnx(path: Path) -> bool:
    """Return True when a file parses as an ONNX model (a copy cut short by a crash does not)."""
    import onnx
    try:
        onnx.load(str(path))
        return True
    except Exception:  # any parse error: the file is not usable
        return False


def make_batched_detector(det_path: Path, target: Path) -> tuple:
    """Write the batch-capable copy of a detector to target if the edit works and is proven
    equal; return (target or None, note for the user)."""
    import onnx
    model = onnx.load(str(det_path))
    why = make_detector_batchable(model)
    if why is None:
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[2:]]
        data = model.SerializeToString()
        if not batch_outputs_match(det_path, data, tuple(d or 128 for d in dims)):
            why = "the edited graph's outputs differ from the original's"
    if why is not None:
        return None, (f"{det_path.name} cannot be made batch-capable ({why}); frames go "
                      f"through the detector one at a time")
    write_bytes_atomic(target, data)
    return target, f"batched detector made from {det_path.name}: {target}"


def provider_chain(choice: str, available: list) -> list:
    """Return the execution providers to try for --providers, best first; the CPU is always last."""
    wanted = [p for p in _PROVIDER_ORDER[choice] if p in available]
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    return wanted


def provider_library(provider: str) -> Path | None:
    """Return the shared library file ONNX Runtime loads for a GPU provider (None for the CPU)."""
    import onnxruntime as ort
    stem = {"CUDAExecutionProvider": "onnxruntime_providers_cuda",
            "TensorrtExecutionProvider": "onnxruntime_providers_tensorrt"}.get(provider)
    if stem is None:
        return None
    name = f"{stem}.dll" if sys.platform == "win32" else f"lib{stem}.so"
    return Path(ort.__file__).parent / "capi" / name


def both_onnxruntime_builds_problem() -> str | None:
    """Return the explanation when onnxruntime and onnxruntime-gpu are both installed, else None."""
    if package_version("onnxruntime") and package_version("onnxruntime-gpu"):
        return ("onnxruntime and onnxruntime-gpu are both installed: they share one module folder "
                "and the CPU build can win. Fix: pip uninstall -y onnxruntime onnxruntime-gpu && "
                "pip install onnxruntime-gpu")
    return None


def provider_library_error(provider: str) -> str | None:
    """Return why ONNX Runtime's library of a GPU provider cannot be loaded - the system
    loader's error names the missing or mismatched CUDA/cuDNN/TensorRT library - or None when
    it loads (and for the CPU)."""
    import ctypes
    library = provider_library(provider)
    if library is None:
        return None
    if not library.is_file():
        return f"its library {library.name} is missing from the onnxruntime package: reinstall onnxruntime-gpu"
    try:
        ctypes.CDLL(str(library))
    except OSError as error:
        return f"{library.name} cannot be loaded: {error} ({onnxruntime_gpu_build()})"
    return None


def provider_load_problem(provider: str) -> str:
    """Return why ONNX Runtime cannot use a provider: not in this build, or its library's
    load error (see provider_library_error)."""
    import onnxruntime as ort
    both = both_onnxruntime_builds_problem()
    if provider not in ort.get_available_providers():
        build = "onnxruntime-gpu" if package_version("onnxruntime-gpu") else "onnxruntime"
        return both or (f"this onnxruntime build ({build} {ort.__version__}) has no {provider}: "
                        f"pip install onnxruntime-gpu (see README, GPU setup)")
    return provider_library_error(provider) or (
        f"its library loads, but the session did not use it; run with ORT_LOG_LEVEL=0 to see "
        f"ONNX Runtime's reason ({onnxruntime_gpu_build()})")


def tensorrt_missing(provider: str, verdict: str) -> bool:
    """Return True when a verdict on TensorRT only says TensorRT is not installed (onnxruntime-gpu
    lists it always): optional, unlike a CUDA provider that fails."""
    return provider == "TensorrtExecutionProvider" and ("nvinfer" in verdict or tensorrt_version() is None)


def onnxruntime_gpu_build() -> str:
    """Return the CUDA and cuDNN versions this onnxruntime-gpu was built for, as text."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return "build information unavailable"
    cuda, cudnn = getattr(info, "cuda_version", None), getattr(info, "cudnn_version", None)
    if not cuda:
        return "this onnxruntime is a CPU build"
    return f"onnxruntime-gpu {info.__version__} needs CUDA {cuda}" + (f" and cuDNN {cudnn}" if cudnn else "")


def tensorrt_unsupported_ops(model_path: Path) -> frozenset:
    """Return the ops of a model that TensorRT cannot run (int8 dynamic quantization)."""
    return model_op_types(model_path) & _TRT_UNSUPPORTED_OPS


def ort_log_level() -> int:
    """Return ONNX Runtime's log level from ORT_LOG_LEVEL (0 verbose .. 4 fatal; default 3,
    errors only); raise ValueError naming the variable for another value."""
    text = os.environ.get("ORT_LOG_LEVEL", "3").strip()
    if text not in ("0", "1", "2", "3", "4"):
        raise ValueError(f"ORT_LOG_LEVEL must be 0 (verbose) to 4 (fatal), got {text!r}")
    return int(text)


def session_options(threads: int):
    """Return ONNX Runtime session options that do not spin idle threads."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = ort_log_level()
    # Two sessions alternating on few cores slow each other 1.6-2.2x when idle threads spin.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def try_session(path: Path, pairs: list, options, say):
    """Return a session of the model on pairs (provider, options), best first, if the first
    provider really runs it; else None, having said why. ONNX Runtime's own silent retry on
    other providers is off (enable_fallback=0), so its real error is what is said."""
    import onnxruntime as ort
    provider = pairs[0][0]
    try:
        session = ort.InferenceSession(str(path), options, providers=[p for p, _ in pairs],
                                       provider_options=[o for _, o in pairs], enable_fallback=0)
    except Exception as error:  # a provider that fails to start is reported, then skipped
        say(f"{path.name}: {provider} failed ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[0][:300]})")
        return None
    if session.get_providers()[0] == provider:
        return session
    say(f"{path.name}: {provider} did not load: {provider_load_problem(provider)}")
    return None


def open_session(path: Path, chain: list, options, say):
    """Return (session, provider it really runs on) for the first provider of chain (pairs of
    provider and options) that loads; the providers after it take the nodes it cannot run."""
    said = []
    for i, (provider, _) in enumerate(chain):
        session = try_session(path, chain[i:], options, lambda text: (said.append(text), say(text)))
        if session is not None:
            return session, provider
    raise BadInput(f"{path}: no execution provider could open it ({said[-1] if said else None}); "
                   f"the file may be damaged (download the pack again), or reinstall onnxruntime")


def model_input(model_path: Path) -> tuple:
    """Return (first input's name, its dims - None where dynamic -, output count) of a model."""
    import onnx
    graph = onnx.load(str(model_path), load_external_data=False).graph
    dims = [d.dim_value or None for d in graph.input[0].type.tensor_type.shape.dim]
    return graph.input[0].name, dims, len(graph.output)


def detector_profile(input_name: str, dims: list, batch_count: int, box_wh: tuple,
                     largest_stride_px: int = 32) -> dict:
    """Return the detector's TensorRT optimisation profile {input: (min, opt, max) shapes}:
    batches of 1..batch_count (a short last batch needs no new engine) and, for a detector of
    dynamic size, every trimmed input from its largest stride (one feature cell) up to the box
    (DET_SIZE x PRE_UPSCALE_FACTOR)."""
    height_px, width_px = dims[2] or box_wh[1], dims[3] or box_wh[0]
    low_h_px, low_w_px = dims[2] or largest_stride_px, dims[3] or largest_stride_px
    return {input_name: ((1, 3, low_h_px, low_w_px), (batch_count, 3, height_px, width_px),
                         (batch_count, 3, height_px, width_px))}


def recognizer_profile(input_name: str, chunk_count: int, side_px: int = 112) -> dict:
    """Return the recognizer's TensorRT optimisation profile: 1..chunk_count aligned faces."""
    return {input_name: ((1, 3, side_px, side_px), (chunk_count, 3, side_px, side_px),
                         (chunk_count, 3, side_px, side_px))}


def profile_text(profile: dict, which: int) -> str:
    """Return one of a profile's shape sets (0 min, 1 opt, 2 max) as ONNX Runtime's option text,
    e.g. 'input.1:1x3x32x32'; raise BadInput for an input name the text cannot hold."""
    bad = [name for name in profile if ":" in name or "," in name]
    if bad:
        raise BadInput(f"model input {bad[0]!r}: TensorRT profiles cannot name inputs with ':' or ','")
    return ",".join(f"{name}:{'x'.join(str(v) for v in shapes[which])}"
                    for name, shapes in sorted(profile.items()))


def engine_cache_key(model_sha256: str, profile: dict, gpu_name: str, trt_version: str,
                     ort_version: str, fp16: bool) -> str:
    """Return the 16-hex-digit key of one TensorRT engine: everything that makes an engine
    unusable elsewhere (model bytes, shape profile, GPU model, TensorRT and ONNX Runtime
    versions, precision) and nothing else, so nothing else causes a rebuild."""
    facts = {"model": model_sha256, "profile": {k: [list(s) for s in v] for k, v in profile.items()},
             "gpu": gpu_name, "tensorrt": trt_version, "onnxruntime": ort_version, "fp16": fp16}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def engine_folder(cache_dir: Path, model_path: Path, profile: dict, gpu: "GpuSlot",
                  fp16: bool) -> Path:
    """Return the folder of one model's TensorRT engine under TRT_CACHE_DIR (see engine_cache_key)."""
    import onnxruntime as ort
    key = engine_cache_key(file_sha256(model_path), profile, gpu.name, gpu.tensorrt or "unknown",
                           ort.__version__, fp16)
    return cache_dir / f"{model_path.stem}-{key}"


def needs_engine_build(folder: Path) -> bool:
    """Return True when a TensorRT engine folder holds no engine yet (the first run builds it).
    An engine folder only ever appears whole: see open_with_tensorrt."""
    return not any(folder.glob("*.engine"))


def tensorrt_options(folder: Path, profile: dict, gpu_id: int, fp16: bool) -> dict:
    """Return the TensorRT provider options: engine and timing cache in the engine's keyed
    folder, fp16, and explicit optimisation profiles."""
    return {"device_id": gpu_id, "trt_fp16_enable": fp16,
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(folder),
            "trt_profile_min_shapes": profile_text(profile, 0),
            "trt_profile_opt_shapes": profile_text(profile, 1),
            "trt_profile_max_shapes": profile_text(profile, 2)}


def tensorrt_version() -> str | None:
    """Return the installed TensorRT version (pip package, else the library's own number), or None."""
    import ctypes
    for name in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-libs"):
        if package_version(name):
            return package_version(name)
    for library in ("libnvinfer.so.10", "libnvinfer.so.8", "nvinfer_10.dll", "nvinfer.dll"):
        try:
            return f"lib{ctypes.CDLL(library).getInferLibVersion()}"
        except (OSError, AttributeError):
            continue
    return None


def visible_gpu_names() -> list:
    """Return the names of the GPUs CUDA sees, in CUDA's order (PCI bus order, as nvidia-smi
    numbers them; CUDA_VISIBLE_DEVICES respected); [] when nvidia-smi is not there."""
    names = [line.split(",")[0].strip() for line in visible_gpus()]
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is None or not names:
        return names
    picked = []
    for entry in (e.strip() for e in chosen.split(",") if e.strip()):
        if not entry.lstrip("-").isdigit():
            picked.append(f"GPU {entry}")  # a UUID or MIG name: its model is not looked up
        elif int(entry) < 0:
            break  # CUDA stops at the first invalid index
        elif int(entry) < len(names):
            picked.append(names[int(entry)])
    return picked


def worker_gpu_ids(worker_count: int, device_ids: tuple, visible_count: int) -> list:
    """Return the CUDA device index of each worker: worker i takes the (i mod n)-th of
    GPU_DEVICE_IDS, or of all visible GPUs when it is empty; raise ValueError for an id that is
    not visible."""
    ids = list(device_ids) or list(range(max(1, visible_count)))
    missing = [i for i in ids if visible_count and i >= visible_count]
    if missing:
        raise ValueError(f"--gpu-device-ids {','.join(map(str, device_ids))}: GPU {missing[0]} is "
                         f"not visible ({visible_count} GPU(s) visible, numbered from 0)")
    return [ids[worker % len(ids)] for worker in range(worker_count)]


def gpu_slots(settings: Settings, worker_count: int) -> list:
    """Return one GpuSlot per worker process (parent only)."""
    names = visible_gpu_names()
    version = tensorrt_version()
    ids = worker_gpu_ids(worker_count, settings.GPU_DEVICE_IDS, len(names))
    return [GpuSlot(i, names[i] if i < len(names) else f"GPU {i}", version) for i in ids]


def usable_chain(path: Path, chain: list, say) -> list:
    """Return the providers of chain that can serve this model, saying why the others cannot: a
    GPU provider whose library does not load, and TensorRT for int8 graphs it cannot run."""
    usable = []
    for provider in chain:
        why = provider_library_error(provider)
        if why is None and provider == "TensorrtExecutionProvider" and tensorrt_unsupported_ops(path):
            why = (f"TensorRT cannot run {', '.join(sorted(tensorrt_unsupported_ops(path)))} (int8 "
                   f"dynamic quantization); this model runs on the next provider")
        if why is None:
            usable.append(provider)
        else:
            say(f"{path.name}: {provider} cannot be used: {why}")
    return usable


def provider_options(provider: str, gpu: GpuSlot) -> dict:
    """Return the options of a CUDA or CPU provider on this worker's GPU."""
    if provider == "CUDAExecutionProvider":
        return {"device_id": gpu.id, "cudnn_conv_algo_search": "HEURISTIC"}
    return {}


def open_with_tensorrt(path: Path, chain: list, profile: dict, options, gpu: GpuSlot,
                       settings: Settings, say):
    """Return a TensorRT session of the model with its engine from the keyed folder, or None
    (said why). One process at a time (a file lock): the first builds the engine into a
    temporary folder, renamed into place only once the session works, so an interrupted or
    failed build leaves nothing a later run would trust; the others then load it."""
    folder = engine_folder(Path(settings.TRT_CACHE_DIR), path, profile, gpu, settings.TRT_FP16)
    folder.parent.mkdir(parents=True, exist_ok=True)
    rest = [(p, provider_options(p, gpu)) for p in chain[1:]]
    with engine_lock(folder, path, say):
        for stale in folder.parent.glob(f"{folder.name}.build-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a build that was killed
        if not needs_engine_build(folder):
            trt = ("TensorrtExecutionProvider", tensorrt_options(folder, profile, gpu.id, settings.TRT_FP16))
            session = try_session(path, [trt, *rest], options, say)
            if session is not None:
                return session
            say(f"{path.name}: the cached engine in {folder} did not load; building it again")
            shutil.rmtree(folder, ignore_errors=True)
        return build_tensorrt_engine(path, folder, rest, profile, options, gpu, settings, say)


@contextlib.contextmanager
def engine_lock(folder: Path, path: Path, say):
    """Hold the file lock of one engine folder, saying so when another process holds it (it is
    building the engine: this one waits, then loads it)."""
    import filelock
    lock = filelock.FileLock(str(folder) + ".lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        say(f"{path.name}: another worker is building or loading its TensorRT engine; waiting for it")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build_tensorrt_engine(path: Path, folder: Path, rest: list, profile: dict, options,
                          gpu: GpuSlot, settings: Settings, say):
    """Return a TensorRT session whose engine was just built into folder, or None (said why)."""
    say(f"[*] WARMUP: Generating TensorRT engine for {path.name} in {folder} (first run only; minutes)")
    build = folder.with_name(f"{folder.name}.build-{os.getpid()}")
    build.mkdir()
    trt = ("TensorrtExecutionProvider", tensorrt_options(build, profile, gpu.id, settings.TRT_FP16))
    session = try_session(path, [trt, *rest], options, say)
    if session is not None and needs_engine_build(build):
        say(f"{path.name}: TensorRT built no engine file in {build}; it is not cached, and the "
            f"model runs on the next provider")
        session = None
    if session is None:
        shutil.rmtree(build, ignore_errors=True)
        return None
    try:
        shutil.rmtree(folder, ignore_errors=True)  # a folder without an engine, e.g. emptied by hand
        os.replace(build, folder)  # the session keeps its engine; later runs find the folder
    except OSError as error:
        say(f"{path.name}: the engine could not be cached in {folder} ({error}); the next run builds it again")
    return session


def open_model(path: Path, chain: list, profile: dict, threads: int, gpu: GpuSlot,
               settings: Settings, say) -> tuple:
    """Return (session, provider) for one model on the best provider of chain that loads."""
    chain = usable_chain(path, chain, say)
    options = session_options(threads)
    if chain[0] == "TensorrtExecutionProvider":
        session = open_with_tensorrt(path, chain, profile, options, gpu, settings, say)
        if session is not None:
            return session, chain[0]
        chain = chain[1:]
    return open_session(path, [(p, provider_options(p, gpu)) for p in chain], options, say)


def load_face_models(settings: Settings, provider_choice: str, threads: int,
                     gpu: GpuSlot | None = None, say=print) -> FaceModels:
    """Return the pack's detector and recognizer, each on the best provider that really loads
    (TensorRT, CUDA, CPU); say() tells what was chosen and why better providers were not."""
    import onnxruntime as ort
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    ort.set_default_logger_severity(ort_log_level())
    det_path, rec_path = classify_pack_models(find_model_pack(settings.MODEL_ROOT,
                                                              settings.MODEL_PACK_NAME))
    chain = provider_chain(provider_choice, ort.get_available_providers())
    say_missing_providers(provider_choice, ort.get_available_providers(), say)
    if "CUDAExecutionProvider" in chain and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* pip packages, when they are installed
    gpu = gpu or GpuSlot(0, "GPU 0", None)
    det_file, batched = det_path, False
    if settings.FRAMES_ON_DEVICE == "on" or (settings.FRAMES_ON_DEVICE == "auto" and chain[0] != "CPUExecutionProvider"):
        made, note = batched_detector(det_path, Path(settings.TRT_CACHE_DIR))
        say(note)
        det_file, batched = (made, True) if made else (det_path, False)
    det_session, det_provider = open_model(det_file, chain, detector_profile_for(
        det_file, settings, batched), threads, gpu, settings, say)
    rec_chunk = 1 if uses_dynamic_quantization(rec_path) else settings.REC_CHUNK_SIZE
    rec_session, rec_provider = open_model(rec_path, chain, recognizer_profile(
        model_input(rec_path)[0], rec_chunk), threads, gpu, settings, say)
    if rec_provider == "CUDAExecutionProvider" and tensorrt_unsupported_ops(rec_path):
        say(f"{rec_path.name}: ONNX Runtime has no CUDA kernels for its int8 ops (ConvInteger): "
            f"those run on the CPU; an fp32 pack such as buffalo_l is faster on a GPU")
    recognizer = ArcFaceONNX(model_file=str(rec_path), session=rec_session)
    models = face_models(det_path, det_file, det_session, batched, recognizer, rec_path,
                         1 if rec_chunk == 1 else 1 << 30, gpu)
    device_type = device_for(det_provider, rec_provider, settings.FRAMES_ON_DEVICE, say)
    if device_type is not None:
        try:
            models.device = DeviceGraphs(models, device_type, gpu.id, threads, say)
        except BadInput as error:
            say(f"frames stay on the CPU: {error}")
    return models


def say_missing_providers(choice: str, available: list, say) -> None:
    """Say why each GPU provider asked for is not in this onnxruntime build: always for
    --providers tensorrt|cuda, and for auto when a GPU is there (else a CPU machine is fine)."""
    missing = [p for p in _PROVIDER_ORDER[choice] if p not in available and p != "CPUExecutionProvider"]
    if missing and (choice != "auto" or visible_gpus()):
        for provider in missing:
            say(f"{provider} cannot be used: {provider_load_problem(provider)}")


def detector_profile_for(det_file: Path, settings: Settings, batched: bool) -> dict:
    """Return the TensorRT profile of this detector file for this run's batch and box sizes."""
    name, dims, output_count = model_input(det_file)
    strides = _SCRFD_LAYOUTS.get(output_count, ((32,),))[0]
    return detector_profile(name, dims, settings.BATCH_SIZE if batched else 1,
                            detector_box_size(settings), max(strides))


def device_for(det_provider: str, rec_provider: str, choice: str, say) -> str | None:
    """Return where the frames go for the device path ('cuda' or 'cpu'), or None to keep the
    CPU path (FRAMES_ON_DEVICE off, or auto without a GPU, or models on different devices)."""
    gpu = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
    if choice == "off" or (choice == "auto" and det_provider not in gpu):
        return None
    if (det_provider in gpu) != (rec_provider in gpu):
        say(f"the detector runs on {det_provider} but the recognizer on {rec_provider}: frames "
            f"stay on the CPU")
        return None
    return "cuda" if det_provider in gpu else "cpu"


def face_models(det_path: Path, det_file: Path, det_session, batched: bool, recognizer,
                rec_path: Path, rec_max_chunk: int, gpu: GpuSlot) -> FaceModels:
    """Return FaceModels for opened sessions; raise BadInput for a detector that is not SCRFD."""
    outputs = det_session.get_outputs()
    if len(outputs) not in _SCRFD_LAYOUTS:
        raise BadInput(f"{det_path}: unknown detector layout, {len(outputs)} outputs with shapes "
                       f"{[o.shape for o in outputs]}; expected SCRFD with 6, 9, 10 or 15")
    strides, anchors, has_kps = _SCRFD_LAYOUTS[len(outputs)]
    if not has_kps:
        raise BadInput(f"{det_path}: this SCRFD model has no keypoints; faces cannot be aligned")
    shape = det_session.get_inputs()[0].shape
    fixed = (shape[3], shape[2]) if all(isinstance(v, int) for v in shape[2:4]) else None
    return FaceModels(
        det_session=det_session, det_input_name=det_session.get_inputs()[0].name,
        det_output_names=[o.name for o in outputs], det_strides=strides, det_anchors=anchors,
        det_fixed_size=fixed, rec_session=recognizer.session, rec_input_name=recognizer.input_name,
        rec_mean=recognizer.input_mean, rec_std=recognizer.input_std,
        providers={det_path.name: det_session.get_providers(),
                   rec_path.name: recognizer.session.get_providers()},
        rec_max_chunk=rec_max_chunk, det_path=str(det_path), rec_path=str(rec_path),
        det_batched=batched, det_file=str(det_file), gpu=gpu)


def detector_input_size(models: FaceModels, settings: Settings, frame_hw: tuple | None = None) -> tuple:
    """Return the (width, height) fed to the detector for frames of this size.

    The frame is scaled to fit DET_SIZE x PRE_UPSCALE_FACTOR exactly as insightface letterboxes
    it, but the input is trimmed to the scaled frame (rounded up to the 32 px SCRFD needs): a
    16:9 frame at 640x640 is fed as 640x384 with the same scale and the same faces, and 40 %
    less work. Models with a fixed input size get that size.
    """
    if models.det_fixed_size:
        return models.det_fixed_size
    box_w, box_h = detector_box_size(settings)
    if frame_hw is None:
        return box_w, box_h
    new_w, new_h = letterbox_size(frame_hw, (box_w, box_h))
    trimmed = min(box_w, -(-new_w // 32) * 32), min(box_h, -(-new_h // 32) * 32)
    # Rounding can, rarely, make the other side the limiting one: then keep the full box.
    return trimmed if letterbox_size(frame_hw, trimmed) == (new_w, new_h) else (box_w, box_h)


def detector_box_size(settings: Settings) -> tuple:
    """Return the (width, height) px box frames are fitted into: DET_SIZE x PRE_UPSCALE_FACTOR,
    in multiples of 32."""
    return tuple(int(round(side * settings.PRE_UPSCALE_FACTOR / 32)) * 32 for side in settings.DET_SIZE)


def letterbox_size(frame_hw: tuple, input_size: tuple) -> tuple:
    """Return the (width, height) a frame is resized to inside the detector input (insightface's rule)."""
    height, width = frame_hw
    input_w, input_h = input_size
    if height / width > input_h / input_w:
        return int(input_h / (height / width)), input_h
    return input_w, int(input_w * (height / width))


def letterbox(image: np.ndarray, input_size: tuple) -> tuple:
    """Return (detector blob [1,3,H,W] float32, scale) with the image resized into the top-left."""
    import cv2
    input_w, input_h = input_size
    height = image.shape[0]
    new_w, new_h = letterbox_size(image.shape[:2], input_size)
    canvas = np.zeros((input_h, input_w, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    blob = cv2.dnn.blobFromImage(canvas, 1.0 / _DET_STD, (input_w, input_h),
                                 (_DET_MEAN, _DET_MEAN, _DET_MEAN), swapRB=True)
    return blob, new_h / height


# Device-side preprocessing (issue #4, item 4): small ONNX graphs that do on the accelerator what
# letterbox() and align_face() + embed_faces' blob do on the CPU, so a frame crosses to the device
# once. They run as their own ONNX Runtime sessions (graph_session) beside the models. Every op has
# a CUDA kernel from onnxruntime-gpu 1.18 (GridSample-16 before that ran on the CPU). On the CPU
# they are 4-30x slower than cv2 (measured), so the CPU path keeps letterbox() and align_face().


def build_graph_model(name: str, nodes: list, inputs: list, outputs: list, constants: dict):
    """Return a checked onnx.ModelProto from nodes, (name, dtype, shape) in/outputs, constants."""
    import onnx
    from onnx import helper, numpy_helper
    types = {np.uint8: onnx.TensorProto.UINT8, np.int64: onnx.TensorProto.INT64,
             np.float32: onnx.TensorProto.FLOAT}
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(n, types[t], s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, types[t], s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    # Opset 17 (GridSample needs 16) with its IR version 8, so ONNX Runtime >= 1.17 loads them.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="find-people-in-videos")
    onnx.checker.check_model(model, full_check=True)
    return model


def graph_session(model, providers: list, options=None):
    """Return an ONNX Runtime session running the in-memory model on the given providers."""
    import onnxruntime as ort
    return ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                providers=providers, enable_fallback=0)


def letterbox_graph():
    """Return an ONNX model computing letterbox()'s blob [N,3,input_h,input_w] float32 for N frames.

    Inputs: frames uint8 [N,H,W,3] BGR; resized_hw int64 [2] (new_h, new_w from letterbox_size);
    input_hw int64 [2] (detector input height, width). Resizing happens in NCHW because the CUDA
    provider resizes linearly only over the two innermost axes; it is cv2.resize's INTER_LINEAR
    (half-pixel centres, edge pixels repeated, no antialiasing), rounded to uint8 levels as
    cv2.resize does before normalising. Bilinear values stay within [0, 255], so no Clip is needed.
    The uint8 frames are transposed before they are cast, so the transpose moves a quarter of
    the bytes (the graph runs on the CUDA provider; TensorRT would take uint8 only as an input).
    """
    from onnx import TensorProto, helper
    nodes = [
        helper.make_node("Transpose", ["frames"], ["frames_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["frames_nchw"], ["levels_in"], to=TensorProto.FLOAT),
        helper.make_node("Shape", ["levels_in"], ["batch_channels"], start=0, end=2),
        helper.make_node("Concat", ["batch_channels", "resized_hw"], ["sizes"], axis=0),
        helper.make_node("Resize", ["levels_in", "", "", "sizes"], ["resized"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Round", ["resized"], ["levels_bgr"]),
        helper.make_node("Gather", ["levels_bgr", "rgb_order"], ["levels_rgb"], axis=1),
        helper.make_node("Sub", ["input_hw", "resized_hw"], ["pad_hw"]),
        helper.make_node("Concat", ["no_padding", "pad_hw"], ["pads"], axis=0),
        helper.make_node("Pad", ["levels_rgb", "pads"], ["canvas"], mode="constant"),
        helper.make_node("Sub", ["canvas", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "inv_std"], ["blob"]),
    ]
    constants = {"rgb_order": np.array([2, 1, 0], np.int64), "no_padding": np.zeros(6, np.int64),
                 "mean": np.float32(_DET_MEAN), "inv_std": np.float32(1.0 / _DET_STD)}
    inputs = [("frames", np.uint8, ["N", "H", "W", 3]), ("resized_hw", np.int64, [2]),
              ("input_hw", np.int64, [2])]
    return build_graph_model("letterbox", nodes, inputs,
                             [("blob", np.float32, ["N", 3, "input_h", "input_w"])], constants)


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
    level_count, offset = len(strides), 0
    picked, scores, distances, kps = [], [], [], []
    for level in range(level_count):
        level_scores = outputs[level].reshape(-1)
        keep = np.nonzero(level_scores >= threshold)[0]
        picked.append(keep + offset)
        scores.append(level_scores[keep])
        distances.append(outputs[level_count + level].reshape(-1, 4)[keep])
        kps.append(outputs[2 * level_count + level].reshape(-1, 10)[keep])
        offset += level_scores.size
    return decode_candidates(np.concatenate(picked), np.concatenate(scores), np.concatenate(distances),
                             np.concatenate(kps), strides, anchors, input_size, scale)


@lru_cache(maxsize=64)
def anchor_table(strides: tuple, anchors: int, input_size: tuple) -> tuple:
    """Return (centres [A,2], stride of each [A]) of every anchor, levels concatenated in order."""
    centers = [anchor_centers(input_size[1] // s, input_size[0] // s, s, anchors) for s in strides]
    return np.concatenate(centers), np.concatenate([np.full(len(c), s, np.float32)
                                                   for c, s in zip(centers, strides)])


def decode_candidates(anchor_idx: np.ndarray, scores: np.ndarray, distances: np.ndarray,
                      kps: np.ndarray, strides: tuple, anchors: int, input_size: tuple,
                      scale: float) -> tuple:
    """Return decode_scrfd's (boxes, kps) from chosen anchors (indices into anchor_table, in
    increasing order) with their scores and raw box / keypoint distances: sorted by score, NMS."""
    centers, anchor_strides = anchor_table(strides, anchors, input_size)
    centers, stride = centers[anchor_idx], anchor_strides[anchor_idx][:, None]
    distances, kps = distances * stride, kps * stride
    boxes = np.hstack([centers - distances[:, :2], centers + distances[:, 2:]])
    points = kps.reshape(-1, 5, 2) + centers[:, None, :]
    order = np.argsort(-scores, kind="stable")
    boxes = np.hstack([boxes / scale, scores[:, None]])[order]
    points = (points / scale)[order]
    keep = nms(boxes.astype(np.float32), _NMS_IOU)
    return boxes[keep].astype(np.float32), points[keep].astype(np.float32)


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
    """Return [(boxes [N,5], kps [N,5,2])] per image, in that image's pixels.

    With a batch-capable detector, images of the same detector input size go through it in
    one call (at most BATCH_SIZE at a time); otherwise one at a time.
    """
    sizes = [detector_input_size(models, settings, image.shape[:2]) for image in images]
    results = [None] * len(images)
    for input_size, chunk in batches_by(sizes, settings.BATCH_SIZE if models.det_batched else 1):
        blobs, scales = zip(*(letterbox(images[i], input_size) for i in chunk))
        outputs = models.det_session.run(models.det_output_names,
                                         {models.det_input_name: np.concatenate(blobs)})
        for j, i in enumerate(chunk):
            results[i] = decode_scrfd([o[j] for o in outputs] if models.det_batched else outputs,
                                      models.det_strides, models.det_anchors, input_size,
                                      scales[j], settings.det_prob_threshold)
    return results


def batches_by(keys: list, size: int):
    """Yield (key, [indices]): the indices of equal keys, in order, at most size at a time."""
    groups = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    for key, members in groups.items():
        for start in range(0, len(members), size):
            yield key, members[start:start + size]


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


def face_matrix(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """Return the 2x3 float64 map from frame pixels to ArcFace crop pixels for one face's 5 kps."""
    return similarity_transform(kps.astype(np.float64), _ARCFACE_TEMPLATE_PX * size / 112)


def align_face(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """Return the size x size ArcFace crop for one face's 5 keypoints."""
    import cv2
    return cv2.warpAffine(image, face_matrix(kps, size), (size, size), borderValue=0.0)


def alignment_matrices(kps_list: list, size: int = 112) -> np.ndarray:
    """Return [F,2,3] float32 maps from crop pixels (u, v, 1) to frame pixels, for alignment_graph.

    These are the inverses of the matrices align_face gives cv2.warpAffine (which inverts them
    itself); pixel centres sit on integer coordinates in both spaces, as in OpenCV.
    """
    inverses = np.zeros((len(kps_list), 2, 3), np.float64)
    for face_idx, kps in enumerate(kps_list):
        matrix = face_matrix(np.asarray(kps), size)
        linear_inverse = np.linalg.inv(matrix[:, :2])
        inverses[face_idx] = np.hstack([linear_inverse, -linear_inverse @ matrix[:, 2:]])
    return inverses.astype(np.float32)


def alignment_grid_nodes(size: int) -> tuple:
    """Return (nodes, constants) turning `matrices` [F,2,3] into GridSample's `grid` [1,size,F*size,2].

    The F crops lie side by side in one sampling grid, so the frame is read once for all faces.
    GridSample with align_corners=0 puts pixel x's centre at (2x + 1) / W - 1.
    """
    from onnx import TensorProto, helper
    rows, cols = np.mgrid[:size, :size]
    crop_uv1 = np.stack([cols.ravel(), rows.ravel(), np.ones(size * size)], axis=1)
    nodes = [
        helper.make_node("Shape", ["frame"], ["frame_hw"], start=0, end=2),
        helper.make_node("Cast", ["frame_hw"], ["frame_hw_px"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["frame_hw_px", "xy_order"], ["frame_wh_px"], axis=0),
        helper.make_node("Div", ["two", "frame_wh_px"], ["grid_scale"]),
        helper.make_node("Div", ["one", "frame_wh_px"], ["half_pixel"]),
        helper.make_node("Sub", ["half_pixel", "one"], ["grid_offset"]),
        helper.make_node("Transpose", ["matrices"], ["matrices_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["crop_uv1", "matrices_t"], ["frame_xy"]),  # [F, size*size, 2]
        helper.make_node("Mul", ["frame_xy", "grid_scale"], ["scaled_xy"]),
        helper.make_node("Add", ["scaled_xy", "grid_offset"], ["grid_per_face"]),
        helper.make_node("Reshape", ["grid_per_face", "face_grid_shape"], ["face_grids"]),
        helper.make_node("Transpose", ["face_grids"], ["rows_faces_cols"], perm=[1, 0, 2, 3]),
        helper.make_node("Reshape", ["rows_faces_cols", "grid_shape"], ["grid"]),
    ]
    constants = {"crop_uv1": crop_uv1.astype(np.float32), "xy_order": np.array([1, 0], np.int64),
                 "two": np.float32(2.0), "one": np.float32(1.0),
                 "face_grid_shape": np.array([-1, size, size, 2], np.int64),
                 "grid_shape": np.array([1, size, -1, 2], np.int64)}
    return nodes, constants


def alignment_graph(mean: float, std: float, size: int = 112):
    """Return an ONNX model: one BGR frame, F crop-to-frame matrices -> recognizer blob [F,3,size,size].

    Inputs: frame uint8 [H,W,3] BGR; matrices float32 [F,2,3] from alignment_matrices.
    Output crops float32: cv2.dnn.blobFromImages(align_face crops, 1/std, (size, size),
    (mean,) * 3, swapRB=True), i.e. bilinear sampling with black outside the frame (warpAffine's
    borderValue=0), rounded to uint8 levels, RGB, then (x - mean) / std.
    """
    from onnx import TensorProto, helper
    grid_nodes, constants = alignment_grid_nodes(size)
    nodes = [
        helper.make_node("Cast", ["frame"], ["levels_hwc"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["levels_hwc"], ["levels_chw"], perm=[2, 0, 1]),
        helper.make_node("Unsqueeze", ["levels_chw", "batch_axis"], ["levels_in"]),
        *grid_nodes,
        helper.make_node("GridSample", ["levels_in", "grid"], ["sampled"], mode="bilinear",
                         padding_mode="zeros", align_corners=0),  # [1, 3, size, F*size]
        helper.make_node("Round", ["sampled"], ["levels_bgr"]),
        helper.make_node("Gather", ["levels_bgr", "rgb_order"], ["levels_rgb"], axis=1),
        helper.make_node("Sub", ["levels_rgb", "mean"], ["centred"]),
        helper.make_node("Mul", ["centred", "inv_std"], ["side_by_side"]),
        helper.make_node("Reshape", ["side_by_side", "split_faces"], ["channels_rows_faces"]),
        helper.make_node("Transpose", ["channels_rows_faces"], ["crops"], perm=[2, 0, 1, 3]),
    ]
    constants.update({"batch_axis": np.array([0], np.int64),
                      "rgb_order": np.array([2, 1, 0], np.int64),
                      "mean": np.float32(mean), "inv_std": np.float32(1.0 / std),
                      "split_faces": np.array([3, size, -1, size], np.int64)})
    inputs = [("frame", np.uint8, ["H", "W", 3]), ("matrices", np.float32, ["F", 2, 3])]
    return build_graph_model("alignment", nodes, inputs,
                             [("crops", np.float32, ["F", 3, size, size])], constants)


def candidates_graph(output_names: list, output_ranks: list, count: int):
    """Return an ONNX model that keeps, per image, the `count` anchors with the best scores of an
    SCRFD detector's outputs (its inputs are named like them; three groups of levels): scores
    [N,K], anchor indices [N,K] (into the levels concatenated, as anchor_table), box and
    keypoint distances [N,K,4] and [N,K,10]. K is count, or every anchor when there are fewer."""
    from onnx import helper
    level_count = len(output_names) // 3
    nodes, constants = [], {"k_most": np.array([count], np.int64), "flat": np.array([0, -1], np.int64),
                            "index_axis": np.array([2], np.int64)}
    for group, channels in enumerate((1, 4, 10)):
        for rank in (2, 3):  # [anchors, C] for a batch-1 detector, else [N, anchors, C]
            constants[f"shape_{channels}_{rank}"] = np.array([1 if rank == 2 else 0, -1, channels], np.int64)
        parts = []
        for level in range(level_count):
            i = group * level_count + level
            parts.append(f"level_{i}")
            nodes.append(helper.make_node("Reshape", [output_names[i], f"shape_{channels}_{output_ranks[i]}"],
                                          [parts[-1]]))
        nodes.append(helper.make_node("Concat", parts, [f"all_{channels}"], axis=1))
    nodes += [
        helper.make_node("Reshape", ["all_1", "flat"], ["all_scores"]),
        helper.make_node("Shape", ["all_scores"], ["anchor_count"], start=1, end=2),
        helper.make_node("Min", ["anchor_count", "k_most"], ["k"]),
        helper.make_node("TopK", ["all_scores", "k"], ["cand_scores", "cand_index"], axis=1),
        helper.make_node("Unsqueeze", ["cand_index", "index_axis"], ["index_3d"]),
        helper.make_node("Shape", ["index_3d"], ["batch_k"], start=0, end=2),
    ]
    for channels in (4, 10):
        constants[f"width_{channels}"] = np.array([channels], np.int64)
        nodes += [helper.make_node("Concat", ["batch_k", f"width_{channels}"], [f"gather_shape_{channels}"], axis=0),
                  helper.make_node("Expand", ["index_3d", f"gather_shape_{channels}"], [f"index_{channels}"]),
                  helper.make_node("GatherElements", [f"all_{channels}", f"index_{channels}"],
                                   [f"cand_{'boxes' if channels == 4 else 'kps'}"], axis=1)]
    widths = [c for c in (1, 4, 10) for _ in range(level_count)]
    inputs = [(name, np.float32, ["N", f"anchors_{i}", widths[i]][3 - output_ranks[i]:])
              for i, name in enumerate(output_names)]
    outputs = [("cand_scores", np.float32, ["N", "K"]), ("cand_index", np.int64, ["N", "K"]),
               ("cand_boxes", np.float32, ["N", "K", 4]), ("cand_kps", np.float32, ["N", "K", 10])]
    return build_graph_model("candidates", nodes, inputs, outputs, constants)


def embed_faces(models: FaceModels, crops: list, chunk_size: int) -> np.ndarray:
    """Return L2-normalised embeddings [len(crops), dim] computed chunk_size crops at a time."""
    import cv2
    chunks = []
    chunk_size = min(chunk_size, models.rec_max_chunk)
    for start in range(0, len(crops), chunk_size):
        blob = cv2.dnn.blobFromImages(crops[start:start + chunk_size], 1.0 / models.rec_std,
                                      (112, 112), (models.rec_mean,) * 3, swapRB=True)
        chunks.append(models.rec_session.run(None, {models.rec_input_name: blob})[0])
    return l2_normalised(np.concatenate(chunks))


def l2_normalised(embeddings: np.ndarray) -> np.ndarray:
    """Return float32 rows scaled to length 1 (a zero row stays zero)."""
    embeddings = embeddings.astype(np.float32)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class DeviceFrames:
    """A batch of frames of one size, uploaded once to the models' device (uint8 [N,H,W,3])."""

    value: object  # the OrtValue on the device
    host: np.ndarray | None  # on the CPU device, the array whose memory the value uses
    height: int
    width: int


@dataclass(frozen=True)
class DeviceLook:
    """One face to recognise: frame `index` of an uploaded batch and the face's 5 keypoints."""

    frames: DeviceFrames
    index: int
    kps: np.ndarray


class DeviceGraphs:
    """The letterbox and alignment graphs on the models' device, chained to the detector and the
    recognizer through ONNX Runtime IO binding: each frame is uploaded once, and only the
    detector's outputs and the embeddings come back. Thread-safe (a binding per call)."""

    def __init__(self, models: FaceModels, device_type: str, device_id: int, threads: int, say):
        self.models, self.device_type, self.device_id = models, device_type, device_id
        # On the CUDA provider, not TensorRT: fp16 would blur the alignment grid, and the
        # resize sizes change per video (TensorRT would need a profile per size).
        providers = ([("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
                     if device_type == "cuda" else ["CPUExecutionProvider"])
        self.letterbox = graph_session(letterbox_graph(), providers, session_options(threads))
        self.align = graph_session(alignment_graph(models.rec_mean, models.rec_std), providers,
                                   session_options(threads))
        ranks = [len(o.shape or []) for o in models.det_session.get_outputs()]
        if any(rank not in (2, 3) for rank in ranks):
            raise BadInput(f"{models.det_file}: detector outputs of rank {ranks}, not 2 or 3")
        self.candidates = graph_session(candidates_graph(models.det_output_names, ranks,
                                                         _DEVICE_CANDIDATES), providers, session_options(threads))
        ran_on = self.letterbox.get_providers()[0]
        if device_type == "cuda" and ran_on != "CUDAExecutionProvider":
            say(f"the resize and alignment graphs run on {ran_on}, not CUDA: frames go back and "
                f"forth ({provider_load_problem('CUDAExecutionProvider')})")
        say(f"frames go to the {device_type.upper()} once: resizing, face alignment, detector and "
            f"recognizer run there")

    def upload(self, images: list) -> DeviceFrames:
        """Return the frames (all of one size) copied to the device in one transfer."""
        import onnxruntime as ort
        host = np.ascontiguousarray(np.stack(images))
        value = ort.OrtValue.ortvalue_from_numpy(host, self.device_type, self.device_id)
        # On the CPU device the value uses the host array's memory, which must then live on.
        return DeviceFrames(value, host if self.device_type == "cpu" else None, host.shape[1], host.shape[2])

    def blob(self, frames: DeviceFrames, input_size: tuple):
        """Return the detector input [N,3,H,W] of uploaded frames, left on the device."""
        new_w, new_h = letterbox_size((frames.height, frames.width), input_size)
        binding = self.letterbox.io_binding()
        binding.bind_ortvalue_input("frames", frames.value)
        binding.bind_cpu_input("resized_hw", np.array([new_h, new_w], np.int64))
        binding.bind_cpu_input("input_hw", np.array([input_size[1], input_size[0]], np.int64))
        binding.bind_output("blob", self.device_type, self.device_id)
        self.letterbox.run_with_iobinding(binding)
        return binding.get_outputs()[0], new_h / frames.height

    def detector_outputs(self, blob, first: int, count: int, input_size: tuple) -> tuple:
        """Run the detector on blob[first:first+count] on the device; return (its outputs, left
        there; the best anchors of each image: host arrays scores, indices, box and keypoint
        distances, see candidates_graph)."""
        models = self.models
        binding = models.det_session.io_binding()
        shape = [count, 3, input_size[1], input_size[0]]
        offset_bytes = first * 3 * input_size[0] * input_size[1] * 4  # float32 per image
        binding.bind_input(models.det_input_name, self.device_type, self.device_id, np.float32,
                           shape, blob.data_ptr() + offset_bytes)
        for name in models.det_output_names:
            binding.bind_output(name, self.device_type, self.device_id)
        models.det_session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        choose = self.candidates.io_binding()
        for name, value in zip(models.det_output_names, outputs):
            choose.bind_ortvalue_input(name, value)
        for name in ("cand_scores", "cand_index", "cand_boxes", "cand_kps"):
            choose.bind_output(name, "cpu")
        self.candidates.run_with_iobinding(choose)
        return outputs, choose.copy_outputs_to_cpu()

    def embed(self, frames: DeviceFrames, index: int, matrices: np.ndarray) -> np.ndarray:
        """Return the recognizer's raw embeddings [F, dim] of faces of one uploaded frame."""
        models = self.models
        binding = self.align.io_binding()
        frame_bytes = frames.height * frames.width * 3
        binding.bind_input("frame", self.device_type, self.device_id, np.uint8,
                           [frames.height, frames.width, 3], frames.value.data_ptr() + index * frame_bytes)
        binding.bind_cpu_input("matrices", matrices)
        binding.bind_output("crops", self.device_type, self.device_id)
        self.align.run_with_iobinding(binding)
        recognize = models.rec_session.io_binding()
        recognize.bind_ortvalue_input(models.rec_input_name, binding.get_outputs()[0])
        recognize.bind_output(models.rec_session.get_outputs()[0].name, "cpu")
        models.rec_session.run_with_iobinding(recognize)
        return recognize.copy_outputs_to_cpu()[0]


def detect_on_device(models: FaceModels, images: list, settings: Settings) -> tuple:
    """Return ([(boxes, kps)] per image, [(DeviceFrames, index)] per image): frames of one size
    are uploaded together (BATCH_SIZE at most), resized and detected on the device, and only
    each frame's best anchors come back."""
    results, handles = [None] * len(images), [None] * len(images)
    for frame_hw, chunk in batches_by([image.shape[:2] for image in images], settings.BATCH_SIZE):
        input_size = detector_input_size(models, settings, frame_hw)
        frames = models.device.upload([images[i] for i in chunk])
        blob, scale = models.device.blob(frames, input_size)
        step = len(chunk) if models.det_batched else 1
        for first in range(0, len(chunk), step):
            count = min(step, len(chunk) - first)
            outputs, chosen = models.device.detector_outputs(blob, first, count, input_size)
            whole = []  # the batch's whole outputs, fetched at most once (see below)
            for j in range(count):
                results[chunk[first + j]] = decode_device_detections(
                    models, outputs, chosen, j, input_size, scale, settings.det_prob_threshold, whole)
        for j, i in enumerate(chunk):
            handles[i] = (frames, j)
    return results, handles


def decode_device_detections(models: FaceModels, outputs: list, chosen: list, j: int,
                             input_size: tuple, scale: float, threshold: float,
                             whole: list | None = None) -> tuple:
    """Return image j's (boxes, kps) from its best anchors; if every one of them passes the
    threshold (there may be more), from its whole outputs, fetched from the device into `whole`
    once for the batch."""
    scores, index, distances, kps = (part[j] for part in chosen)
    keep = scores >= threshold
    total = len(anchor_table(models.det_strides, models.det_anchors, input_size)[0])
    if keep.all() and len(scores) < total:
        whole = [] if whole is None else whole
        if not whole:
            whole += [o.numpy() for o in outputs]
        return decode_scrfd([o[j] for o in whole] if models.det_batched else whole,
                            models.det_strides, models.det_anchors, input_size, scale, threshold)
    order = np.argsort(index[keep], kind="stable")  # back to the levels' order, as decode_scrfd
    return decode_candidates(index[keep][order], scores[keep][order], distances[keep][order],
                             kps[keep][order], models.det_strides, models.det_anchors, input_size, scale)


def embed_looks(models: FaceModels, looks: list, chunk_size: int) -> np.ndarray:
    """Return L2-normalised embeddings [len(looks), dim] of aligned crops (CPU path) or of
    DeviceLooks (aligned and recognised on the device, one frame's faces per call)."""
    if not looks or not isinstance(looks[0], DeviceLook):
        return embed_faces(models, looks, chunk_size)
    rows = [None] * len(looks)
    groups = {}
    for i, look in enumerate(looks):
        groups.setdefault((id(look.frames), look.index), []).append(i)
    step = min(chunk_size, models.rec_max_chunk)
    for members in groups.values():
        first = looks[members[0]]
        for start in range(0, len(members), step):
            part = members[start:start + step]
            matrices = alignment_matrices([looks[i].kps for i in part])
            for i, row in zip(part, models.device.embed(first.frames, first.index, matrices)):
                rows[i] = row
    return l2_normalised(np.stack(rows))


def worker_main(name, settings, layout, videos, references, filled_q, free_q, result_q,
                stop_event, threads_per_session, gpu):
    """Load the models (on its GPU, if any), then run GPU_WORKER_THREADS threads over the
    filled ring slots."""
    def body(ring):
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # number GPUs like nvidia-smi
        models = load_face_models(settings, settings.PROVIDERS, threads_per_session, gpu,
                                  lambda text: result_q.put(("note", name, text)))
        result_q.put(("ready", name, models.providers, models.rec_max_chunk == 1))
        context = WorkerContext(settings, ring, videos, *reference_matrix(references),
                                [r.name for r in references], models, free_q, result_q)
        run_worker_threads(context, filled_q, stop_event)
        result_q.put(("stats", name, context.clock.report()))
    run_child(name, layout, result_q, (free_q,), body)


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
    free_q: object
    result_q: object
    clock: StageClock = field(default_factory=StageClock)
    sequencers: dict = field(default_factory=dict)  # video_idx -> FrameSequencer
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sequencer(self, video_idx: int) -> "FrameSequencer":
        """Return the video's sequencer, made on first use."""
        with self.lock:
            if video_idx not in self.sequencers:
                tracker = VideoTracker(self.videos[video_idx], self, self.result_q.put)
                self.sequencers[video_idx] = FrameSequencer(video_idx, tracker, self)
            return self.sequencers[video_idx]

    def forget(self, video_idx: int) -> None:
        """Drop a finished video's sequencer and tracker (and what they hold on the device)."""
        with self.lock:
            self.sequencers.pop(video_idx, None)


def run_worker_threads(context: WorkerContext, filled_q, stop_event) -> None:
    """Run the worker threads to the end; re-raise the first error any of them hit."""
    errors = []

    def thread_body():
        try:
            while (batch := take_batch(filled_q, stop_event, context.settings.BATCH_SIZE)):
                process_batch(context, batch)
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
    while len(batch) < batch_size and batch[-1] is not None:
        try:
            batch.append(filled_q.get_nowait())
        except queue.Empty:
            break
    return batch


def process_batch(context: WorkerContext, batch: list) -> None:
    """Detect the faces of a batch of frames (in parallel with other threads), then hand each
    frame, or a video's end marker, to its video's sequencer."""
    frames = [item for item in batch if item is not None and item[6] is not None]
    images = [slot_image(context.ring, slot, h, w) for (_, _, _, _, h, w, slot) in frames]
    started = time.perf_counter()
    if context.models.device is not None:
        detections, handles = detect_on_device(context.models, images, context.settings)
    else:
        detections, handles = detect_faces(context.models, images, context.settings), [None] * len(images)
    context.clock.add("detect", time.perf_counter() - started, len(frames))
    if context.settings.debug_det:
        for frame, image, found in zip(frames, images, detections):
            save_debug_detections(context, frame, image, found)
    thumbs = [thumbnail(image) for image in images]
    del images
    for frame, (boxes, kps), thumb, handle in zip(frames, detections, thumbs, handles):
        context.sequencer(frame[0]).submit(frame[1], (frame, boxes, kps, thumb, handle))
    for item in batch:
        if item is not None and item[6] is None:  # end of a video: (video_idx, frame count, ...)
            context.sequencer(item[0]).submit(item[1], None)


class FrameSequencer:
    """Feeds one video's detected frames to its tracker in decode order.

    Threads finish detection out of order; each deposits its frames and, if no other thread is
    feeding the tracker, feeds every frame that is next in order (then frees its ring slot).
    None at position n marks the end of the video after n frames.
    """

    def __init__(self, video_idx: int, tracker: VideoTracker, context: WorkerContext):
        self.video_idx, self.tracker, self.context = video_idx, tracker, context
        self.pending, self.next_seq = {}, 0
        self.pending_lock, self.feed_lock = threading.Lock(), threading.Lock()

    def submit(self, seq: int, item) -> None:
        """Deposit one frame (or the end marker) and feed the tracker whatever is next in order."""
        with self.pending_lock:
            self.pending[seq] = item
        while self.feed_lock.acquire(blocking=False):
            try:
                self.feed_ready()
            finally:
                self.feed_lock.release()
            with self.pending_lock:
                if self.next_seq not in self.pending:
                    return

    def feed_ready(self) -> None:
        """Feed consecutive ready frames to the tracker, reporting each one as it is done."""
        while True:
            with self.pending_lock:
                if self.next_seq not in self.pending:
                    return
                item = self.pending.pop(self.next_seq)
            self.next_seq += 1
            if item is None:
                self.tracker.finish()
                self.context.forget(self.video_idx)
                self.context.result_q.put(("video_tracked", self.video_idx))
                return
            self.feed_frame(*item)
            self.context.result_q.put(("progress", self.video_idx, 1))

    def feed_frame(self, frame: tuple, boxes: np.ndarray, kps: np.ndarray, thumb: np.ndarray,
                   handle: tuple | None = None) -> None:
        """Run the tracker on one frame, then return its slot to the decoders (a copy of the
        frame on the models' device, handle, may live on in a track's last look)."""
        _, seq, frame_idx, time_s, height, width, slot = frame
        try:
            image = slot_image(self.context.ring, slot, height, width)
            started = time.perf_counter()
            self.tracker.step(seq, frame_idx, time_s, image, boxes, kps, thumb, handle)
            self.context.clock.add("track", time.perf_counter() - started)
            del image
        finally:
            self.context.free_q.put(slot)


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


def save_debug_detections(context: WorkerContext, frame: tuple, image: np.ndarray, found) -> None:
    """Write the frame with every raw detection (box, score, keypoints) before recognition."""
    import cv2
    canvas = np.array(image)  # a copy: the frame in the ring is still to be recognised
    for box, kps in zip(*found):
        x1, y1, x2, y2 = (int(v) for v in box[:4])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), (0, 0, 255), 1)
        cv2.putText(canvas, f"{box[4]:.2f}", (x1, max(10, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, (0, 0, 255), 1, cv2.LINE_AA)
        for x, y in kps:
            cv2.circle(canvas, (int(x), int(y)), 1, (0, 255, 0), 2)
    info = context.videos[frame[0]]
    path = Path(context.settings.debug_det_dir) / info.output_name / f"frame_{frame[2]:07d}.jpg"
    write_bytes_atomic(path, cv2.imencode(".jpg", canvas)[1].tobytes(), flush=False)


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


def agreeing_person(distances: np.ndarray, threshold: float, margin: float) -> int | None:
    """Return the person one recognition names: closest within threshold, beating the next by margin."""
    order = np.argsort(distances, kind="stable")
    best = float(distances[order[0]])
    second = float(distances[order[1]]) if len(order) > 1 else math.inf
    if best <= threshold and second - best >= margin:
        return int(order[0])
    return None


def evaluate_evidence(distances: np.ndarray, threshold: float, margin: float, min_hits: int) -> tuple:
    """Return (person index or None, best distance to them, hits) for a track's recognitions.

    distances is [recognitions, people]. A recognition agrees with a person when that person is
    within threshold and ahead of the second best by margin. The track is named when one person
    has at least min_hits agreeing recognitions and more than all other people together.
    """
    votes = [agreeing_person(row, threshold, margin) for row in distances]
    counts = {p: votes.count(p) for p in set(votes) if p is not None}
    if not counts:
        return None, math.inf, 0
    person = max(counts, key=lambda p: (counts[p], -float(distances[:, p].min())))
    hits = counts[person]
    if hits < min_hits or hits <= sum(counts.values()) - hits:
        return None, float(distances[:, person].min()), hits
    return person, float(distances[:, person].min()), hits


def vouching_recognitions(track, person: int, settings: Settings) -> list:
    """Return, per recognition of a track named `person`, whether it vouches for the name.

    A recognition vouches when it agrees with the person, or when it agrees with nobody (a poor
    look: profile, blur) but its embedding is as close to one of the agreeing recognitions as
    the same face's embeddings are (cosine >= _SAME_FACE_SIMILARITY; different people stay
    below 0.3 with the shared models). A look at somebody else never vouches.
    """
    votes = [agreeing_person(row, settings.CUSTOM_THRESHOLD, settings.MATCH_MARGIN)
             for row in track.rec_distances]
    agreeing = np.array([e for e, v in zip(track.rec_embeddings, votes) if v == person])
    vouches = []
    for embedding, vote in zip(track.rec_embeddings, votes):
        same_face = len(agreeing) and float((agreeing @ embedding).max()) >= _SAME_FACE_SIMILARITY
        vouches.append(vote == person or (vote is None and bool(same_face)))
    return vouches


def sighting_flags(rec_at: list, confirms: list, tail: int) -> list:
    """Return, per frame of a named track, whether it counts as a sighting of that person.

    rec_at holds, per frame, the index of the recognition made there (or None); confirms says
    per recognition whether it vouches for the track's name. A frame counts when the
    recognitions on both sides of it confirm (one at the frame itself suffices), or, before the
    first and after the last recognition, when that one confirms and the frame is at most
    `tail` frames away. So a face that turns into someone else between two recognitions (same
    place, no gap) is never named beyond the last recognition that really saw the person.
    """
    count = len(rec_at)
    previous, following = [None] * count, [None] * count  # nearest recognition position each side
    last = None
    for i, rec in enumerate(rec_at):
        last = i if rec is not None else last
        previous[i] = last
    last = None
    for i in range(count - 1, -1, -1):
        last = i if rec_at[i] is not None else last
        following[i] = last
    flags = []
    for i in range(count):
        before, after = previous[i], following[i]
        ok_before = before is not None and bool(confirms[rec_at[before]])
        ok_after = after is not None and bool(confirms[rec_at[after]])
        if before is not None and after is not None:
            flags.append(ok_before and ok_after)  # at a recognition itself both sides are it
        elif before is not None:
            flags.append(ok_before and i - before <= tail)
        else:
            flags.append(ok_after and after - i <= tail)
    return flags


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the [len(a), len(b)] intersection-over-union of x1,y1,x2,y2 boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def link_detections(track_boxes: np.ndarray, det_boxes: np.ndarray, min_iou: float) -> tuple:
    """Return ({det: track} greedy by overlap, set of ambiguous det indices).

    track_boxes are where each track is expected now (last box moved by its last motion). A
    detection is ambiguous when its second-best track overlaps it at least half as much as the
    best (or a track overlaps two detections so): faces crossing, where overlap alone cannot
    tell who is who. Neighbours in a crowd that merely touch are not ambiguous.
    """
    iou = box_iou(track_boxes, det_boxes)
    ambiguous = set()
    for matrix, axis in ((iou, 0), (iou.T, 1)):  # per detection, then per track
        if matrix.shape[0] < 2:
            continue
        top_two = -np.sort(-matrix, axis=0)[:2]
        close = (top_two[1] > _TOUCH_IOU) & (top_two[1] >= 0.5 * top_two[0])
        rows = np.nonzero(close)[0]
        ambiguous |= ({int(d) for d in rows} if axis == 0 else
                      {int(d) for t in rows for d in np.nonzero(iou[t] > _TOUCH_IOU)[0]})
    links = {}
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        t, d = divmod(int(flat), iou.shape[1])
        if iou[t, d] < min_iou:
            break
        if d not in links and t not in links.values():
            links[d] = t
    return links, ambiguous


def face_size_px(box) -> float:
    """Return a face's size: the shorter side of its box, in px."""
    return float(min(box[2] - box[0], box[3] - box[1]))


def frontal_score(kps: np.ndarray) -> float:
    """Return 1 for a frontal face, 0 for a profile: how centred the nose is between the eyes."""
    eye_mid_x = (kps[0, 0] + kps[1, 0]) / 2
    half_span = max(abs(kps[1, 0] - kps[0, 0]) / 2, 1e-6)
    return float(max(0.0, 1.0 - abs(kps[2, 0] - eye_mid_x) / half_span))


def thumbnail(image: np.ndarray) -> np.ndarray:
    """Return a 64x36 grey thumbnail (float32) for shot-cut detection."""
    import cv2
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    return cv2.resize(grey, (64, 36), interpolation=cv2.INTER_AREA).astype(np.float32)


def face_signature(image: np.ndarray, box) -> np.ndarray:
    """Return the face's box as a 16x16 grey patch, normalised to mean 0 and deviation 1."""
    import cv2
    height, width = image.shape[:2]
    x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
    x2, y2 = min(width, int(math.ceil(box[2]))), min(height, int(math.ceil(box[3])))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return np.zeros((16, 16), np.float32)
    grey = cv2.cvtColor(np.ascontiguousarray(image[y1:y2, x1:x2]), cv2.COLOR_BGR2GRAY)
    patch = cv2.resize(grey, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32)
    return (patch - patch.mean()) / (patch.std() + 1e-3)


def face_changed(before: np.ndarray | None, now: np.ndarray) -> bool:
    """Return True when a track's face changed abruptly since the last frame (someone else?)."""
    return before is not None and float(np.abs(now - before).mean()) > _FACE_CHANGE_LIMIT


def is_shot_cut(previous: np.ndarray | None, current: np.ndarray) -> bool:
    """Return True when the picture changed as much as at a cut between shots."""
    return previous is not None and float(np.abs(current - previous).mean()) > _SHOT_CUT_MAD


@dataclass(eq=False)  # identity: a track is itself, whatever its contents
class Track:
    """One face followed across consecutive processed frames of one video."""

    track_id: int
    box: np.ndarray  # last x1,y1,x2,y2
    last_time_s: float
    last_seq: int  # processed-frame number it was last seen in
    motion: np.ndarray = field(default_factory=lambda: np.zeros(4, np.float32))  # box change per frame
    frames: list = field(default_factory=list)  # [frame_idx, time_s, bbox, det_score, rec index]
    rec_distances: list = field(default_factory=list)  # one [people] row per recognition
    rec_frames: list = field(default_factory=list)  # (frame_idx, time_s) per recognition
    rec_embeddings: list = field(default_factory=list)  # one embedding per recognition
    embedding: np.ndarray | None = None  # of the latest recognition
    last_rec_seq: int = -(10 ** 9)
    best_size_px: float = 0.0
    best_frontal: float = 0.0
    name_idx: int | None = None  # named from the evidence so far
    agreed: bool = False  # some recognition agreed with somebody: the track may be named
    signature: np.ndarray | None = None  # the face's grey patch in its last frame (face_signature)
    last_look: object = None  # its aligned crop in its last frame, while it may be named
    pending: list = field(default_factory=list)  # (person, distance, path, jpeg) until named
    written: list = field(default_factory=list)  # (person, path) snapshots on disk


def recognition_interval(track: Track, settings: Settings, max_interval: int | None = None) -> int:
    """Return the processed frames until a track's next scheduled recognition.

    The interval doubles with each recognition, up to 8x: a face seen several times (named, or
    clearly a stranger) needs little re-checking unless it grows or turns to the camera. It is
    capped at max_interval (about a second of video: see VideoTracker), the longest stretch a
    named track's frames may go unverified.
    """
    interval = settings.RECOGNITION_INTERVAL * 2 ** min(max(len(track.rec_distances) - 1, 0), 3)
    return interval if max_interval is None else min(interval, max_interval)


def recognition_due(track: Track | None, size_px: float, frontal: float, det_score: float,
                    seq: int, ambiguous: bool, settings: Settings,
                    max_interval: int | None = None) -> bool:
    """Return True when this face of this track should go through the recognizer now."""
    if size_px < settings.MIN_FACE_SIZE:
        return False
    if track is None:  # a doubtful new detection waits one frame: many never come back
        return det_score >= _SURE_FACE_SCORE
    if ambiguous or not track.rec_distances:
        return True
    return (seq - track.last_rec_seq >= recognition_interval(track, settings, max_interval)
            or size_px >= track.best_size_px * _GROWTH_FOR_RECHECK
            or frontal >= track.best_frontal + _FRONTAL_GAIN_FOR_RECHECK)


class VideoTracker:
    """Follows the faces of one video frame by frame (in order) and names each track.

    It decides which faces go to the recognizer, writes snapshots of recognised faces, and calls
    emit(("track", video_idx, summary)) when a track ends. Not thread-safe: FrameSequencer
    serialises the calls.
    """

    def __init__(self, info: VideoInfo, context, emit):
        self.info, self.context, self.emit = info, context, emit
        self.settings = context.settings
        # Recognise a track at least about once a second of video (see recognition_interval).
        per_second = info.fps / self.settings.FRAME_INTERVAL if info.fps > 0 else 1.0
        self.max_interval = max(self.settings.RECOGNITION_INTERVAL,
                                int(round(per_second * _MAX_UNVERIFIED_S)))
        self.active: list = []
        self.previous_thumb = None
        self.next_id = 0
        self.frame_handle = None  # the current frame on the models' device (see step)

    def step(self, seq: int, frame_idx: int, time_s: float, image: np.ndarray, boxes: np.ndarray,
             kps: np.ndarray, thumb: np.ndarray, handle: tuple | None = None) -> None:
        """Advance every track by one processed frame (handle: its copy on the models' device)."""
        self.frame_handle = handle
        if is_shot_cut(self.previous_thumb, thumb):
            self.end_tracks(list(self.active))
        self.previous_thumb = thumb
        self.end_tracks([t for t in self.active if time_s - t.last_time_s > self.settings.TRACK_MAX_GAP])
        expected = [t.box + t.motion * (seq - t.last_seq) for t in self.active]
        links, ambiguous = link_detections(np.array(expected).reshape(-1, 4), boxes[:, :4],
                                           _LINK_MIN_IOU)
        owners = {d: self.active[t] for d, t in links.items()}
        signatures = [face_signature(image, box) for box in boxes]
        # A face back after a gap at the same place, or one that changed abruptly, may be someone
        # else: check it like a crossing.
        ambiguous |= {d for d, t in owners.items()
                      if t.last_seq != seq - 1 or face_changed(t.signature, signatures[d])}
        due = [d for d in range(len(boxes))
               if recognition_due(owners.get(d), face_size_px(boxes[d]), frontal_score(kps[d]),
                                  float(boxes[d, 4]), seq, d in ambiguous, self.settings,
                                  self.max_interval)]
        embeddings, distances = self.recognise(image, kps, due)
        for d in range(len(boxes)):
            rec = due.index(d) if d in due else None
            track = owners.get(d)
            if rec is not None:
                track = self.check_identity(track, embeddings[rec], distances[rec],
                                            set(owners.values()), time_s, seq)
            if track is None:
                track = self.new_track(boxes[d], time_s, seq)
            track.signature = signatures[d]
            self.extend(track, seq, frame_idx, time_s, image, boxes[d], kps[d],
                        None if rec is None else (embeddings[rec], distances[rec]))
            track.last_look = None  # kept for a last recognition when the track ends
            if rec is None and face_size_px(boxes[d]) >= self.settings.MIN_FACE_SIZE \
                    and track.agreed:
                track.last_look = self.look(image, kps, d)

    def recognise(self, image: np.ndarray, kps: np.ndarray, due: list) -> tuple:
        """Return (embeddings, distances [faces, people]) of the faces due for recognition."""
        if not due:
            return None, None
        return self.recognise_looks([self.look(image, kps, d) for d in due])

    def look(self, image: np.ndarray, kps: np.ndarray, d: int):
        """Return what the recognizer needs of face d: its aligned crop, or with frames on the
        models' device, where it is there (aligned when recognised)."""
        if self.frame_handle is not None:
            return DeviceLook(*self.frame_handle, kps[d].copy())
        return align_face(image, kps[d])

    def recognise_looks(self, looks: list) -> tuple:
        """Return (embeddings, distances [faces, people]) of looks (see look)."""
        context = self.context
        started = time.perf_counter()
        embeddings = embed_looks(context.models, looks, self.settings.REC_CHUNK_SIZE)
        context.clock.add("track.recognise", time.perf_counter() - started, len(looks))
        return embeddings, person_distances(embeddings, context.ref_embeddings,
                                            context.ref_owners, len(context.people))

    def check_identity(self, track: Track | None, embedding: np.ndarray, distances: np.ndarray,
                       taken: set, time_s: float, seq: int) -> Track | None:
        """Return the track this recognised face continues: its own unless the face changed
        (then a new one), or for a new face a track unseen in this frame with the same face."""
        if track is not None:
            settings = self.settings
            now = agreeing_person(distances, settings.CUSTOM_THRESHOLD, settings.MATCH_MARGIN)
            renamed = track.name_idx is not None and now is not None and now != track.name_idx
            changed = track.embedding is not None and float(embedding @ track.embedding) < _SPLIT_MAX_SIMILARITY
            if not (renamed or changed):
                return track
            self.end_tracks([track])  # boxes crossed or swapped, or clearly someone else now
            return None
        unseen = [t for t in self.active if t not in taken and t.embedding is not None
                  and t.last_time_s < time_s]
        if unseen:
            best = max(unseen, key=lambda t: float(embedding @ t.embedding))
            if float(embedding @ best.embedding) >= _RELINK_MIN_SIMILARITY:
                return best
        return None

    def new_track(self, box: np.ndarray, time_s: float, seq: int) -> Track:
        """Start a track at this face."""
        track = Track(self.next_id, box[:4].copy(), time_s, seq)
        self.next_id += 1
        self.active.append(track)
        return track

    def extend(self, track: Track, seq: int, frame_idx: int, time_s: float, image: np.ndarray,
               box: np.ndarray, kps: np.ndarray, recognition) -> None:
        """Add this frame's face (and its recognition, if any) to the track."""
        if track.frames and seq > track.last_seq:
            track.motion = (box[:4] - track.box) / (seq - track.last_seq)
        track.box, track.last_time_s, track.last_seq = box[:4].copy(), time_s, seq
        rec_index = None
        if recognition is not None:
            embedding, distances = recognition
            rec_index = len(track.rec_distances)
            track.rec_distances.append(distances)
            track.rec_frames.append((frame_idx, time_s))
            track.rec_embeddings.append(embedding)
            track.embedding, track.last_rec_seq = embedding, seq
            track.best_size_px = max(track.best_size_px, face_size_px(box))
            track.best_frontal = max(track.best_frontal, frontal_score(kps))
        track.frames.append([frame_idx, time_s, [round(float(v), 1) for v in box[:4]],
                             round(float(box[4]), 4), rec_index])
        if recognition is not None:
            self.after_recognition(track, frame_idx, time_s, image, box, distances)


    def after_recognition(self, track: Track, frame_idx: int, time_s: float, image: np.ndarray,
                          box: np.ndarray, distances: np.ndarray) -> None:
        """Name the track once the evidence allows; keep or write a snapshot of this face."""
        settings = self.settings
        person = agreeing_person(distances, settings.CUSTOM_THRESHOLD, settings.MATCH_MARGIN)
        if track.name_idx is None:
            track.name_idx = evaluate_evidence(np.array(track.rec_distances), settings.CUSTOM_THRESHOLD,
                                               settings.MATCH_MARGIN, settings.MIN_TRACK_HITS)[0]
        if person is None:
            return
        track.agreed = True
        path = snapshot_path(Path(settings.OUTPUT_DIR), self.info, frame_idx, time_s,
                             self.context.people[person])
        started = time.perf_counter()
        jpeg = encode_snapshot(image, box, self.context.people[person], float(distances[person]),
                               person, settings)
        self.context.clock.add("track.snapshot", time.perf_counter() - started)
        track.pending.append((person, float(distances[person]), path, jpeg))
        track.pending.sort(key=lambda item: item[1])
        del track.pending[_MAX_PENDING_SNAPSHOTS:]
        if track.name_idx is not None:
            self.write_snapshots(track, track.name_idx)

    def write_snapshots(self, track: Track, person: int) -> None:
        """Write the track's kept snapshots of this person (the others stay kept, in case later
        evidence names the track differently)."""
        for who, _, path, jpeg in track.pending:
            if who == person:  # not flushed: a disk flush per face would stall the tracker, and a
                write_bytes_atomic(path, jpeg, flush=False)  # lost one shows in video.json's sizes
                track.written.append((who, path))
        track.pending = [item for item in track.pending if item[0] != person]

    def last_recognition(self, track: Track) -> None:
        """Recognise a track that may be named once more, on its last frame, if that frame was not
        recognised: its last frames are then bracketed by a real look like all the others."""
        if track.last_look is None or track.frames[-1][4] is not None:
            return
        embeddings, distances = self.recognise_looks([track.last_look])
        track.frames[-1][4] = len(track.rec_distances)
        track.rec_distances.append(distances[0])
        track.rec_embeddings.append(embeddings[0])
        track.rec_frames.append((track.frames[-1][0], track.frames[-1][1]))
        track.last_look = None

    def end_tracks(self, tracks: list) -> None:
        """End these tracks: decide each name from all its evidence and report it."""
        settings = self.settings
        for track in tracks:
            self.active.remove(track)
            self.last_recognition(track)
            person, best, hits = (None, math.inf, 0) if not track.rec_distances else evaluate_evidence(
                np.array(track.rec_distances), settings.CUSTOM_THRESHOLD, settings.MATCH_MARGIN,
                settings.MIN_TRACK_HITS)
            for who, path in track.written:
                if who != person:  # later evidence overruled the early name
                    path.unlink(missing_ok=True)
            if person is not None:
                self.write_snapshots(track, person)
            if person is not None or settings.debug_rec:
                self.emit(("track", self.info.idx, self.summary(track, person, best, hits)))

    def summary(self, track: Track, person: int | None, best: float, hits: int) -> dict:
        """Return what the parent needs of an ended track: for a named one, the frames that
        count as sightings (see sighting_flags)."""
        people, settings = self.context.people, self.settings
        frames = [[f, t, box, score, None] for f, t, box, score, _ in track.frames]  # unnamed
        if person is not None:
            confirms = vouching_recognitions(track, person, settings)
            # Only a doubtful first frame (recognised one frame later) precedes the first look,
            # and every track that may be named gets a look at its last frame (last_recognition).
            flags = sighting_flags([f[4] for f in track.frames], confirms, 1)
            frames = [[f, t, box, score, None if rec is None
                       else round(float(track.rec_distances[rec][person]), 4)]
                      for (f, t, box, score, rec), counted in zip(track.frames, flags) if counted]
        summary = {"track": track.track_id, "name": None if person is None else people[person],
                   "best_distance": round(best, 4), "hits": hits,
                   "recognitions": len(track.rec_distances), "frames": frames,
                   "snapshots": [path.name for who, path in track.written if who == person]}
        if self.settings.debug_rec:
            summary["debug_rec"] = [[f, t, {p: round(float(d), 4) for p, d in zip(people, row)}]
                                    for (f, t), row in zip(track.rec_frames, track.rec_distances)]
        return summary

    def finish(self) -> None:
        """End every track at the end of the video, and let go of its last frame on the device."""
        self.end_tracks(list(self.active))
        self.frame_handle = None


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
    return f"{time_range.start_s:.2f}s_{safe_file_name(time_range.name)}_d{time_range.best_distance:.3f}.mp4"


def container_seek_s(time_s: float, info: VideoInfo) -> float:
    """Return ffmpeg's input -ss for a frame time: frame clock -> container clock."""
    return max(0.0, time_s + info.video_start_offset_s)


def build_clip_command(ffmpeg: str, info: VideoInfo, time_range: TimeRange, part_path: Path,
                       mode: str = "accurate", clip_start_s: float | None = None) -> list:
    """Return the ffmpeg argument list that cuts one range.

    accurate: re-encoded (H.264/AAC), starting exactly at the range's first frame.
    fast: stream copy from clip_start_s, the keyframe at or before the range's start (a copy can
    only start at a keyframe); seeking just past it makes ffmpeg start there.
    """
    common = [ffmpeg, "-nostdin", "-y", "-v", "error"]
    maps = ["-map", f"0:v:{info.video_stream_idx}", "-map", "0:a:0?"]
    if mode == "fast":
        seek_s = container_seek_s(clip_start_s, info) + _KEYFRAME_SEEK_PAST_S
        return [*common, "-ss", f"{seek_s:.3f}", "-i", info.path,
                "-t", f"{time_range.end_s - clip_start_s - _KEYFRAME_SEEK_PAST_S:.3f}", *maps,
                "-c", "copy", "-avoid_negative_ts", "make_zero", "-movflags", "+faststart",
                "-f", "mp4", str(part_path)]
    return [*common, "-ss", f"{container_seek_s(time_range.start_s, info):.3f}", "-i", info.path,
            "-t", f"{time_range.end_s - time_range.start_s:.3f}", *maps,
            "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-b:a", "160k", "-movflags", "+faststart", "-f", "mp4", str(part_path)]


def keyframe_before(keyframes_s: list, time_s: float) -> float:
    """Return the last keyframe time at or before time_s (0 when there is none)."""
    earlier = [k for k in keyframes_s if k <= time_s + 1e-6]
    return max(earlier) if earlier else 0.0


def own_process_group() -> dict:
    """Return the Popen arguments that start a command in its own process group, so a Ctrl-C in
    the terminal (SIGINT to the whole group) reaches only main.py, which then stops it."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def run_checked(cmd: list, what: str, timeout_s: float = 600, stop_event=None) -> None:
    """Run a command; raise ClipError with the exit code and stderr's last lines on failure,
    after timeout_s, or "stopped" once stop_event is set (the command is killed then)."""
    import tempfile
    stop_event = stop_event or threading.Event()  # never set: only the timeout ends it early
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty command cannot block
        try:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=stderr, **own_process_group())
        except OSError as error:
            raise ClipError(f"{what}: cannot run {cmd[0]} ({error})") from None
        deadline = time.monotonic() + timeout_s
        while process.poll() is None:
            if time.monotonic() > deadline or stop_event.is_set():
                process.kill()
                process.wait()
                reason = "stopped" if stop_event.is_set() else \
                    f"ffmpeg took longer than {timeout_s:.0f} s"
                raise ClipError(f"{what}: {reason}")
            time.sleep(0.05)
        if process.returncode != 0:
            if stop_event.is_set():  # it failed because the run is stopping: nothing else to say
                raise ClipError(f"{what}: stopped")
            stderr.seek(0)
            tail = "\n".join(stderr.read().decode(errors="replace").strip().splitlines()[-5:])
            raise ClipError(f"{what}: ffmpeg exit code {process.returncode}\n{tail}")


def cut_clip(ffmpeg: str, info: VideoInfo, time_range: TimeRange, clip_dir: Path,
             mode: str = "accurate", clip_start_s: float | None = None, stop_event=None) -> Path:
    """Write one clip via a .part file renamed into place; return its path."""
    clip_dir.mkdir(parents=True, exist_ok=True)
    final = clip_dir / clip_file_name(time_range)
    part = final.with_name(final.name + ".part")
    what = f"{Path(info.path).name} {time_range.start_s:.2f}-{time_range.end_s:.2f}s"
    try:
        run_checked(build_clip_command(ffmpeg, info, time_range, part, mode, clip_start_s), what,
                    stop_event=stop_event)
        fsync_file(part)  # on the disk before its name says it is finished
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


def video_done(result: VideoResult) -> bool:
    """Return True once a video is searched to its end and every range has its clip entry (a
    clip, or None after an error); a reused video is done."""
    return result.reused is not None or (result.finished and len(result.clips) == len(result.ranges))


def video_status(result: VideoResult) -> str:
    """Return "ok" (done, see video_done, and no errors), "incomplete" (some frames processed)
    or "failed"."""
    if video_done(result) and not result.errors:
        return "ok"
    return "incomplete" if result.processed_frame_count else "failed"


def video_report(result: VideoResult, output_dir: Path, frame_interval: int) -> dict:
    """Return the results.json entry of one video (a reused one as it was saved)."""
    if result.reused is not None:
        return result.reused
    info = result.info
    return {
        "file": info.path, "output_folder": info.output_name, "status": video_status(result),
        "errors": result.errors, "fps": round(info.fps, 6), "frame_count": info.frame_count,
        "duration_s": round(info.duration_s, 6), "width": info.width, "height": info.height,
        "video_start_offset_s": round(info.video_start_offset_s, 6),
        "frame_interval": frame_interval, "processed_frame_count": result.processed_frame_count,
        "detections": sorted(result.detections, key=lambda d: (d["frame"], d["name"])),
        "ranges": [range_report(r, *(result.clips[i] if i < len(result.clips) else (None, None)),
                                output_dir) for i, r in enumerate(result.ranges)],
    }


def range_report(time_range: TimeRange, clip: str | None, clip_start_s: float | None,
                 output_dir: Path) -> dict:
    """Return the results.json entry of one range; clip_start is where its clip really starts
    (earlier than start in fast mode: the keyframe before)."""
    return {
        "name": time_range.name, "start": round(time_range.start_s, 3),
        "end": round(time_range.end_s, 3), "start_hms": format_hms(time_range.start_s),
        "end_hms": format_hms(time_range.end_s),
        "first_sighting": round(time_range.first_sighting_s, 3),
        "last_sighting": round(time_range.last_sighting_s, 3),
        "best_distance": round(time_range.best_distance, 4),
        "best_similarity": round(1 - time_range.best_distance, 4),
        "clip": Path(os.path.relpath(clip, output_dir)).as_posix() if clip else None,
        "clip_start": None if clip is None else round(clip_start_s, 3),
        "clip_starts_early_by": None if clip is None else round(time_range.start_s - clip_start_s, 3),
    }


def write_json_atomic(path: Path, data) -> None:
    """Write JSON through a temporary file and os.replace, so no half-written file is left."""
    write_bytes_atomic(path, json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8"))


def write_reports(run: dict, results: list, output_dir: Path, settings: Settings,
                  thumbnails: dict | None = None) -> None:
    """Write results.json, results.csv (one row per range) and index.html for all found so far."""
    videos = [video_report(r, output_dir, settings.FRAME_INTERVAL) for r in results]
    report = {**run, "videos": videos}
    write_json_atomic(output_dir / "results.json", report)
    write_html_report(report, output_dir, thumbnails or {})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["video", "name", "start_s", "end_s", "start_hms", "end_hms",
                     "best_distance", "best_similarity", "clip", "clip_start_s"])
    for entry in videos:
        for r in entry["ranges"]:
            writer.writerow([entry["file"], r["name"], r["start"], r["end"], r["start_hms"],
                             r["end_hms"], r["best_distance"], r["best_similarity"], r["clip"] or "",
                             "" if r["clip_start"] is None else r["clip_start"]])
    write_bytes_atomic(output_dir / "results.csv", buffer.getvalue().encode("utf-8"))


_HTML_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;background:#f6f6f6}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 10px} .meta{color:#666}
.people{display:flex;flex-wrap:wrap;gap:14px}
.person{background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px 12px;width:360px}
.person .pics img{height:120px;border-radius:4px;margin:6px 6px 0 0;vertical-align:top}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px}
.video{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 14px;margin:14px 0}
.row{display:flex;align-items:center;margin:6px 0} .label{width:190px;flex:none;overflow:hidden}
.bar{position:relative;flex:1;height:22px;background:#e6e6e6;border-radius:4px}
.seg{position:absolute;top:0;bottom:0;min-width:3px;border-radius:3px}
.axis{display:flex;justify-content:space-between;color:#777;font-size:12px;margin-left:190px}
table{border-collapse:collapse;margin-top:8px} td,th{padding:3px 10px 3px 0;text-align:left;
border-bottom:1px solid #eee;vertical-align:top} .note{color:#a60}
"""


def link(relative_path: str) -> str:
    """Return a relative path as an href/src value (percent-encoded, so '#', '?' or spaces in a
    video's name cannot break the link)."""
    import html
    from urllib.parse import quote
    return html.escape(quote(relative_path))


def color_hex(person_idx: int) -> str:
    """Return a person's colour as #rrggbb (the snapshots' BGR colour)."""
    blue, green, red = person_color(person_idx)
    return f"#{red:02x}{green:02x}{blue:02x}"


def reference_thumbnail(photo: str, height_px: int = 120) -> str:
    """Return a reference photo as a small JPEG data URI (the report must work offline, alone)."""
    import base64
    import cv2
    try:
        image = read_image(Path(photo))
    except BadInput:
        return ""
    scale = height_px / image.shape[0]
    small = cv2.resize(image, (max(1, int(image.shape[1] * scale)), height_px),
                       interpolation=cv2.INTER_AREA)
    data = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def snapshot_links(video: dict, output_dir: Path) -> dict:
    """Return {person: [(time_s, distance, relative snapshot path)]} for snapshots on disk."""
    links = {}
    folder = output_dir / video["output_folder"]
    for d in video["detections"]:
        if d.get("recognized"):
            name = f"frame_{d['frame']:07d}_{d['time']:09.3f}s_{safe_file_name(d['name'])}.jpg"
            if (folder / name).is_file():
                links.setdefault(d["name"], []).append(
                    (d["time"], d["distance"], f"{video['output_folder']}/{name}"))
    return links


def html_person_cards(report: dict, links_per_video: list, thumbnails: dict) -> str:
    """Return the people section: reference photo, best snapshot, where and how well found."""
    import html
    cards = []
    for idx, person in enumerate(report["people"]):
        name = person["name"]
        ranges = [(v, r) for v in report["videos"] for r in v["ranges"] if r["name"] == name]
        shots = [s for links in links_per_video for s in links.get(name, [])]
        best = min(shots, key=lambda s: s[1]) if shots else None
        pics = f'<img src="{thumbnails.get(name, "")}" alt="reference photo of {html.escape(name)}">'
        if best:
            pics += (f'<a href="{link(best[2])}"><img src="{link(best[2])}" '
                     f'alt="best match of {html.escape(name)}"></a>')
        if ranges:
            best_d = min(r["best_distance"] for _, r in ranges)
            videos = len({v["file"] for v, _ in ranges})
            found = (f"found in {videos} video(s), {len(ranges)} range(s); best distance "
                     f"{best_d:.3f} (similarity {1 - best_d:.3f})")
        else:
            found = "not found"
        cards.append(f'<div class="person"><b><span class="swatch" style="background:'
                     f'{color_hex(idx)}"></span>{html.escape(name)}</b><div>{found}</div>'
                     f'<div class="pics">{pics}</div></div>')
    return '<div class="people">' + "".join(cards) + "</div>"


def html_video(video: dict, people: list, shots: dict) -> str:
    """Return one video's block: a timeline bar per person found and a table of ranges."""
    import html
    duration = max([video["duration_s"]] + [r["end"] for r in video["ranges"]]) or 1.0
    names = sorted({r["name"] for r in video["ranges"]})
    rows, table = [], []
    for name in names:
        idx = people.index(name) if name in people else 0
        segments = []
        for r in (r for r in video["ranges"] if r["name"] == name):
            left, width = 100 * r["start"] / duration, 100 * (r["end"] - r["start"]) / duration
            tip = f"{name} {r['start_hms']}-{r['end_hms']}, distance {r['best_distance']:.3f}"
            href = link(r["clip"]) if r["clip"] else "#"
            segments.append(f'<a class="seg" href="{href}" title="{html.escape(tip)}" style="left:'
                            f'{left:.3f}%;width:{width:.3f}%;background:{color_hex(idx)}"></a>')
            inside = [s for s in shots.get(name, []) if r["start"] <= s[0] <= r["end"]]
            table.append(html_range_row(r, inside))
        rows.append(f'<div class="row"><div class="label"><span class="swatch" style="background:'
                    f'{color_hex(idx)}"></span>{html.escape(name)}</div><div class="bar">'
                    f'{"".join(segments)}</div></div>')
    if not names:
        rows.append('<div class="row"><div class="label">nobody found</div><div class="bar"></div></div>')
    axis = "".join(f"<span>{format_hms(duration * k / 4)}</span>" for k in range(5))
    head = (f'<h3>{html.escape(Path(video["file"]).name)}</h3><div class="meta">'
            f'{format_hms(video["duration_s"])}, {video["processed_frame_count"]} frames processed, '
            f'status {html.escape(video["status"])}</div>')
    ranges = ("<table><tr><th>person</th><th>from</th><th>to</th><th>best distance</th>"
              "<th>clip</th><th>snapshots</th></tr>" + "".join(table) + "</table>") if table else ""
    return (f'<div class="video">{head}{"".join(rows)}<div class="axis">{axis}</div>{ranges}</div>')


def html_range_row(r: dict, shots: list) -> str:
    """Return one table row of a range: times, distance, clip link, snapshot links."""
    import html
    clip = (f'<a href="{link(r["clip"])}">clip</a>' if r["clip"] else "no clip")
    if r["clip"] and r.get("clip_starts_early_by"):
        clip += (f' <span class="note">(fast mode: starts {r["clip_starts_early_by"]:.2f} s early, '
                 f'at the keyframe before)</span>')
    links = " ".join(f'<a href="{link(path)}">{format_hms(t)}</a>' for t, _, path in shots[:12])
    return (f"<tr><td>{html.escape(r['name'])}</td><td>{r['start_hms']}</td><td>{r['end_hms']}</td>"
            f"<td>{r['best_distance']:.3f} (similarity {r['best_similarity']:.3f})</td>"
            f"<td>{clip}</td><td>{links}</td></tr>")


def write_html_report(report: dict, output_dir: Path, thumbnails: dict) -> None:
    """Write index.html: a self-contained page (no internet) showing who was found where."""
    import html
    people = [p["name"] for p in report["people"]]
    threshold = report["settings"]["CUSTOM_THRESHOLD"]
    links_per_video = [snapshot_links(v, output_dir) for v in report["videos"]]  # one pass each
    videos = "".join(html_video(v, people, links) for v, links in zip(report["videos"], links_per_video))
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>People found in '
            f'videos</title><style>{_HTML_STYLE}</style></head><body><h1>People found in '
            f'{len(report["videos"])} video(s)</h1><p class="meta">{html.escape(report["created"])}; '
            f'a face matches when its cosine distance to a person is at most {threshold} (similarity '
            f'at least {1 - threshold:.2f}); model pack {html.escape(report["settings"]["MODEL_PACK_NAME"])}; '
            f'{"complete" if report["complete"] else "INCOMPLETE (interrupted or failed)"}</p>'
            f'<h2>People</h2>{html_person_cards(report, links_per_video, thumbnails)}'
            f'<h2>Videos</h2>{videos}</body></html>')
    write_bytes_atomic(output_dir / "index.html", page.encode("utf-8"))


def summary_table(videos: list, reused_files: set) -> str:
    """Return the end-of-run table from the results.json entries: one line per video and person
    found; a video reused from an earlier run says so."""
    lines = [f"{'video':<36} {'frames':>7}  {'person':<24} {'ranges':>6} {'best d':>7}  status"]
    for video in videos:
        name = Path(video["file"]).name[:36]
        status = video["status"] + (" (reused)" if video["file"] in reused_files else "")
        frames = video["processed_frame_count"]
        people = sorted({r["name"] for r in video["ranges"]})
        if not people:
            lines.append(f"{name:<36} {frames:>7}  {'(nobody)':<24} {0:>6} {'':>7}  {status}")
        for person in people:
            mine = [r["best_distance"] for r in video["ranges"] if r["name"] == person]
            lines.append(f"{name:<36} {frames:>7}  {person:<24} {len(mine):>6} {min(mine):>7.3f}  {status}")
    return "\n".join(lines)


# Saved results per video (resume) -------------------------------------------------------------
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
    filled_qs: list  # one per worker process
    result_q: object
    stop_event: object
    processes: list = field(default_factory=list)
    finished_children: set = field(default_factory=set)
    inbox: queue.Queue = field(default_factory=queue.Queue)  # result_q's messages (forward_results)
    reader_stop: threading.Event = field(default_factory=threading.Event)


def start_pipeline(settings: Settings, videos: list, references: list,
                   jobs: list | None = None) -> Pipeline:
    """Create the queues and ring, then start the decoder and worker processes; if a start
    fails, stop what was started and release the ring before re-raising. The decoders take the
    jobs (default: every video); the workers know every video by its index."""
    gpus = worker_gpus(settings)
    ctx = mp.get_context("spawn")
    jobs = videos if jobs is None else jobs
    layout = plan_ring(jobs, settings, str(os.getpid()))
    shm = create_ring(layout)
    try:
        # filled queues need no bound of their own: at most slot_count frames exist at once.
        filled_qs = [ctx.Queue() for _ in range(settings.NUM_GPU_PROCESSES)]
        pipe = Pipeline(ctx, layout, shm, ctx.Queue(), new_slot_queue(ctx, layout.slot_count),
                        filled_qs, ctx.Queue(), ctx.Event())
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    try:
        start_result_reader(pipe)
        for item in (*jobs, *[None] * settings.NUM_CPU_LOADERS):
            pipe.jobs_q.put(item)
        for i in range(settings.NUM_CPU_LOADERS):
            start_child(pipe, f"decoder-{i}", decoder_main, layout, pipe.jobs_q, pipe.free_q,
                        pipe.filled_qs, pipe.result_q, pipe.stop_event, settings.FRAME_INTERVAL)
        # Intra-op threads per ONNX Runtime session, so that all workers together fit the cores.
        threads = max(1, (os.cpu_count() or 2) // (settings.NUM_GPU_PROCESSES * settings.GPU_WORKER_THREADS))
        for i in range(settings.NUM_GPU_PROCESSES):
            start_child(pipe, f"worker-{i}", worker_main, settings, layout, videos, references,
                        pipe.filled_qs[i], pipe.free_q, pipe.result_q, pipe.stop_event, threads,
                        gpus[i])
    except BaseException:
        shutdown_pipeline(pipe)
        raise
    return pipe


def worker_gpus(settings: Settings) -> list:
    """Return each worker's GpuSlot (None for all when no CUDA provider is available); raise
    BadInput for a GPU_DEVICE_IDS entry that is not visible."""
    import onnxruntime as ort
    if provider_chain(settings.PROVIDERS, ort.get_available_providers())[0] == "CPUExecutionProvider":
        return [None] * settings.NUM_GPU_PROCESSES
    try:
        slots = gpu_slots(settings, settings.NUM_GPU_PROCESSES)
    except ValueError as error:
        raise BadInput(str(error)) from None
    for i, slot in enumerate(slots):
        print(f"[*] worker-{i}: GPU {slot.id} ({slot.name})")
    return slots


def start_child(pipe: Pipeline, name: str, target, *args) -> None:
    """Start one named child process of the pipeline, deaf to Ctrl-C from its first instruction:
    it inherits the blocked SIGINT of sigint_held (run_child then ignores SIGINT for good), so
    one still importing cannot print a KeyboardInterrupt traceback, and a Ctrl-C meanwhile waits
    until it has its start-up data (else it would print an EOFError traceback)."""
    process = pipe.ctx.Process(target=target, name=name, args=(name, *args))
    try:
        with sigint_held():
            process.start()
    finally:
        if process.pid is not None:  # started, even if a Ctrl-C came meanwhile: stopped with the rest
            pipe.processes.append(process)


def start_result_reader(pipe: Pipeline) -> threading.Thread:
    """Start the daemon thread that moves result_q's messages into pipe.inbox (see
    forward_results)."""
    reader = threading.Thread(target=forward_results, name="result-reader", daemon=True,
                              args=(pipe.result_q, pipe.inbox, pipe.reader_stop))
    reader.start()
    return reader


def forward_results(result_q, inbox: queue.Queue, reader_stop: threading.Event) -> None:
    """Result reader thread: move each message of result_q into inbox until reader_stop is set.

    result_q.get(timeout=...) bounds only the wait for a message to begin: a child killed while
    writing a large one (a track lists every frame; more than the 64 KiB a pipe holds) leaves
    the rest unread for ever. This thread may then hang, but the main loop reads inbox with a
    timeout and goes on checking the children's exit codes, and shutdown does not wait for it.
    """
    while not reader_stop.is_set():
        try:
            message = result_q.get(timeout=_QUEUE_TIMEOUT_S)
        except queue.Empty:
            continue
        except Exception:  # closed at shutdown; else broken (a message that cannot be unpickled)
            if not reader_stop.is_set():
                inbox.put(("error", "result-reader", traceback.format_exc()))
            return
        inbox.put(message)


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
        raise PipelineBroken(gone[0].name, gone[0].exitcode, silent_exit_hint(gone[0].exitcode))


def silent_exit_hint(exitcode: int) -> str:
    """Return what a child's exit without an error report means, with what to do."""
    if exitcode == -getattr(signal, "SIGKILL", 9):
        return ("it exited without an error report: killed, or out of memory: check dmesg for the "
                "OOM killer; lower BATCH_SIZE, MAX_BUFFER_SLOTS or NUM_GPU_PROCESSES")
    return "it exited without an error report (killed, or out of memory?)"


def shutdown_pipeline(pipe: Pipeline) -> None:
    """Stop and join every child, terminate stragglers, then close and unlink the ring (the
    ring is released even if a second Ctrl-C interrupts the joins)."""
    pipe.stop_event.set()
    pipe.reader_stop.set()  # the reader thread is not waited for: it may hang (forward_results)
    try:
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for process in pipe.processes:
            process.join(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for process in pipe.processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        for q in (pipe.jobs_q, pipe.free_q, *pipe.filled_qs, pipe.result_q):
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
        self.started = time.monotonic()
        self.lock = threading.RLock()  # the clip thread and the message loop share the results
        self.clip_jobs, self.stop_clips, self.clips_s = queue.Queue(), threading.Event(), 0.0
        self.thumbnails = {p["name"]: reference_thumbnail(p["photos"][0]) for p in run["people"]}
        self.first_frame_s = None  # when the first processed frame came back, from the start
        self.last_frame_s = None  # ... and the last one
        self.ready_s = None  # when the last worker had loaded its models
        self.stages = {}  # process name -> StageClock report
        self.fingerprints = {}  # video_idx -> what its results depend on; saved in its video.json
        self.decoding = {}  # decoder name -> video_idx it started last ("video_start")
        self.started_videos = set()  # video_idx of every video a decoder has started
        self.write_error = None  # the first file in OUTPUT_DIR that could not be written

    def stats(self) -> dict:
        """Return the run's timing: wall time, frames/s and seconds per stage and process."""
        wall_s = time.monotonic() - self.started
        frames = sum(r.processed_frame_count for r in self.results)
        working_s = (self.last_frame_s or 0.0) - (self.ready_s or 0.0)
        return {"wall_s": round(wall_s, 3), "models_ready_s": self.ready_s,
                "first_frame_s": self.first_frame_s, "last_frame_s": self.last_frame_s,
                "processed_frames": frames,
                "frames_per_s": round(frames / wall_s, 3) if wall_s > 0 else None,
                "frames_per_s_after_models_ready": round(frames / working_s, 3) if working_s > 0 else None,
                "clips_s": round(self.clips_s, 3), "stages": self.stages,
                "reused_videos": [r.info.path for r in self.results if r.reused is not None]}

    def record_progress(self, video_idx: int, count: int) -> int:
        """Count frames a worker has finished; return the count."""
        self.last_frame_s = round(time.monotonic() - self.started, 3)
        if self.first_frame_s is None:
            self.first_frame_s = self.last_frame_s
        self.results[video_idx].processed_frame_count += count
        return count

    def record_track(self, video_idx: int, track: dict) -> None:
        """Store an ended face track: the frames it reports (those that count, see sighting_flags)
        are sightings of its person."""
        result = self.results[video_idx]
        if self.debug_rec_file:
            self.log_debug_rec(result.info, track)
        result.snapshots.update(track.get("snapshots", ()))
        if track["name"] is None:
            return
        for frame_idx, time_s, bbox, det_score, own_distance in track["frames"]:
            distance = track["best_distance"] if own_distance is None else own_distance
            result.detections.append({
                "frame": frame_idx, "time": round(time_s, 6), "time_hms": format_hms(time_s),
                "name": track["name"], "distance": distance, "similarity": round(1 - distance, 4),
                "bbox": bbox, "det_score": det_score, "track": track["track"],
                "recognized": own_distance is not None})

    def log_debug_rec(self, info: VideoInfo, track: dict) -> None:
        """Print and log each recognition's distance to every person (debug_rec)."""
        for frame_idx, time_s, distances in track["debug_rec"]:
            line = "\t".join([Path(info.path).name, str(frame_idx), f"{time_s:.3f}",
                              f"track {track['track']}", track["name"] or "-",
                              *(f"{p}={d:.4f}" for p, d in distances.items())])
            self.debug_rec_file.write(line + "\n")
            print("[debug_rec]", line)

    def video_started(self, decoder: str, video_idx: int) -> None:
        """Note which video a decoder is on (to name it if the decoder dies)."""
        self.decoding[decoder] = video_idx
        self.started_videos.add(video_idx)

    def unfinished_videos_of(self, child: str) -> list:
        """Return the unfinished VideoResults a child was working on: a decoder's current video,
        or the started videos of a worker (video i goes to worker i % NUM_GPU_PROCESSES)."""
        if child.startswith("decoder-"):
            idxs = [self.decoding[child]] if child in self.decoding else []
        elif child.startswith("worker-"):
            worker_idx = int(child.rsplit("-", 1)[1])
            idxs = [i for i in self.started_videos if i % self.settings.NUM_GPU_PROCESSES == worker_idx]
        else:  # the parent's result reader: every video in progress
            idxs = list(self.started_videos)
        return [self.results[i] for i in sorted(idxs) if not self.results[i].finished]

    def video_tracked(self, video_idx: int) -> None:
        """Note that the worker has ended every track of a video."""
        self.results[video_idx].tracked = True
        self.maybe_finish(video_idx)

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
        if result.finished or result.sent_frame_count is None or not result.tracked:
            return
        result.finished = True
        self.finish_video(result)

    def finish_video(self, result: VideoResult) -> None:
        """Compute the ranges of one finished video, save them, and queue its clips."""
        by_person = {}
        for d in result.detections:
            by_person.setdefault(d["name"], []).append((d["time"], d["distance"]))
        for name in sorted(by_person):
            result.ranges.extend(person_ranges(name, by_person[name], result.info, self.settings))
        self.save_reports()
        self.clip_jobs.put(result)

    def save_reports(self) -> None:
        """Rewrite results.json, results.csv and index.html with everything found so far."""
        with self.lock:
            self.write_output(write_reports, self.run, self.results, self.output_dir, self.settings,
                              self.thumbnails)

    def save_video(self, result: VideoResult) -> None:
        """Save a video's results in its folder (video.json) once every range has its clip entry,
        so a later run can reuse it (see reuse_problem), and only then remove what an earlier run
        left there that these results do not list. Not for a video that did not end "ok" (a
        truncated copy, a read error): it would never be reused, and must not replace an
        earlier run's good results; nothing without a fingerprint either."""
        fingerprint = self.fingerprints.get(result.info.idx)
        if fingerprint is not None and video_status(result) == "ok":
            with self.lock:
                entry = video_report(result, self.output_dir, self.settings.FRAME_INTERVAL)
                snapshots = sorted(result.snapshots)
            self.write_output(replace_saved_video, saved_video_path(self.output_dir, result.info),
                              fingerprint, entry, snapshots)

    def write_output(self, write, *args) -> None:
        """Run one write into OUTPUT_DIR. A failure (disk full, no permission) is kept in
        write_error, which stops the run at the next tick; the files written before stay whole."""
        try:
            write(*args)
        except OSError as error:
            with self.lock:
                if self.write_error is None:
                    self.write_error = str(error)

    def cut_clips(self) -> None:
        """Clip-cutting thread: cut each queued video's ranges; a None job ends it.

        ffmpeg runs beside the inference (on a GPU machine the CPU is free for it), and the
        parent keeps reading results meanwhile.
        """
        while (result := self.next_clip_job()) is not None:
            try:
                self.cut_video_clips(result)
            except Exception as error:  # recorded, and the next video's clips are still cut
                with self.lock:
                    message = f"{result.info.path}: clips not cut ({type(error).__name__}: {error})"
                    result.errors.append(message)
                    self.failures.append(message)
                    result.clips += [(None, None)] * (len(result.ranges) - len(result.clips))
            if len(result.clips) == len(result.ranges):  # not stopped halfway by Ctrl-C
                self.save_video(result)
            self.save_reports()

    def next_clip_job(self) -> VideoResult | None:
        """Return the next video whose clips are to be cut; None ends the clip thread (also once the
        run is stopping and no job is waiting)."""
        while True:
            try:
                return self.clip_jobs.get(timeout=_QUEUE_TIMEOUT_S)
            except queue.Empty:
                if self.stop_clips.is_set():
                    return None

    def cut_video_clips(self, result: VideoResult) -> None:
        """Cut the clips of one video's ranges, in order, unless the run is stopping."""
        fast = self.settings.CLIP_MODE == "fast"
        clip_dir = self.output_dir / result.info.output_name / "clips"
        keyframes = packet_times_s(result.info, keyframes_only=True) if fast and result.ranges else []
        for time_range in result.ranges:
            if self.stop_clips.is_set():
                break
            started = time.monotonic()
            clip_start_s = keyframe_before(keyframes, time_range.start_s) if fast else time_range.start_s
            clip = self.cut_one(result, time_range, clip_dir, clip_start_s)
            if clip is None:  # stopped: this range and the later ones have no clip entry
                break
            with self.lock:
                result.clips.append(clip)
                self.clips_s += time.monotonic() - started

    def cut_one(self, result: VideoResult, time_range: TimeRange, clip_dir: Path,
                clip_start_s: float) -> tuple | None:
        """Cut one clip; return (its path, where it starts), (None, None) after recording the
        error, or None when the run is stopping (nothing recorded: the video is unfinished)."""
        if self.ffmpeg is None:
            return None, None
        try:
            try:
                return str(cut_clip(self.ffmpeg, result.info, time_range, clip_dir,
                                    self.settings.CLIP_MODE, clip_start_s, self.stop_clips)), clip_start_s
            except ClipError as error:
                if self.settings.CLIP_MODE != "fast" or self.stop_clips.is_set():
                    raise
                # MP4 cannot hold every codec as it is (PCM audio, VP8, WMV): re-encode this one.
                print(f"[!] fast clip failed, re-encoding instead: {str(error).splitlines()[0]}")
                clip = cut_clip(self.ffmpeg, result.info, time_range, clip_dir, "accurate",
                                time_range.start_s, self.stop_clips)
                return str(clip), time_range.start_s
        except (ClipError, OSError) as error:
            if self.stop_clips.is_set():
                return None
            with self.lock:
                result.errors.append(str(error))
                self.failures.append(str(error))
            return None, None


def handle_message(message: tuple, state: RunState, pipe: Pipeline, bars: dict) -> None:
    """Apply one message from a child to the run state."""
    kind = message[0]
    if kind == "progress":
        name = Path(state.results[message[1]].info.path).name
        if bars["frames"].desc != name[:40]:  # the bar names the video whose frames just came
            bars["frames"].set_description_str(name[:40], refresh=False)
        bars["frames"].update(state.record_progress(*message[1:]))
    elif kind == "track":
        state.record_track(*message[1:])
    elif kind == "video_tracked":
        state.video_tracked(message[1])
    elif kind == "stats":
        state.stages[message[1]] = message[2]
    elif kind == "video_done":
        state.video_decoded(*message[1:])
    elif kind == "video_start":
        state.video_started(*message[1:])
    elif kind == "note":
        text = message[2]
        bars["frames"].write(text if text.startswith("[") else f"[*] {message[1]}: {text}")
    elif kind == "ready":
        state.ready_s = round(time.monotonic() - state.started, 3)
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
                for filled_q in pipe.filled_qs:  # one stop sentinel per worker thread
                    for _ in range(state.settings.GPU_WORKER_THREADS):
                        filled_q.put(None)
    elif kind == "error":
        raise PipelineBroken(message[1], None, message[2])
    finished = sum(r.finished for r in state.results)
    if finished != bars["videos"].n:
        bars["videos"].update(finished - bars["videos"].n)


def run_pipeline(state: RunState, references: list) -> None:
    """Run decoders and workers over every video not reused, until all children are done.
    Everything after the children are started is inside the `finally` that stops them: a Ctrl-C
    at any moment leaves no child behind."""
    jobs = [r.info for r in state.results if r.reused is None]
    pipe = start_pipeline(state.settings, [r.info for r in state.results], references, jobs)
    bars, cutter, finished = {}, None, False
    try:
        bars = progress_bars(state, jobs)
        cutter = threading.Thread(target=state.cut_clips, name="clip-cutter", daemon=True)
        cutter.start()
        follow_children(state, pipe, bars)
        finished = True
    finally:
        for bar in bars.values():
            bar.close()
        if not finished:  # broken or interrupted: cut no more clips, stop the one being cut
            state.stop_clips.set()
        try:
            shutdown_pipeline(pipe)
        finally:
            if cutter is not None:
                finish_clips(state, cutter)


def progress_bars(state: RunState, jobs: list) -> dict:
    """Return the two progress bars: videos done (reused ones included), frames processed."""
    from tqdm import tqdm
    total = sum(math.ceil(v.frame_count / state.settings.FRAME_INTERVAL) for v in jobs)
    return {"videos": tqdm(total=len(state.results), initial=len(state.results) - len(jobs),
                           desc="videos", unit="video", position=0),
            "frames": tqdm(total=total, desc="frames", unit="frame", position=1, smoothing=0.1)}


def finish_clips(state: RunState, cutter: threading.Thread) -> None:
    """Let the clip thread cut the clips queued so far and end; on Ctrl-C or SIGTERM meanwhile,
    stop the clip being cut, wait for the thread a little, and go on with the interruption."""
    state.clip_jobs.put(None)
    try:
        while cutter.is_alive():  # the last clips may take long: no deadline here
            cutter.join(timeout=_QUEUE_TIMEOUT_S)
    except BaseException:
        state.stop_clips.set()
        cutter.join(timeout=_JOIN_TIMEOUT_S)
        raise


def follow_children(state: RunState, pipe: Pipeline, bars: dict) -> None:
    """Apply the children's messages until every child is done; raise PipelineBroken when one
    dies or fails, OutputError when a file in OUTPUT_DIR could not be written."""
    def receive():
        try:
            message = pipe.inbox.get(timeout=_QUEUE_TIMEOUT_S)
        except queue.Empty:
            return
        with state.lock:
            handle_message(message, state, pipe, bars)

    next_check = time.monotonic()
    while len(pipe.finished_children) < len(pipe.processes):
        receive()
        if time.monotonic() >= next_check:  # also while messages keep coming
            check_children(pipe, receive)
            if state.write_error:
                raise OutputError(state.write_error)
            next_check = time.monotonic() + _QUEUE_TIMEOUT_S


def prepare_references(settings: Settings) -> tuple:
    """Return (references, problems, [detector file, recognizer file]), the references computed
    with the CPU provider in the parent."""
    if not list_reference_photos(Path(settings.REFERENCE_DIR)):
        raise BadInput(no_photo_message(Path(settings.REFERENCE_DIR)))
    models = load_face_models(settings, "cpu", max(1, (os.cpu_count() or 2)))
    references, problems, notes = load_references(Path(settings.REFERENCE_DIR), models, settings)
    report_problems("reference photos skipped", problems)
    report_problems("reference photos", notes)
    if not references:
        raise BadInput(f"no usable reference photo in {settings.REFERENCE_DIR}: add a photo per "
                       f"person named after them (e.g. Barack_Obama.jpg) showing the face clearly")
    return references, problems, [Path(models.det_path), Path(models.rec_path)]


def no_photo_message(folder: Path) -> str:
    """Return the message for a reference folder without a photo in a supported format: empty,
    or only files in other formats (an iPhone's .heic), which it counts."""
    others = scan_reference_folder(folder)[2]
    if not others:
        return (f"no photo in {folder}: add one photo per person named after them (e.g. "
                f"Barack_Obama.jpg), or try: python main.py --demo")
    kinds = ", ".join(sorted({p.suffix.lower() or "no extension" for p in others}))
    return (f"no photo in {folder} in a format this can read: its {len(others)} file(s) are in "
            f"other formats ({kinds}, e.g. {others[0].name}); convert them to .jpg or .png (an "
            f"iPhone's .heic: export as JPEG, or set Settings > Camera > Formats > Most Compatible)")


def probe_all(paths: list, video_dir: Path) -> tuple:
    """Return ([VideoInfo] for the usable videos, [problems]): each problem names the file, what
    is wrong and what to do (see read_head, probe_video, check_fits_ring)."""
    videos, problems = [], []
    files = [p for p in paths if not p.is_dir()]  # a folder named like a video is reported below
    names = dict(zip(files, unique_output_names(files, video_dir.resolve())))
    budget_bytes, why = ring_memory_budget()
    for path in paths:
        try:
            info = probe_video(path, len(videos), names.get(path, path.name))
            check_fits_ring(info, budget_bytes, why)
            videos.append(info)
        except BadInput as error:
            problems.append(str(error))
        except Exception as error:  # an odd file must not stop the run: it is skipped by name
            problems.append(f"{path}: cannot be probed ({type(error).__name__}: {error}); check "
                            f"that it plays in a video player, or remove it from the folder")
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


def check_output_dir(folder: Path) -> None:
    """Create the output folder and make (and remove) a file in it; raise BadInput naming the
    folder if that fails, so an unwritable folder stops the run before any heavy work."""
    import tempfile
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"output folder {folder} is a file, not a folder: choose another with --output")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise BadInput(f"output folder {folder} cannot be written ({error.strerror or error}): "
                       f"choose another with --output, or make it writable") from None


def videos_outside_output(paths: list, output_dir: Path) -> list:
    """Return the videos that are not inside OUTPUT_DIR: with the output folder inside the video
    folder, its clips would otherwise be searched by the next run (saying so when it happens)."""
    output = output_dir.resolve()
    kept = [p for p in paths if not p.is_relative_to(output)]
    if len(kept) < len(paths):
        print(f"[*] {len(paths) - len(kept)} video(s) inside the output folder {output_dir} (the "
              f"clips of earlier runs) are not searched")
    return kept


def prepare_search(settings: Settings) -> tuple:
    """Return (video paths, references, problems, model files); raise BadInput for no videos,
    an output folder that cannot be written, no usable reference photo or no usable models."""
    output_dir = Path(settings.OUTPUT_DIR)
    video_paths = videos_outside_output(list_videos(Path(settings.VIDEO_DIR)), output_dir)
    if not video_paths:
        raise BadInput(f"no videos in {settings.VIDEO_DIR}: put .mp4/.mkv/.avi/... files there "
                       f"and one photo per person in {settings.REFERENCE_DIR} (Name.jpg); or "
                       f"see a complete example first with: python main.py --demo")
    check_output_dir(output_dir)
    return (video_paths, *prepare_references(settings))


def start_run(settings: Settings, video_paths: list, references: list, problems: list,
              model_paths: list) -> RunState:
    """Return the run's state: ffmpeg found, videos probed, earlier results reused (RESUME)."""
    print(f"[*] people: {', '.join(f'{r.name} ({len(r.photos)} photo(s))' for r in references)}")
    ffmpeg = find_ffmpeg(settings.FFMPEG_DIR)
    print(f"[*] ffmpeg: {ffmpeg or 'NOT FOUND - clips will not be cut (pip install imageio-ffmpeg)'}")
    if ffmpeg is None:
        problems.append(f"no ffmpeg in {settings.FFMPEG_DIR}/, on PATH or from imageio-ffmpeg: "
                        f"clips were not cut")
    videos, video_problems = probe_all(video_paths, Path(settings.VIDEO_DIR))
    report_problems("videos skipped", video_problems)
    state = RunState(videos, settings, ffmpeg, run_header(settings, references, ffmpeg))
    state.failures.extend(problems + video_problems)
    plan_resume(state, run_fingerprint(settings, references, model_paths))
    return state


def plan_resume(state: RunState, fingerprint: dict) -> None:
    """Reuse every video an earlier run finished with the same fingerprint (when RESUME is on),
    removing what a later, interrupted run left in its folder. Every other video is searched
    from scratch, and nothing of it is removed before its new results are saved (save_video):
    a rerun stopped early loses nothing."""
    for result in state.results:
        info = result.info
        try:
            state.fingerprints[info.idx] = {"video": video_fingerprint(info.path), **fingerprint}
        except OSError as error:  # searched, but not saved for a rerun
            print(f"[!] {info.path}: cannot be read to recognise it ({error.strerror or error}): "
                  f"its results will not be reused by a rerun")
            continue
        saved = reusable_video(state, info) if state.settings.RESUME else None
        if saved is not None:
            reuse_video(state, result, saved)
    reused = sum(r.reused is not None for r in state.results)
    if not state.settings.RESUME:
        print("[*] --force (RESUME off): every video is searched again")
    elif reused:
        print(f"[*] {reused} of {len(state.results)} video(s) reused from an earlier run "
              f"(--force searches them again)")


def reuse_video(state: RunState, result: VideoResult, saved: dict) -> None:
    """Take a video's saved results as this run's (under its path now: the folder may have
    moved), and remove main.py's files in its folder that they do not list."""
    info = result.info
    result.reused, result.finished = {**saved["entry"], "file": info.path}, True
    print(f"[*] reused: {Path(info.path).name} (finished by an earlier run, "
          f"{saved_video_path(state.output_dir, info)})")
    try:
        stale = remove_unlisted_files(state.output_dir / info.output_name, saved)
    except OSError as error:
        state.failures.append(f"{error.filename}: cannot be removed ({error.strerror}); it is "
                              f"not part of the results, remove it by hand")
        return
    if stale:
        print(f"[*] {Path(info.path).name}: removed {len(stale)} file(s) an interrupted later "
              f"run left, e.g. {stale[0].name}")


def reusable_video(state: RunState, info: VideoInfo) -> dict | None:
    """Return what an earlier run saved for this video (video.json), if it can be reused; else
    None, saying why when there was a saved one."""
    path = saved_video_path(state.output_dir, info)
    try:
        saved = read_saved_video(path)
    except BadInput as error:
        print(f"[!] {error}")
        return None
    if saved is None:
        return None
    problem = reuse_problem(saved, state.fingerprints[info.idx], path.parent, state.output_dir)
    if problem is not None:
        print(f"[*] {Path(info.path).name}: searched again: {problem} (since {path})")
        return None
    return saved


def search_videos(state: RunState, references: list) -> int:
    """Search every video not reused and save the reports, also after a broken pipeline or
    Ctrl-C; return 0, 1 (broken, or a file could not be written) or 130 (interrupted)."""
    exit_code, why = 0, "the search ended without it"
    if state.settings.debug_rec:
        state.debug_rec_file = open(state.output_dir / "debug_rec.tsv", "w", encoding="utf-8")
    try:
        if any(r.reused is None for r in state.results):
            run_pipeline(state, references)
    except BadInput as error:  # a setting the workers cannot follow (GPU_DEVICE_IDS)
        print(f"error: {error}", file=sys.stderr)
        state.failures.append(str(error))
        exit_code, why = 2, "not searched (see the error above)"
    except PipelineBroken as error:
        report_broken(state, error)
        exit_code, why = 1, f"pipeline broken ({error.name})"
    except OutputError:  # reported by finish_run
        exit_code, why = 1, "a file in OUTPUT_DIR could not be written"
    except KeyboardInterrupt:
        print("\n[!] interrupted: results so far are saved, marked incomplete", file=sys.stderr)
        exit_code, why = 130, "interrupted"
    finally:
        if state.debug_rec_file:
            state.debug_rec_file.close()
        mark_unfinished(state, why)
        state.run["complete"] = exit_code == 0 and all(video_done(r) for r in state.results)
        state.run["failures"] = state.failures
        state.run["stats"] = state.stats()
        state.save_reports()
    return exit_code


def mark_unfinished(state: RunState, why: str) -> None:
    """Give every video that is not done (see video_done) and has no error yet the error 'not
    finished: <why>', so that its entry says why it is not "ok"."""
    with state.lock:
        for result in state.results:
            if not video_done(result) and not result.errors:
                result.errors.append(f"{result.info.path}: not finished: {why}")


def report_broken(state: RunState, error: PipelineBroken) -> None:
    """Print a broken pipeline and the videos it left unfinished; record it in failures and in
    each of those videos' errors."""
    with state.lock:
        unfinished = state.unfinished_videos_of(error.name)
        names = ", ".join(Path(r.info.path).name for r in unfinished) or "no video in progress"
        lines = error.remote_traceback.strip().splitlines()
        what = str(error).splitlines()[0] + (f": {lines[-1]}" if lines else "")
        print(f"\n[!] pipeline broken: {error}", file=sys.stderr)
        print(f"[!] {error.name} was working on: {names}. Not finished; a rerun searches "
              f"{'them' if len(unfinished) > 1 else 'it'} again and reuses the finished videos",
              file=sys.stderr)
        for result in unfinished:
            result.errors.append(f"{result.info.path}: not finished: {what}")
        state.failures.append(f"pipeline broken: {what}; unfinished: {names}")


def finish_run(state: RunState, exit_code: int) -> int:
    """Print the summary and the problems; return the final exit code (1 if anything failed)."""
    entries = [video_report(r, state.output_dir, state.settings.FRAME_INTERVAL) for r in state.results]
    print(summary_table(entries, {r.info.path for r in state.results if r.reused is not None}))
    stats = state.run["stats"]
    print(f"[*] {stats['processed_frames']} frames in {stats['wall_s']:.1f} s "
          f"({stats['frames_per_s'] or 0:.1f} frames/s; first frame after {stats['first_frame_s']} s)")
    report_problems("problems", state.failures)
    if state.write_error:
        print(f"error: {state.write_error}. Free some space (or fix the permissions, or choose "
              f"another --output) and run again: the files saved before are whole, and the videos "
              f"finished so far are reused", file=sys.stderr)
        return exit_code or 1
    print(f"[*] results: {state.output_dir / 'results.json'}; report: {state.output_dir / 'index.html'}")
    if exit_code == 0 and (state.failures or not state.run["complete"]):
        exit_code = 1
    return exit_code


# ──────────────────────────────────────────────────────────────────────────────────────────────
# 9 Check and demo
# ──────────────────────────────────────────────────────────────────────────────────────────────
def package_version(name: str) -> str | None:
    """Return an installed distribution's version, or None."""
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def working_providers(model_path: Path) -> dict:
    """Return {provider: "loads" or why not} by opening the model with each GPU provider alone
    (and the CPU). "not in this build: ..." is a provider this onnxruntime lacks (optional with
    --providers auto); "cannot be loaded: ..." one it has whose libraries do not load."""
    import onnxruntime as ort
    ort.set_default_logger_severity(ort_log_level())
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # as the workers do: CUDA/cuDNN from the nvidia-* pip packages
    verdicts = {}
    for provider in _PROVIDER_ORDER["auto"]:
        if provider not in available:
            if provider != "CPUExecutionProvider":
                verdicts[provider] = f"not in this build: {provider_load_problem(provider)}"
            continue
        if provider_library_error(provider):
            verdicts[provider] = f"cannot be loaded: {provider_library_error(provider)}"
            continue
        try:
            session = ort.InferenceSession(str(model_path), providers=[provider], enable_fallback=0)
            active = session.get_providers()
            verdicts[provider] = ("loads" if provider in active else
                                  f"listed, but the session fell back to {active}: "
                                  f"{provider_load_problem(provider)}")
        except Exception as error:  # a provider that cannot load is what we report
            verdicts[provider] = f"fails: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return verdicts


def optional_provider(provider: str, verdict: str) -> bool:
    """Return True when a provider's verdict is no problem with --providers auto: it is not in
    this build, or it is TensorRT, which is not installed (onnxruntime-gpu always lists it)."""
    return verdict.startswith("not in this build") or tensorrt_missing(provider, verdict)


def visible_gpus() -> list:
    """Return the NVIDIA GPUs nvidia-smi lists ("name, memory"), or [] when it is not there."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def local_model_pack(model_root: str, pack: str) -> Path | None:
    """Return the pack folder if it is already on disk (no download)."""
    root = Path(model_root).expanduser()
    for candidate in (root / "models" / pack, root / pack):
        if candidate.is_dir() and any(candidate.glob("*.onnx")):
            return candidate
    return None


def check_lines(settings: Settings) -> tuple:
    """Return (report lines, problem count) of what a run with these settings would use."""
    import platform
    lines, problems = [], 0

    def say(ok: bool, text: str) -> None:
        nonlocal problems
        lines.append(f"  [{'ok' if ok else '!!'}] {text}")
        problems += not ok

    lines.append(f"Python {platform.python_version()} on {platform.system()} {platform.machine()}")
    for name in ("insightface", "onnxruntime", "onnxruntime-gpu", "av", "opencv-python",
                 "numpy", "tensorrt", "imageio-ffmpeg"):
        lines.append(f"  {name}: {package_version(name) or 'not installed'}")
    if both_onnxruntime_builds_problem():
        say(False, both_onnxruntime_builds_problem())
    gpus = visible_gpus()
    where = "nvidia-smi lists none" if shutil.which("nvidia-smi") else "no nvidia-smi on PATH"
    lines.append(f"GPUs: {', '.join(gpus) if gpus else f'none found ({where})'}")
    pack = local_model_pack(settings.MODEL_ROOT, settings.MODEL_PACK_NAME)
    if pack is None:
        say(False, f"model pack {settings.MODEL_PACK_NAME} not on disk: a run downloads it into "
                   f"{Path(settings.MODEL_ROOT).expanduser() / 'models' / settings.MODEL_PACK_NAME} "
                   f"(needs internet), or put its .onnx files there")
    else:
        try:
            detector, recognizer = classify_pack_models(pack)
            say(True, f"model pack: {pack} (detector {detector.name}, recognizer {recognizer.name})")
            for provider, verdict in working_providers(detector).items():
                if optional_provider(provider, verdict) and settings.PROVIDERS in ("auto", "cpu"):
                    lines.append(f"  [--] provider {provider}: {verdict}")  # optional here
                else:
                    say(verdict == "loads", f"provider {provider}: {verdict}")
        except BadInput as error:
            say(False, str(error))
        except Exception as error:  # a broken install is what --check is for: say it, go on
            say(False, f"the models cannot be opened ({type(error).__name__}: {error}); "
                       f"reinstall: pip install -r requirements.txt")
    ffmpeg = find_ffmpeg(settings.FFMPEG_DIR)
    say(ffmpeg is not None, f"ffmpeg: {ffmpeg or 'not found (clips cannot be cut)'}")
    return lines, problems


def check_inputs(settings: Settings) -> tuple:
    """Return (report lines, problem count) about the videos and reference photos."""
    lines, problems = [], 0
    try:
        paths = videos_outside_output(list_videos(Path(settings.VIDEO_DIR)), Path(settings.OUTPUT_DIR))
        videos, video_problems = probe_all(paths, Path(settings.VIDEO_DIR))
        lines.append(f"videos in {settings.VIDEO_DIR}: {len(videos)} usable")
        lines += [f"  {Path(v.path).name}: {v.width}x{v.height}, {v.fps:.2f} fps, "
                  f"{v.duration_s:.1f} s" for v in videos]
        lines += [f"  [!!] {p}" for p in video_problems]
        if not videos:
            lines.append(f"  [!!] no usable video in {settings.VIDEO_DIR}")
        problems += len(video_problems) + (not videos)
    except BadInput as error:
        lines.append(f"  [!!] {error}")
        problems += 1
    try:
        photos = list_reference_photos(Path(settings.REFERENCE_DIR))
        lines.append(f"reference photos in {settings.REFERENCE_DIR}: {len(photos)} people")
        for label, paths in photos.items():
            for path in paths:
                try:
                    read_image(path)
                    lines.append(f"  {label}: {path.name}")
                except BadInput as error:
                    lines.append(f"  [!!] {error}")
                    problems += 1
        if not photos:
            lines.append(f"  [!!] {no_photo_message(Path(settings.REFERENCE_DIR))}")
        problems += not photos
    except BadInput as error:
        lines.append(f"  [!!] {error}")
        problems += 1
    return lines, problems


def demo_frames(pictures: dict, size: tuple = (640, 360), fps: int = 10):
    """Yield the demo video's BGR frames: no face, the astronaut panned and zoomed, no face,
    the astronaut small again (about 10 s at fps)."""
    import cv2
    width, height = size

    def framed(image, scale, shift_x):
        canvas = np.zeros((height, width, 3), np.uint8)
        side = int(height * scale)
        small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
        x0, y0 = (width - side) // 2 + shift_x, (height - side) // 2
        xa, xb = max(0, x0), min(width, x0 + side)
        ya, yb = max(0, y0), min(height, y0 + side)
        canvas[ya:yb, xa:xb] = small[ya - y0:yb - y0, xa - x0:xb - x0]
        return canvas

    for i in range(2 * fps):
        yield framed(pictures["coffee"], 1.0 + 0.1 * i / fps, 0)
    for i in range(4 * fps):
        yield framed(pictures["astronaut"], 1.0 + 0.3 * i / (4 * fps), int(120 - 240 * i / (4 * fps)))
    for i in range(2 * fps):
        yield framed(pictures["rocket"], 1.0, 0)
    for i in range(2 * fps):
        yield framed(pictures["astronaut"], 0.7, 0)


def prepare_demo(settings: Settings) -> Settings:
    """Build a demo in a new temporary folder and return settings that search it.

    The material ships with scikit-image (installed with insightface) and is free to use: NASA's
    public-domain astronaut portrait (Eileen Collins), plus pictures without faces. The reference
    photo is the portrait mirrored and resized, so the search has something to find.
    """
    import cv2
    import tempfile
    from skimage import data
    root = Path(tempfile.mkdtemp(prefix="find-people-demo-"))
    pictures = {name: cv2.cvtColor(getattr(data, name)(), cv2.COLOR_RGB2BGR)
                for name in ("astronaut", "coffee", "rocket")}
    (root / "samples_jpg").mkdir()
    (root / "in_video").mkdir()
    reference = cv2.resize(cv2.flip(pictures["astronaut"], 1), (400, 400), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(root / "samples_jpg" / "Eileen_Collins.jpg"), reference)
    writer = cv2.VideoWriter(str(root / "in_video" / "demo.mp4"), cv2.VideoWriter_fourcc(*"mp4v"),
                             10, (640, 360))
    if not writer.isOpened():
        raise BadInput(f"OpenCV cannot write {root / 'in_video' / 'demo.mp4'}")
    for frame in demo_frames(pictures):
        writer.write(frame)
    writer.release()
    print(f"[*] demo: {root} (a 10 s video and one reference photo; the astronaut is on screen "
          f"at 2-6 s and 8-10 s)")
    values = dict(settings.pairs)
    values.update(VIDEO_DIR=str(root / "in_video"), REFERENCE_DIR=str(root / "samples_jpg"),
                  OUTPUT_DIR=str(root / "found_fragments_colored_"))
    return Settings(tuple(values.items()))


def run_check(settings: Settings) -> int:
    """Print what a run would use and what is wrong; change nothing. Return 0 if all is ready."""
    lines, problems = check_lines(settings)
    more, more_problems = check_inputs(settings)
    print("\n".join(lines + more))
    total = problems + more_problems
    print(f"{total} problem(s) found" if total else "ready: python main.py will run as shown")
    if more_problems:
        print("to see a complete run first, without your own files: python main.py --demo")
    return 1 if total else 0


def run_search(settings: Settings) -> int:
    """Run the whole search; return the exit code (see main)."""
    try:
        for name, value in changed_settings(settings).items():
            print(f"[*] {name} = {value!r}")
        if both_onnxruntime_builds_problem():
            print(f"[!] {both_onnxruntime_builds_problem()}")
        prepared = prepare_search(settings)
        state = start_run(settings, *prepared)
    except (BadInput, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[!] interrupted before the search started", file=sys.stderr)
        return 130
    try:
        return finish_run(state, search_videos(state, prepared[1]))
    except KeyboardInterrupt:  # just before the search, or again while the reports are written
        print("\n[!] interrupted: the reports are those of the last finished video",
              file=sys.stderr)
        return 130


def stop_on_sigterm(signum, frame) -> None:
    """Treat SIGTERM (kill, a service manager) like Ctrl-C: stop cleanly, keep what was found."""
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """Run the search (or --check, or --demo); return the exit code.

    0: all went well; 1: something was skipped or failed (listed at the end); 2: bad settings,
    no videos, an output folder that cannot be written, no usable reference or no models;
    130: interrupted (results so far are saved).
    """
    try:
        args = build_arg_parser().parse_args(argv)
        settings = settings_from_args(args)
        ort_log_level()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_on_sigterm)
    if args.check:
        return run_check(settings)
    if args.demo:
        try:
            settings = prepare_demo(settings)
        except (BadInput, OSError) as error:
            print(f"error: the demo could not be built: {error}", file=sys.stderr)
            return 2
    return run_search(settings)


if __name__ == "__main__":
    sys.exit(main())
