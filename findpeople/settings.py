"""Settings: the frozen record of one run's settings, its command-line flags and their validation.

Runs in the parent only. In: the settings block of main.py (its values and inline comments,
handed over by main.py: this package never reads main.py's constants) and the command line.
Out: one frozen `Settings`, which every child process receives (spawned children re-import
modules and would see the defaults, not the overrides).
"""
from __future__ import annotations

import argparse
import re
import types
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


PROVIDER_ORDER = {  # --providers value -> ONNX Runtime providers to try, best first
    "auto": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
}


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


_LIMITS = {  # name -> (minimum, maximum) for numbers; choices for strings
    "NUM_GPU_PROCESSES": (1, 16), "GPU_WORKER_THREADS": (1, 16), "NUM_CPU_LOADERS": (1, 32),
    "BATCH_SIZE": (1, 256), "MAX_BUFFER_SLOTS": (2, 4096), "REC_CHUNK_SIZE": (1, 1024),
    "DET_SIZE": (32, 4096), "PRE_UPSCALE_FACTOR": (1.0, 4.0), "det_prob_threshold": (0.0, 1.0),
    "BOX_PADDING_PERCENTAGE": (0, 100), "CUSTOM_THRESHOLD": (0.0, 2.0), "MATCH_MARGIN": (0.0, 2.0),
    "MIN_TRACK_HITS": (1, 100), "MIN_FACE_SIZE": (0, 1000), "RECOGNITION_INTERVAL": (1, 1000),
    "TRACK_MAX_GAP": (0.0, 60.0), "FRAME_INTERVAL": (1, 1000),
    "CLIP_DURATION_BEFORE": (0.0, 600.0), "CLIP_DURATION_AFTER": (0.0, 600.0),
    "MERGE_GAP_TOLERANCE": (0.0, 3600.0), "UNNAMED_MIN_FACE_SIZE": (0, 1000),
    "UNNAMED_MIN_LOOKS": (1, 100), "UNNAMED_MIN_TRACKS": (1, 1000), "PROVIDERS": tuple(PROVIDER_ORDER),
    "CLIP_MODE": ("accurate", "fast"), "GPU_DEVICE_IDS": (0, 63), "FRAMES_ON_DEVICE": ("auto", "on", "off"),
}
_FLAG_ALIASES = {"VIDEO_DIR": ["--videos"], "REFERENCE_DIR": ["--refs"], "OUTPUT_DIR": ["--output"],
                 "INDEX_DIR": [],
                 "MODEL_ROOT": [], "MODEL_PACK_NAME": ["--model-pack"], "PROVIDERS": [],
                 "RAY_ADDRESS": ["--ray"]}
_NEGATING_FLAGS = {"RESUME": ("--force", "index every video again and make every snapshot and clip "
                                          "again (the same as --no-resume)")}


def flag_name(setting: str) -> str:
    """Return the command-line flag spelled from a setting's name (DET_SIZE -> --det-size)."""
    return "--" + setting.lower().replace("_", "-")


@lru_cache(maxsize=4)
def setting_comments(block_file: Path, names: tuple) -> dict:
    """Return each setting's inline comment from the settings block in block_file (main.py), for
    --help."""
    comments = {}
    for line in Path(block_file).read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*) = .*?  # (.*)$", line)
        if match and match.group(1) in names:
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


def build_arg_parser(defaults: dict, comments: dict) -> argparse.ArgumentParser:
    """Return the parser: one flag per setting (defaults: the settings block's values by name,
    comments: their help texts), plus aliases and --providers."""
    parser = argparse.ArgumentParser(
        description="Find the people in samples_jpg/ inside the videos in in_video/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, default in defaults.items():
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
    parser.add_argument("--index-only", action="store_true",
                        help="only build the indexes of the videos in INDEX_DIR (no photos needed, "
                             "nothing written to OUTPUT_DIR): a later search takes seconds")
    parser.add_argument("--reindex", action="store_true",
                        help="index every video again, even where INDEX_DIR has a current index")
    parser.add_argument("--people", action="store_true",
                        help="print the unnamed people the last search in OUTPUT_DIR found (id, "
                             "screen time, videos); writes nothing")
    parser.add_argument("--name-person", metavar="ID=Name",
                        help="save unnamed person ID's best face as REFERENCE_DIR/Name.jpg, then "
                             "search (the index is reused: seconds)")
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
    if not valid_ray_address(values.get("RAY_ADDRESS", "")):
        raise ValueError(f"--ray must be empty (this machine), local, auto, ray://host:port or "
                         f"host:port, got {values['RAY_ADDRESS']!r}")


def valid_ray_address(address: str) -> bool:
    """Return True for a RAY_ADDRESS Ray can be given: '' (no Ray), 'local', 'auto',
    'ray://host[:port]' (Ray Client) or 'host:port' (a head node's GCS)."""
    return address in ("", "local", "auto") or bool(
        re.fullmatch(r"(ray://[^\s:/]+(:\d+)?|[^\s:/]+:\d+)", address))


def settings_from_args(args: argparse.Namespace, names: tuple) -> Settings:
    """Return validated Settings (the named settings, in that order) from parsed arguments; raise
    ValueError naming a bad flag."""
    values = {name: getattr(args, name) for name in names}
    values["DET_SIZE"] = tuple(values["DET_SIZE"])
    values["GPU_DEVICE_IDS"] = tuple(values["GPU_DEVICE_IDS"])
    validate_settings(values)
    return Settings(tuple(values.items()))


def changed_settings(settings: Settings, defaults: dict) -> dict:
    """Return the settings whose values differ from the block's defaults (by name)."""
    return {k: v for k, v in settings.values.items() if defaults[k] != v}
