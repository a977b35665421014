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
                          │  into tracks, embed (align + ArcFace) a few looks per track (no photo
                          │  is known here), return the slot
                          v
    parent <──result_q── ("video_start" | "progress" | "track" | "video_tracked" | "video_done" |
       │                  "ready" | "note" | "stats" | "error" | "done", ...); a reader thread moves
       │                  them into the parent's inbox, which the main loop reads (forward_results)
       ├─> per video, once all its frames are tracked: INDEX_DIR/<video folder>.parquet (atomic);
       │   a video whose index is current is not decoded at all (RESUME, --reindex)
       └─> finisher thread, per video (reused indexes first): search (photos x stored looks, naming)
           -> ranges per person -> snapshots (their frames decoded again) -> clips (ffmpeg)
           -> results.json / results.csv / index.html, <video folder>/made.json

Ownership: the parent creates every queue, the stop event and the ring's shared memory; only the
parent unlinks the ring, in a `finally`, after joining the children. Children attach by name,
ignore SIGINT, close their handle in their own `finally`, and send ("error", name, traceback) on
failure. Pixels never travel through a queue: only slot indices do.

Times are float seconds from the first video frame (its presentation timestamp), never
frame_idx / fps. ffmpeg's input `-ss` counts from the container start; `container_seek_s` is the
one place that converts between the two clocks.

The engine is the package findpeople/ beside this file, one module per stage (its __init__ lists
them); this file holds only the settings and main().

InsightFace's pretrained models are for non-commercial research purposes only.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from findpeople.doctor import prepare_demo, run_check
from findpeople.errors import BadInput
from findpeople.providers import ort_log_level
from findpeople.run import name_person, print_people, run_search, stop_on_sigterm
from findpeople.settings import (
    Settings, build_arg_parser, changed_settings, setting_comments, settings_from_args)

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
# Unnamed people: the faces no photo named, grouped into people (results.json, index.html, --people)
UNNAMED_MIN_FACE_SIZE = 64  # px, 0..1000; a track is grouped only if its largest look is at least this big
UNNAMED_MIN_LOOKS = 3  # 1..100; ... and it was embedded at least this many times
UNNAMED_MIN_TRACKS = 1  # 1..1000; a group is shown only with at least this many tracks
# Folders
VIDEO_DIR = "in_video"  # folder of videos to search (searched recursively, links followed)
REFERENCE_DIR = "samples_jpg"  # reference photos: Name.jpg, Name_2.jpg, or a subfolder Name/
OUTPUT_DIR = "found_fragments_colored_"  # snapshots, clips, results.json, results.csv
INDEX_DIR = "face_index"  # one index file per video (faces, tracks, embeddings): a new search reuses it
RESUME = True  # reuse the indexes in INDEX_DIR and the snapshots and clips in OUTPUT_DIR when still current
MODEL_ROOT = "~/.insightface"  # holds models/<MODEL_PACK_NAME>/ (a folder holding <pack>/ also works)
TRT_CACHE_DIR = "insightface_trt_cache"  # TensorRT engines and timing cache
FFMPEG_DIR = "ffmpeg"  # optional local ffmpeg binary (ffmpeg or ffmpeg.exe); then PATH; then imageio-ffmpeg
# Cluster (docs/cluster.md; pip install -r requirements-ray.txt)
RAY_ADDRESS = ""  # "" = this machine | local = a Ray instance here | auto or ray://host:10001 = a running Ray cluster
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
    "CLIP_DURATION_AFTER", "MERGE_GAP_TOLERANCE", "CLIP_MODE", "UNNAMED_MIN_FACE_SIZE",
    "UNNAMED_MIN_LOOKS", "UNNAMED_MIN_TRACKS", "VIDEO_DIR", "REFERENCE_DIR", "OUTPUT_DIR",
    "INDEX_DIR", "RESUME", "MODEL_ROOT", "TRT_CACHE_DIR", "FFMPEG_DIR", "PROVIDERS", "GPU_DEVICE_IDS",
    "FRAMES_ON_DEVICE", "TRT_FP16", "RAY_ADDRESS", "debug_det", "debug_det_dir", "debug_rec",
)


def default_settings() -> dict:
    """Return the settings block's values by name (the only code that reads the constants: the
    package receives a Settings record instead)."""
    return {name: globals()[name] for name in SETTING_NAMES}


def parse_command_line(argv=None):
    """Return the parsed command line: one flag per setting, defaults from the block."""
    comments = setting_comments(Path(__file__), SETTING_NAMES)
    return build_arg_parser(default_settings(), comments).parse_args(argv)


def load_settings(argv=None) -> Settings:
    """Return the effective settings: the block's values overridden by the flags in argv."""
    return settings_from_args(parse_command_line(argv), SETTING_NAMES)


def main(argv=None) -> int:
    """Run the search (or --check, or --demo); return the exit code.

    0: all went well; 1: something was skipped or failed (listed at the end); 2: bad settings,
    no videos, an output folder that cannot be written, no usable reference or no models;
    130: interrupted (results so far are saved).
    """
    try:
        args = parse_command_line(argv)
        settings = settings_from_args(args, SETTING_NAMES)
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
    if args.people:
        return print_people(settings)
    if args.name_person:
        return name_person(settings, args.name_person, changed_settings(settings, default_settings()))
    return run_search(settings, changed_settings(settings, default_settings()),
                      index_only=args.index_only, reindex=args.reindex)


if __name__ == "__main__":
    sys.exit(main())
