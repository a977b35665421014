"""Cluster: the index stage on a Ray cluster (RAY_ADDRESS, --ray), one Ray task per video.

Runs in the parent (the Ray driver) and, for `index_on_node` and `node_facts`, in Ray workers on
any node. Each video that needs an index is one Ray task, which runs this package's own pipeline
(pipeline.run_pipeline: decoders, workers, ring, tracker) for that one video on its node and
returns the video's face tracks through Ray's object store. The driver then makes, writes and
searches the index exactly as a local run does (runstate.finish_index and the finisher thread),
so the driver is the only writer of INDEX_DIR and OUTPUT_DIR: a node lost midway has written
nothing, and Ray runs the task again on another node. Progress reaches the driver through a
small actor on the driver's node (ProgressBoard).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import socket
import threading
import time
import uuid
from pathlib import Path

from .errors import BadInput, OutputError, PipelineBroken
from .settings import Settings
from .models import classify_pack_models, find_model_pack
from .index import model_sha256
from .resume import execution_fingerprint, execution_text
from .runstate import RunState
from .pipeline import finish_clips, progress_bars, run_pipeline

RAY_INSTALL = "pip install -r requirements-ray.txt"
TASK_RETRIES = 3  # more tries of a video whose node, worker process or pipeline process was lost
POLL_S = 0.5  # how often the driver looks at the tasks and the progress board
CANCEL_WAIT_S = 20.0  # how long Ctrl-C waits for the cancelled tasks to stop their processes
RELAY_EVERY_S = 0.5  # a task sends its frame count at most this often


def import_ray(address: str):
    """Return the ray module; raise BadInput with the pip command when Ray is not installed."""
    try:
        import ray
    except ImportError:
        raise BadInput(f"--ray {address} needs Ray, which is not installed in this Python: "
                       f"{RAY_INSTALL} (every node needs it too; docs/cluster.md), or leave "
                       f"RAY_ADDRESS empty to index on this machine alone") from None
    return ray


@dataclasses.dataclass
class Cluster:
    """The driver's view of the Ray cluster of one run."""

    ray: object
    address: str
    nodes: list  # node_facts of every alive node that can run a video, when the run started
    board: object = None  # the ProgressBoard actor
    tries: dict = dataclasses.field(default_factory=dict)  # video_idx -> [(attempt, node facts)]
    frames: dict = dataclasses.field(default_factory=dict)  # (video_idx, attempt) -> frames shown
    used: dict = dataclasses.field(default_factory=dict)  # node id -> {"node": facts, "videos": []}
    notes_seen: set = dataclasses.field(default_factory=set)
    done: set = dataclasses.field(default_factory=set)  # video_idx whose task has ended
    connect_s: float = 0.0  # s to join (or start) Ray and check the nodes
    times: dict = dataclasses.field(default_factory=dict)  # video_idx -> {event: driver's monotonic s}

    @property
    def executions(self) -> list:
        """Return the distinct execution fingerprints of the nodes (what runs the models)."""
        found = []
        for node in self.nodes:
            if node["execution"] not in found:
                found.append(node["execution"])
        return found


@contextlib.contextmanager
def ray_cluster(settings: Settings, model_paths: list):
    """Join (or with 'local' start) the Ray cluster of RAY_ADDRESS, check its nodes (node_facts)
    and yield a Cluster; always disconnect at the end, which stops a 'local' instance and leaves
    a running cluster as it was."""
    ray = import_ray(settings.RAY_ADDRESS)
    started = time.monotonic()
    connect(ray, settings.RAY_ADDRESS)
    try:
        cluster = Cluster(ray, settings.RAY_ADDRESS, check_nodes(ray, settings, model_paths))
        cluster.connect_s = round(time.monotonic() - started, 3)
        yield cluster
    finally:
        ray.shutdown()


def connect(ray, address: str) -> None:
    """ray.init for RAY_ADDRESS; this package travels with the job (runtime_env py_modules), so a
    node needs only the requirements; raise BadInput when there is no cluster there."""
    options = {"logging_level": logging.WARNING, "log_to_driver": False,
               "runtime_env": {"py_modules": [str(Path(__file__).resolve().parent)]}}
    print(f"[*] Ray: {'starting a Ray instance on this machine' if address == 'local' else f'joining {address}'}")
    try:
        if address == "local":
            ray.init(include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        raise BadInput(f"no Ray cluster at --ray {address} ({str(error).splitlines()[0]}): start one "
                       f"(ray start --head; docs/cluster.md), check the address, or use --ray local") from None


def check_nodes(ray, settings: Settings, model_paths: list) -> list:
    """Return node_facts of every alive node with a CPU, printing one line per node; raise
    BadInput naming each node that lacks what indexing needs (the models, the same model files
    as this machine, the video folder), or when no node can run a video."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    alive = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
    if not alive:
        raise BadInput(f"the Ray cluster at {settings.RAY_ADDRESS} has no node with a CPU to index on")
    probe = ray.remote(num_cpus=0)(node_facts)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(node_settings(settings)) for n in alive]
    nodes, problems = [], []
    expected = model_sha256(model_paths)
    for node, facts in zip(alive, ray.get(refs)):
        facts["cpus"], facts["gpus"] = node["Resources"].get("CPU", 0), node["Resources"].get("GPU", 0)
        if facts.get("models") not in (None, expected):
            facts["problems"].append(f"its model files differ from this machine's in "
                                     f"{settings.MODEL_ROOT}: copy the same {settings.MODEL_PACK_NAME} pack there")
        problems += [f"node {node_label(facts)}: {p}" for p in facts["problems"]]
        print(f"[*] Ray node {node_label(facts)}: {facts['cpus']:g} CPU(s), {facts['gpus']:g} GPU(s), "
              f"{execution_text(facts['execution'])}")
        nodes.append(facts)
    if problems:
        raise BadInput("Ray nodes that cannot index (fix them or take them out of the cluster; "
                       "docs/cluster.md):\n    - " + "\n    - ".join(problems))
    return nodes


def node_settings(settings: Settings) -> Settings:
    """Return the settings a node receives: relative folders resolved against this machine's
    working directory (a node's differs: every node needs the same absolute paths, see
    docs/cluster.md), '~' left for the node's home, and every GPU Ray gives the task."""
    values = dict(settings.values)
    for name in ("VIDEO_DIR", "MODEL_ROOT", "TRT_CACHE_DIR", "debug_det_dir"):
        if not str(values[name]).startswith("~"):
            values[name] = str(Path(values[name]).resolve())
    values["GPU_DEVICE_IDS"] = ()
    return Settings(tuple(values.items()))


def this_node() -> dict:
    """Return which node this Ray worker runs on: its id, host name, IP and the GPUs Ray gave it."""
    import ray
    return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(), "task_gpus": [str(g) for g in ray.get_gpu_ids()]}


def node_label(facts: dict) -> str:
    """Return a node as people read it: 'host (node 1a2b3c4d)' (nodes on one machine share a host)."""
    return f"{facts['host']} (node {facts['node'][:8]})"


def node_facts(settings: Settings) -> dict:
    """Ray task on one node: what it is and what it lacks to index (the model pack, the video
    folder), with its model files' SHA-256 and what runs the models there."""
    facts = {**this_node(), "problems": [], "models": None}
    try:
        facts["models"] = model_sha256(list(classify_pack_models(
            find_model_pack(settings.MODEL_ROOT, settings.MODEL_PACK_NAME))))
    except BadInput as error:
        facts["problems"].append(str(error))
    if not Path(settings.VIDEO_DIR).is_dir():
        facts["problems"].append(f"the video folder {settings.VIDEO_DIR} is not there: every node "
                                 f"needs it at the same path (a shared folder)")
    facts["execution"] = execution_fingerprint(settings)
    return facts


class NodeRunState(RunState):
    """The run state of one video's task on a node: its tracks are kept for the driver, which
    makes and writes the index (no INDEX_DIR on the node)."""

    def finish_index(self, result) -> None:
        """Keep the tracks (the driver's RunState.finish_index makes the index of them)."""


class ProgressBoard:
    """Ray actor on the driver's node: the tasks post their events here, the driver takes them."""

    def __init__(self):
        self.events = []

    def post(self, event: tuple) -> None:
        self.events.append(event)

    def take(self) -> list:
        events, self.events = self.events, []
        return events


class RelayBar:
    """Stands in for one of run_pipeline's tqdm bars in a Ray task: the frames bar posts its new
    frames (at most every RELAY_EVERY_S) and every note to the ProgressBoard."""

    def __init__(self, board, key: tuple | None):
        self.board, self.key, self.n, self.desc = board, key, 0, ""
        self.unsent, self.sent_at = 0, time.monotonic()

    def set_description_str(self, text: str, refresh: bool = False) -> None:
        self.desc = text

    def update(self, count: int) -> None:
        self.n += count
        self.unsent += count
        if self.key is not None and time.monotonic() - self.sent_at >= RELAY_EVERY_S:
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


def index_on_node(settings: Settings, info, board) -> dict:
    """Ray task: index one video with the pipeline on this node; return its tracks and counts
    (what the driver's RunState needs to make its index), which node did it and how it ran the
    models. A video file missing there is BadInput (not retried)."""
    node, attempt = this_node(), uuid.uuid4().hex[:12]
    board.post.remote(("start", info.idx, attempt, node))
    if not Path(info.path).is_file():
        raise BadInput(f"{info.path}: not found on node {node_label(node)}: every node needs the "
                       f"video folder at the same path (docs/cluster.md)")
    state = NodeRunState([dataclasses.replace(info, idx=0)], settings, None, {"people": []})
    run_pipeline(state, lambda *_: {"videos": RelayBar(board, None),
                                    "frames": RelayBar(board, (info.idx, attempt))})
    result = state.results[0]
    return {"attempt": attempt, "node": node, "tracks": result.tracks,
            "processed_frames": result.processed_frame_count, "sent_frames": result.sent_frame_count,
            "face_counts": result.face_counts, "errors": result.errors, "stages": state.stages,
            "models": model_sha256(list(classify_pack_models(
                find_model_pack(settings.MODEL_ROOT, settings.MODEL_PACK_NAME)))),
            "execution": execution_fingerprint(settings)}


def task_resources(settings: Settings, nodes: list) -> dict:
    """Return what one video's task asks Ray for: a GPU per worker process where the nodes run
    the models on GPUs, else a CPU per decoder and worker process; never more than the largest
    node has (Ray would wait for ever)."""
    on_gpu = any(n["gpus"] and n["execution"]["providers"][0] != "CPUExecutionProvider" for n in nodes)
    most_cpus = max(int(n["cpus"]) for n in nodes)
    if on_gpu:
        most_gpus = max(int(n["gpus"]) for n in nodes)
        return {"num_gpus": min(settings.NUM_GPU_PROCESSES, most_gpus),
                "num_cpus": min(settings.NUM_CPU_LOADERS, most_cpus)}
    return {"num_cpus": min(settings.NUM_CPU_LOADERS + settings.NUM_GPU_PROCESSES, most_cpus)}


def start_board(ray):
    """Start the ProgressBoard actor on the driver's node (anywhere, for a Ray Client driver)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    actor = ray.remote(num_cpus=0)(ProgressBoard)
    try:
        strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        return actor.options(scheduling_strategy=strategy).remote()
    except Exception:  # a Ray Client driver has no node of its own
        return actor.remote()


def index_on_cluster(state: RunState, cluster: Cluster) -> None:
    """Index every video whose index is not reused, one Ray task each, while the finisher thread
    searches and finishes each video as its tracks arrive (the reused ones first): the cluster's
    run_pipeline. On Ctrl-C or an error the tasks still running are cancelled and waited for."""
    jobs = [r for r in state.results if not r.index_reused]
    started, pending, bars, finished = time.monotonic(), {}, {}, False
    finisher = threading.Thread(target=state.finish_videos, name="finisher", daemon=True)
    finisher.start()
    try:
        if jobs:
            bars = progress_bars(state, [r.info for r in jobs])
            cluster.board = start_board(cluster.ray)
            pending = submit_videos(state, cluster, jobs)
            follow_tasks(state, cluster, pending, bars)
        finished = True
    finally:
        if jobs:
            state.index_s = round(time.monotonic() - started, 3)
        if not finished:
            state.stop_clips.set()
            stop_tasks(cluster.ray, pending)
        for bar in bars.values():
            bar.close()
        state.cluster = cluster_report(state, cluster)
        finish_clips(state, finisher)


def submit_videos(state: RunState, cluster: Cluster, jobs: list) -> dict:
    """Submit one task per video, longest first (a long video started last would finish
    alone); return {ObjectRef: VideoResult}."""
    resources = task_resources(state.settings, cluster.nodes)
    task = cluster.ray.remote(index_on_node).options(
        max_retries=TASK_RETRIES, retry_exceptions=[PipelineBroken], **resources)
    settings = node_settings(state.settings)
    refs = {}
    for result in sorted(jobs, key=lambda r: -r.info.frame_count):
        info = dataclasses.replace(result.info, path=str(Path(result.info.path).resolve()))
        refs[task.remote(settings, info, cluster.board)] = result
        cluster.times[result.info.idx] = {"submitted": time.monotonic()}
    return refs


def follow_tasks(state: RunState, cluster: Cluster, pending: dict, bars: dict) -> None:
    """Until every task has ended: show the board's events, hand each finished video to the
    run state; raise OutputError when a file in OUTPUT_DIR could not be written."""
    ray = cluster.ray
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
        show_events(state, cluster, ray.get(cluster.board.take.remote()), bars)
        for ref in ready:
            take_outcome(state, cluster, pending.pop(ref), ref, bars)
        if state.write_error:
            raise OutputError(state.write_error)


def show_events(state: RunState, cluster: Cluster, events: list, bars: dict) -> None:
    """Apply the tasks' events: a try started (the per-video line, with its node; a new try
    takes back the frames of the lost one), frames processed, notes (each once per node)."""
    for kind, video_idx, attempt, payload in events:
        name = Path(state.results[video_idx].info.path).name
        if kind == "start":
            tries = cluster.tries.setdefault(video_idx, [])
            for lost, _ in tries:
                bars["frames"].update(-cluster.frames.pop((video_idx, lost), 0))
            tries.append((attempt, payload))
            cluster.times[video_idx].update(started=time.monotonic(), first_frames=None)
            again = f", try {len(tries)} (the try before was lost)" if len(tries) > 1 else ""
            bars["frames"].write(f"[{'!' if again else '*'}] {name}: indexing on {node_label(payload)}{again}")
        elif kind == "frames" and video_idx not in cluster.done:  # a late post after the outcome
            cluster.frames[(video_idx, attempt)] = cluster.frames.get((video_idx, attempt), 0) + payload
            cluster.times[video_idx]["first_frames"] = cluster.times[video_idx].get("first_frames") or time.monotonic()
            bars["frames"].update(payload)
        elif kind == "note":
            node = dict(cluster.tries.get(video_idx, [])).get(attempt)
            where = node_label(node) if node else "a node"
            mark, text = (payload[:3], payload[4:]) if re.match(r"\[.\] ", payload) else ("[*]", payload)
            if (where, text) not in cluster.notes_seen:
                cluster.notes_seen.add((where, text))
                bars["frames"].write(f"{mark} {where}: {text}")


def take_outcome(state: RunState, cluster: Cluster, result, ref, bars: dict) -> None:
    """Hand a finished task's tracks to the run state (which writes the index and queues the
    search), or record why the video could not be indexed."""
    try:
        outcome = cluster.ray.get(ref)
    except cluster.ray.exceptions.RayError as error:
        cluster.done.add(result.info.idx)
        fail_video(state, result, task_failure(cluster.ray, error), bars)
        return
    show_events(state, cluster, cluster.ray.get(cluster.board.take.remote()), bars)
    cluster.done.add(result.info.idx)
    cluster.times[result.info.idx]["done"] = time.monotonic()
    shown = sum(n for (v, _), n in cluster.frames.items() if v == result.info.idx)
    bars["frames"].update(outcome["processed_frames"] - shown)  # a lost try's, and unsent frames
    with state.lock:
        apply_outcome(state, result, outcome)
    entry = cluster.used.setdefault(outcome["node"]["node"], {"node": outcome["node"], "videos": []})
    entry["videos"].append(result.info.path)
    tries = len(cluster.tries.get(result.info.idx, [])) or 1
    bars["frames"].write(f"[*] {Path(result.info.path).name}: indexed on {node_label(outcome['node'])}"
                         f" ({outcome['processed_frames']} frames{f', {tries} tries' if tries > 1 else ''})")


def apply_outcome(state: RunState, result, outcome: dict) -> None:
    """Put a task's tracks into the video's result as a local worker's messages would, with the
    node's model files and providers in the index's identity (the truth of who made it)."""
    idx = result.info.idx
    if idx in state.identities:
        state.identities[idx] = {**state.identities[idx], "models": outcome["models"],
                                 "execution": outcome["execution"]}
    result.tracks = list(outcome["tracks"])
    result.processed_frame_count = outcome["processed_frames"]
    node = node_label(outcome["node"])
    for name, clock in outcome["stages"].items():
        state.stages[f"{node} {name}"] = clock
    for error in outcome["errors"]:
        result.errors.append(error)
        state.failures.append(error)
    state.video_tracked(idx, outcome["face_counts"])
    state.video_decoded(idx, outcome["sent_frames"], None)


def task_failure(ray, error) -> str:
    """Return why a video's task failed for good, in words: the video's own error (BadInput, a
    broken pipeline after every try), or what Ray says was lost."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause
        if isinstance(cause, BadInput):
            return str(cause)
        text = str(cause).strip().splitlines()
        return f"{text[0] if text else type(cause).__name__} ({TASK_RETRIES + 1} tries)"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''} ({TASK_RETRIES + 1} tries)"


def fail_video(state: RunState, result, why: str, bars: dict) -> None:
    """Record a video that could not be indexed on the cluster; the others go on."""
    message = why if why.startswith(str(result.info.path)) else f"{result.info.path}: not indexed: {why}"
    with state.lock:
        result.errors.append(message)
        state.failures.append(message)
    bars["frames"].write(f"[!] {message}")


def stop_tasks(ray, pending: dict) -> None:
    """Cancel the tasks still running (a KeyboardInterrupt in each: its pipeline stops its
    processes and frees its ring) and wait for them a little; the cluster stays usable."""
    if not pending:
        return
    for ref in pending:
        with contextlib.suppress(Exception):
            ray.cancel(ref)
    with contextlib.suppress(Exception):
        ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)


def cluster_report(state: RunState, cluster: Cluster) -> dict:
    """Return the cluster's part of results.json's stats: the address, the nodes that indexed
    a video (with their GPUs and videos) and the videos tried more than once."""
    return {"address": cluster.address, "nodes_in_cluster": len(cluster.nodes), "connect_s": cluster.connect_s,
            "nodes_used": [{"node": e["node"]["node"], "host": e["node"]["host"], "ip": e["node"]["ip"],
                            "gpus": e["node"]["task_gpus"], "videos": e["videos"]}
                           for e in cluster.used.values()],
            "gpus_used": len({(e["node"]["node"], g) for e in cluster.used.values()
                              for g in e["node"]["task_gpus"]}),
            "retried_videos": sorted(state.results[idx].info.path for idx, tries in cluster.tries.items()
                                     if len(tries) > 1),
            "videos": [video_times(state.results[idx].info.path, times) for idx, times in cluster.times.items()]}


def video_times(path: str, times: dict) -> dict:
    """Return a video's task times, seen from the driver: waited (submitted to started, the
    last try), started (to its first frames: the pipeline's start and model loading on the
    node, which a local run pays once, not per video) and indexed (to its tracks' arrival)."""
    def between(first, last):
        return round(times[last] - times[first], 3) if times.get(first) and times.get(last) else None
    return {"file": path, "wait_s": between("submitted", "started"),
            "startup_s": between("started", "first_frames"), "task_s": between("started", "done")}
