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
    other's last frames are processed). A broken pipeline is stopped (the next video starts a
    new one) and each video in it raises PipelineBroken."""

    def __init__(self, settings: Settings, videos: list, board):
        self.settings, self.board, self.where = settings, board, this_node()
        self.state = NodeRunState(videos, settings, None, {"people": []})
        self.pipe, self.lock, self.attempts, self.closing = None, threading.Lock(), {}, False
        self.bars = {"videos": RelayBar(board), "frames": RelayBar(board, self)}

    def node(self) -> dict:
        """Return this_node() (the driver's sign that the actor is placed and started)."""
        return self.where

    def progress(self) -> dict:
        """Return {video_idx: (attempt, frames processed)} of the videos in progress."""
        return {idx: (attempt, self.state.results[idx].processed_frame_count)
                for idx, attempt in list(self.attempts.items())}

    def index(self, video_idx: int) -> dict:
        """Index one video (its frames through this actor's pipeline); return its tracks and
        counts, which node did it and how it ran the models. Its file missing here is BadInput;
        ray.cancel or close() stop it (KeyboardInterrupt) and the pipeline."""
        attempt, info = uuid.uuid4().hex[:12], self.state.results[video_idx].info
        self.board.post.remote(("start", video_idx, attempt, self.where))
        if not Path(info.path).is_file():
            raise BadInput(f"{info.path}: not found on node {node_label(self.where)}: every node "
                           f"needs the video folder at the same path (docs/cluster.md)")
        with self.lock:
            self.state.results[video_idx] = result = dataclasses.replace(
                self.state.results[video_idx], tracks=[], errors=[], finished=False, tracked=False,
                sent_frame_count=None, processed_frame_count=0)
            self.attempts[video_idx] = attempt
            if self.pipe is None:
                self.pipe = start_pipeline(self.settings, [r.info for r in self.state.results], [],
                                           open_ended=True)
            pipe = self.pipe
            pipe.jobs_q.put(info)
        try:
            follow_children(self.state, pipe, self.bars, until=lambda: self.stopped(result))
        except BaseException:
            self.stop(pipe)
            raise
        finally:
            self.bars["frames"].flush()
            self.attempts.pop(video_idx, None)
        outcome = {"attempt": attempt, "node": self.where, "tracks": result.tracks,
                   "processed_frames": result.processed_frame_count, "sent_frames": result.sent_frame_count,
                   "face_counts": result.face_counts, "errors": result.errors, "stages": dict(self.state.stages),
                   "models": pack_sha256(self.settings), "execution": execution_fingerprint(self.settings)}
        result.tracks = []
        return outcome

    def stop(self, pipe) -> None:
        """Stop a broken or interrupted pipeline at once (once, whichever call sees it first)."""
        with self.lock:
            if pipe is None or self.pipe is not pipe:
                return
            self.pipe = None
        shutdown_pipeline(pipe)

    def stopped(self, result) -> bool:
        """Return True once result's video is indexed; raise KeyboardInterrupt once the driver
        has cancelled the call or closes the actor (a flag in an actor: nothing interrupts it)."""
        import ray
        if self.closing or ray.get_runtime_context().is_canceled():
            raise KeyboardInterrupt
        return result.finished

    def close(self) -> None:
        """Stop the pipeline: after the last video its children end and are joined (terminated
        if they linger); while videos are in progress (a run stopped midway) at once, and those
        calls end with KeyboardInterrupt. Its ring is freed either way."""
        self.closing = True
        with self.lock:
            pipe, self.pipe, busy = self.pipe, None, bool(self.attempts)
        if pipe is None:
            return
        try:
            if not busy:
                end_jobs(pipe, self.settings)
                follow_children(self.state, pipe, self.bars)
        except BaseException:  # broken: shutdown_pipeline stops what is left
            pass
        finally:
            shutdown_pipeline(pipe)
