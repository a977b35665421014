"""Indexer: what runs on a Ray node (--ray): the actor that indexes videos with the pipeline.

Runs in Ray workers on any node; imported by cluster.py, which drives them. A `NodeIndexer`
actor keeps one pipeline of this package (pipeline.py: decoders, workers, ring, tracker, the
models loaded once) for every video it is given, one at a time, and returns each video's face
tracks and counts: what the driver's RunState needs to make, write and search its index. It
posts its progress to the driver's `ProgressBoard`. `node_facts` tells the driver what a node
is and lacks before any video is sent.
"""
from __future__ import annotations

import socket
import threading
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
    try:
        facts["execution"] = execution_fingerprint(settings)
    except Exception as error:  # onnxruntime missing or broken there
        facts["execution"] = None
        facts["problems"].append(f"onnxruntime does not load there ({type(error).__name__}: {error}): "
                                 f"install the requirements")
    return facts


class NodeRunState(RunState):
    """The run state of one pipeline of an indexer: a video is finished when its frames are all
    tracked, and its tracks are kept for the driver, which makes and writes the index (no
    INDEX_DIR on a node, no finisher thread, no search, no outputs)."""

    def maybe_finish(self, video_idx: int) -> None:
        """Mark a video finished once every frame its decoder sent has been tracked."""
        result = self.results[video_idx]
        if result.sent_frame_count is not None and result.tracked:
            result.finished = True


class Stopped(Exception):
    """An indexer's call stopped by the driver (ray.cancel, or close() while videos run)."""


class ProgressBoard:
    """Ray actor on the driver's node: the indexers post their events here, the driver takes them."""

    def __init__(self):
        self.events = []

    def post(self, event: tuple) -> None:
        """Keep one event: ("start", video_idx, attempt, node), ("frames", {video_idx: (attempt,
        frames)}) or ("note", node, text)."""
        self.events.append(event)

    def take(self) -> list:
        """Return the events posted since the last take."""
        events, self.events = self.events, []
        return events


class RelayBar:
    """Stands in for one of the pipeline's tqdm bars in an indexer: the frames bar posts the
    frame counts of the indexer's videos in progress (at most every RELAY_EVERY_S), and notes,
    to the ProgressBoard; the videos bar (indexer None) posts nothing."""

    def __init__(self, board, indexer=None):
        self.board, self.indexer, self.n, self.desc = board, indexer, 0, ""
        self.sent_at = time.monotonic()

    def set_description_str(self, text: str, refresh: bool = False) -> None:
        self.desc = text

    def update(self, count: int) -> None:
        self.n += count
        if time.monotonic() - self.sent_at >= RELAY_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.indexer is not None:
            self.board.post.remote(("frames", self.indexer.progress()))
        self.sent_at = time.monotonic()

    def write(self, text: str) -> None:
        if self.indexer is not None:
            self.board.post.remote(("note", self.indexer.where, text))

    def close(self) -> None:
        self.flush()


class NodeIndexer:
    """Ray actor (threaded: a call per video in progress, and close): one pipeline on its node,
    started at the first video and kept, its processes and loaded models, for the next ones
    until close(). Two videos in progress overlap as in a local run (one is decoded while the
    other's last frames are processed). A broken pipeline is stopped and each video in it
    raises PipelineBroken; the next video starts a new pipeline with a run state of its own, so
    that nothing of the broken one can reach it."""

    def __init__(self, settings: Settings, videos: list, board):
        self.settings, self.videos, self.board, self.where = settings, videos, board, this_node()
        self.models, self.execution = pack_sha256(settings), execution_fingerprint(settings)
        self.pipe = self.state = None  # the pipeline and its own run state
        self.lock, self.attempts, self.closing = threading.Lock(), {}, False
        self.bars = {"videos": RelayBar(board), "frames": RelayBar(board, self)}

    def node(self) -> dict:
        """Return this_node() (the driver's sign that the actor is placed and started)."""
        return self.where

    def progress(self) -> dict:
        """Return {video_idx: (attempt, frames processed)} of the videos in progress."""
        state = self.state
        return {} if state is None else {idx: (attempt, state.results[idx].processed_frame_count)
                                         for idx, attempt in list(self.attempts.items())}

    def index(self, video_idx: int) -> dict:
        """Index one video (its frames through this actor's pipeline); return its tracks and
        counts, which node did it and how it ran the models. Its file missing here is BadInput;
        ray.cancel or close() stop it (Stopped) and the pipeline."""
        attempt, info = uuid.uuid4().hex[:12], self.videos[video_idx]
        self.board.post.remote(("start", video_idx, attempt, self.where))
        if not Path(info.path).is_file():
            raise BadInput(f"{info.path}: not found on node {node_label(self.where)}: every node "
                           f"needs the video folder at the same path (docs/cluster.md)")
        pipe, state = self.pipeline_for(info, attempt)
        result = state.results[video_idx]
        try:
            follow_children(state, pipe, self.bars, until=lambda: self.stopped(result))
        except BaseException:
            self.stop(pipe)
            raise
        finally:
            self.bars["frames"].flush()
            self.attempts.pop(video_idx, None)
        with state.lock:
            stages = dict(state.stages)
        outcome = {"attempt": attempt, "node": self.where, "tracks": result.tracks,
                   "processed_frames": result.processed_frame_count, "sent_frames": result.sent_frame_count,
                   "face_counts": result.face_counts, "errors": result.errors, "stages": stages,
                   "models": self.models, "execution": self.execution}
        result.tracks = []  # the driver has them now: an indexer's memory does not grow per video
        return outcome

    def pipeline_for(self, info, attempt: str) -> tuple:
        """Return (pipeline, its run state) with the video queued to it (and in progress under
        this attempt); start them if none runs."""
        with self.lock:
            if self.closing:
                raise Stopped("the indexer is closing")
            if self.pipe is None:
                state = NodeRunState(self.videos, self.settings, None, {"people": []})
                self.pipe = start_pipeline(self.settings, self.videos, [], open_ended=True)
                self.state = state
            self.pipe.jobs_q.put(info)
            self.attempts[info.idx] = attempt
            return self.pipe, self.state

    def stop(self, pipe) -> None:
        """Stop a broken or interrupted pipeline at once (once, whichever call sees it first)."""
        with self.lock:
            if pipe is None or self.pipe is not pipe:
                return
            self.pipe = None
        shutdown_pipeline(pipe)

    def stopped(self, result) -> bool:
        """Return True once result's video is indexed; raise Stopped once the driver has
        cancelled the call or closes the actor (in an actor, ray.cancel only sets a flag)."""
        import ray
        if self.closing or getattr(ray.get_runtime_context(), "is_canceled", lambda: False)():
            raise Stopped("stopped by the driver")
        return result.finished

    def close(self) -> None:
        """Stop the pipeline: after the last video its children end and are joined (terminated
        if they linger); while videos are in progress (a run stopped midway) at once, and those
        calls end with Stopped. Its ring is freed either way."""
        with self.lock:
            self.closing = True
            pipe, state, self.pipe, busy = self.pipe, self.state, None, bool(self.attempts)
        if pipe is None:
            return
        try:
            if not busy:
                end_jobs(pipe, self.settings)
                follow_children(state, pipe, self.bars)
        except BaseException:  # broken: shutdown_pipeline stops what is left
            pass
        finally:
            shutdown_pipeline(pipe)
