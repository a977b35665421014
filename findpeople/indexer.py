"""Indexer: what runs on a Ray node (--ray): the actor that indexes videos with the pipeline.

Runs in Ray workers on any node; imported by cluster.py, which drives them. A `NodeIndexer`
actor keeps one pipeline of this package (pipeline.py: decoders, workers, ring, tracker, the
models loaded once) for every video it is given, one at a time, and returns each video's face
tracks and counts: what the driver's RunState needs to make, write and search its index. It
posts its progress to the driver's `ProgressBoard`. `node_facts` tells the driver what a node
is and lacks before any video is sent.
"""
from __future__ import annotations

import dataclasses
import socket
import time
import uuid
from pathlib import Path

from .errors import BadInput
from .settings import Settings
from .models import classify_pack_models, find_model_pack
from .index import model_sha256
from .resume import execution_fingerprint
from .runstate import RunState
from .pipeline import end_jobs, follow_children, shutdown_pipeline, start_pipeline

RELAY_EVERY_S = 0.5  # a node sends its frame count at most this often


def this_node() -> dict:
    """Return which node this Ray worker runs on: its id, host name, IP and the GPUs Ray gave it."""
    import ray
    return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(), "task_gpus": [str(g) for g in ray.get_gpu_ids()]}


def node_label(facts: dict) -> str:
    """Return a node as people read it: 'host (node 1a2b3c4d)' (nodes on one machine share a host)."""
    return f"{facts['host']} (node {facts['node'][:8]})"


def node_settings(settings: Settings) -> Settings:
    """Return the settings a node receives: relative folders resolved against this machine's
    working directory (a node's differs: every node needs the same absolute paths, see
    docs/cluster.md), '~' left for the node's home, and every GPU Ray gives the actor."""
    values = dict(settings.values)
    for name in ("VIDEO_DIR", "MODEL_ROOT", "TRT_CACHE_DIR", "debug_det_dir"):
        if not str(values[name]).startswith("~"):
            values[name] = str(Path(values[name]).resolve())
    values["GPU_DEVICE_IDS"] = ()
    return Settings(tuple(values.items()))


def pack_sha256(settings: Settings) -> dict:
    """Return the SHA-256 of the model pack's files on this node (raise BadInput without it)."""
    return model_sha256(list(classify_pack_models(find_model_pack(settings.MODEL_ROOT,
                                                                  settings.MODEL_PACK_NAME))))


def node_facts(settings: Settings) -> dict:
    """Ray task on one node: what it is and what it lacks to index (the model pack, the video
    folder), with its model files' SHA-256 and what runs the models there."""
    facts = {**this_node(), "problems": [], "models": None}
    try:
        facts["models"] = pack_sha256(settings)
    except BadInput as error:
        facts["problems"].append(str(error))
    if not Path(settings.VIDEO_DIR).is_dir():
        facts["problems"].append(f"the video folder {settings.VIDEO_DIR} is not there: every node "
                                 f"needs it at the same path (a shared folder)")
    facts["execution"] = execution_fingerprint(settings)
    return facts


class NodeRunState(RunState):
    """The run state of an indexer: the tracks of each video are kept for the driver, which
    makes and writes the index (no INDEX_DIR on a node, no search, no outputs)."""

    def finish_index(self, result) -> None:
        """Keep the tracks (the driver's RunState.finish_index makes the index of them)."""


class ProgressBoard:
    """Ray actor on the driver's node: the indexers post their events here, the driver takes them."""

    def __init__(self):
        self.events = []

    def post(self, event: tuple) -> None:
        """Keep one event: (kind, video_idx, attempt, payload)."""
        self.events.append(event)

    def take(self) -> list:
        """Return the events posted since the last take."""
        events, self.events = self.events, []
        return events


class RelayBar:
    """Stands in for one of the pipeline's tqdm bars on a node: the frames bar posts its new
    frames (at most every RELAY_EVERY_S) and every note to the ProgressBoard."""

    def __init__(self, board, key: tuple | None = None):
        self.board, self.key, self.n, self.desc = board, key, 0, ""
        self.unsent, self.sent_at = 0, time.monotonic()

    def set_description_str(self, text: str, refresh: bool = False) -> None:
        self.desc = text

    def update(self, count: int) -> None:
        self.n += count
        self.unsent += count
        if time.monotonic() - self.sent_at >= RELAY_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.unsent and self.key is not None:
            self.board.post.remote(("frames", *self.key, self.unsent))
        self.unsent, self.sent_at = 0, time.monotonic()

    def write(self, text: str) -> None:
        if self.key is not None:
            self.board.post.remote(("note", *self.key, text))

    def close(self) -> None:
        self.flush()


class NodeIndexer:
    """Ray actor: one pipeline on its node, started at the first video and kept (its processes
    and loaded models) for the next ones, until close(). A video whose pipeline breaks stops
    the pipeline (the next video starts a new one) and raises PipelineBroken."""

    def __init__(self, settings: Settings, videos: list, board):
        self.settings, self.board = settings, board
        self.state = NodeRunState(videos, settings, None, {"people": []})
        self.pipe, self.bars = None, {"videos": RelayBar(board), "frames": RelayBar(board)}

    def node(self) -> dict:
        """Return this_node() (the driver's sign that the actor is placed and started)."""
        return this_node()

    def index(self, video_idx: int) -> dict:
        """Index one video (its frames through this actor's pipeline); return its tracks and
        counts, which node did it and how it ran the models. Its file missing here is BadInput;
        ray.cancel stops it (KeyboardInterrupt) and the pipeline."""
        result, node, attempt = self.state.results[video_idx], this_node(), uuid.uuid4().hex[:12]
        self.board.post.remote(("start", video_idx, attempt, node))
        if not Path(result.info.path).is_file():
            raise BadInput(f"{result.info.path}: not found on node {node_label(node)}: every node "
                           f"needs the video folder at the same path (docs/cluster.md)")
        self.state.results[video_idx] = result = dataclasses.replace(
            result, tracks=[], errors=[], finished=False, tracked=False, sent_frame_count=None,
            processed_frame_count=0)
        self.bars["frames"] = RelayBar(self.board, (video_idx, attempt))
        try:
            if self.pipe is None:
                self.pipe = start_pipeline(self.settings, [r.info for r in self.state.results], [],
                                           open_ended=True)
            self.pipe.jobs_q.put(result.info)
            follow_children(self.state, self.pipe, self.bars, until=lambda: stopped(result))
        except BaseException:
            self.close()
            raise
        finally:
            self.bars["frames"].close()
        outcome = {"attempt": attempt, "node": node, "tracks": result.tracks,
                   "processed_frames": result.processed_frame_count, "sent_frames": result.sent_frame_count,
                   "face_counts": result.face_counts, "errors": result.errors, "stages": self.state.stages,
                   "models": pack_sha256(self.settings), "execution": execution_fingerprint(self.settings)}
        result.tracks = []
        return outcome

    def close(self) -> None:
        """Stop the pipeline: its children end after their last video, then are joined (and
        terminated if they linger); its ring is freed."""
        pipe, self.pipe = self.pipe, None
        if pipe is None:
            return
        try:
            end_jobs(pipe, self.settings)
            follow_children(self.state, pipe, self.bars, until=lambda: stopped(None))
        except BaseException:  # broken or interrupted: shutdown_pipeline stops what is left
            pass
        finally:
            shutdown_pipeline(pipe)


def stopped(result) -> bool:
    """Return True when result's video is indexed; raise KeyboardInterrupt once the driver has
    cancelled the call (ray.cancel sets a flag in an actor: nothing interrupts it)."""
    import ray
    if ray.get_runtime_context().is_canceled():
        raise KeyboardInterrupt
    return result is not None and result.finished
