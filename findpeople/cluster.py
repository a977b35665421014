"""Cluster: the index stage on a Ray cluster (RAY_ADDRESS, --ray), driven from the parent.

Runs in the parent, which is the Ray driver. It joins (or starts) Ray, checks every node
(indexer.node_facts), starts as many indexer actors as the nodes have room for (each asks a GPU
per worker process, or CPUs) and gives each the next video, one Ray call per video; an indexer
keeps its pipeline and models loaded from one video to the next (indexer.NodeIndexer). A video's
face tracks come back through Ray's object store and the driver makes, writes and searches its
index exactly as a local run does (runstate.finish_index and the finisher thread): the driver is
the only writer of INDEX_DIR and OUTPUT_DIR, so a node lost midway has written nothing; its
video goes to another indexer. Progress reaches the driver through a small actor on the
driver's node (indexer.ProgressBoard).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path

from .errors import BadInput, OutputError, PipelineBroken
from .settings import Settings
from .index import model_sha256
from .resume import execution_text
from .runstate import RunState
from .pipeline import finish_clips, progress_bars
from .indexer import NodeIndexer, ProgressBoard, node_facts, node_label, node_settings

RAY_INSTALL = "pip install -r requirements-ray.txt"
TASK_RETRIES = 3  # more tries of a video whose node, indexer process or pipeline process was lost
POLL_S = 0.25  # how often the driver looks at the indexers and the progress board
CANCEL_WAIT_S = 20.0  # how long the end of a run waits for the indexers to stop their pipelines
CALLS_PER_INDEXER = 2  # videos given to an indexer at once: the next one is decoded meanwhile
PLACEMENT_WAIT_S = 600.0  # the waiting videos fail when no indexer could be placed for this long


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
    frames: dict = dataclasses.field(default_factory=dict)  # video_idx -> frames of its live try
    resources: dict = dataclasses.field(default_factory=dict)  # what each indexer asks (task_resources)
    used: dict = dataclasses.field(default_factory=dict)  # node id -> {"node": facts, "videos": []}
    notes_seen: set = dataclasses.field(default_factory=set)
    done: set = dataclasses.field(default_factory=set)  # video_idx whose task has ended
    connect_s: float = 0.0  # s to join (or start) Ray and check the nodes
    indexers: list = dataclasses.field(default_factory=list)  # NodeIndexer actors started
    starting: dict = dataclasses.field(default_factory=dict)  # node() ObjectRef -> indexer not yet placed
    calls: dict = dataclasses.field(default_factory=dict)  # index() ObjectRef -> (indexer, VideoResult)
    failed_tries: dict = dataclasses.field(default_factory=dict)  # video_idx -> tries that failed
    placed: list = dataclasses.field(default_factory=list)  # indexers that answered node()
    dead: list = dataclasses.field(default_factory=list)  # indexers lost (replaced once)
    node_of: dict = dataclasses.field(default_factory=dict)  # id(indexer) -> its node's id
    solo: dict = dataclasses.field(default_factory=dict)  # video_idx tried again -> its indexer, alone
    avoid: dict = dataclasses.field(default_factory=dict)  # video_idx -> node ids that could not index it
    start_error: str | None = None  # why the last indexer that failed to start failed
    waiting_since: float = 0.0  # since when no indexer has been placed or busy
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
    try:  # a Ctrl-C while a 'local' instance starts still stops it
        connect(ray, settings.RAY_ADDRESS)
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
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, **options)  # a new one, never a running one
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError, ray.exceptions.RayError) as error:
        token = "" if address in ("local", "auto") or os.environ.get("RAY_AUTH_MODE") else (
            "; a cluster with token authentication (Ray's default) also needs RAY_AUTH_MODE=token "
            "here, and its token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
        raise BadInput(f"no Ray cluster at --ray {address} ({str(error).splitlines()[0]}): start one "
                       f"(ray start --head; docs/cluster.md), check the address, or use --ray "
                       f"local{token}") from None
    finally:  # ray.init makes SIGTERM exit at once; it stops the run cleanly, as Ctrl-C does
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


def check_nodes(ray, settings: Settings, model_paths: list) -> list:
    """Return node_facts of every alive node with a CPU, printing one line per node; raise
    BadInput naming each node that lacks what indexing needs (the models, the same model files
    as this machine, the video folder), or when no node can run a video."""
    alive = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
    if not alive:
        raise BadInput(f"the Ray cluster at {settings.RAY_ADDRESS} has no node with a CPU to index on")
    nodes, problems = [], []
    expected = model_sha256(model_paths)
    for node, facts in zip(alive, probe_nodes(ray, settings, alive)):
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


def probe_nodes(ray, settings: Settings, alive: list) -> list:
    """Return node_facts of each node, from a task on it (with --ray local, of this machine,
    looked at here: its one node is this machine)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    if settings.RAY_ADDRESS == "local":
        return [node_facts(node_settings(settings))]
    probe = ray.remote(num_cpus=0)(node_facts)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(node_settings(settings)) for n in alive]
    found = []
    for node, ref in zip(alive, refs):
        try:
            found.append(ray.get(ref))
        except ray.exceptions.RayError as error:  # no package, a broken Python, the node lost
            raise BadInput(f"Ray node {node.get('NodeManagerHostname', '?')} (node {node['NodeID'][:8]}) "
                           f"cannot run this tool: {first_line(error)}; install the requirements "
                           f"there (docs/cluster.md)") from None
    return found


def first_line(error) -> str:
    """Return what a Ray error says, in one line: the message of the error raised on the node
    (a task's cause), else the first line of Ray's own message."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def task_resources(settings: Settings, nodes: list) -> dict:
    """Return what one indexer asks Ray for: a GPU per worker process and a CPU per decoder
    where the nodes run the models on GPUs, else a CPU per decoder and worker process; shaped
    to fit the node with the most GPUs (or CPUs), so that at least one node can hold it."""
    gpu_nodes = [n for n in nodes if n["gpus"] and n["execution"]["providers"][0] != "CPUExecutionProvider"]
    if gpu_nodes:
        best = max(gpu_nodes, key=lambda n: (n["gpus"], n["cpus"]))
        return {"num_gpus": min(settings.NUM_GPU_PROCESSES, int(best["gpus"])),
                "num_cpus": min(settings.NUM_CPU_LOADERS, int(best["cpus"]))}
    most_cpus = max(int(n["cpus"]) for n in nodes)
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
    """Index every video whose index is not reused on the cluster's indexers, while the
    finisher thread searches and finishes each video as its tracks arrive (the reused ones
    first): the cluster's run_pipeline. On Ctrl-C or an error the calls still running are
    cancelled and waited for; the indexers always stop their pipelines and end."""
    jobs = [r for r in state.results if not r.index_reused]
    started, bars, finished = time.monotonic(), {}, False
    finisher = threading.Thread(target=state.finish_videos, name="finisher", daemon=True)
    finisher.start()
    try:
        if jobs:
            bars = progress_bars(state, [r.info for r in jobs])
            cluster.board = start_board(cluster.ray)
            start_indexers(state, cluster, len(jobs))
            dispatch(state, cluster, sorted(jobs, key=lambda r: -r.info.frame_count), bars)
        finished = True
    except cluster.ray.exceptions.RayError as error:  # the cluster itself failed (its head lost)
        raise PipelineBroken("the Ray cluster", None, first_line(error)) from None
    finally:
        if jobs:
            state.index_s = round(time.monotonic() - started, 3)
        if not finished:
            state.stop_clips.set()
        try:
            stop_indexers(cluster)
        finally:
            for bar in bars.values():
                bar.close()
            state.cluster = cluster_report(state, cluster)
            finish_clips(state, finisher)


def start_indexers(state: RunState, cluster: Cluster, videos: int) -> None:
    """Start as many indexer actors as the nodes have room for (task_resources each, at most
    one per video), spread over the nodes; each is used once its node() call answers."""
    resources = cluster.resources = task_resources(state.settings, cluster.nodes)
    room = sum(min(int(n["cpus"] // max(resources["num_cpus"], 1)),
                   int(n["gpus"] // resources["num_gpus"]) if resources.get("num_gpus") else 1 << 30)
               for n in cluster.nodes)
    for _ in range(max(1, min(room, videos))):
        add_indexer(state, cluster)


def add_indexer(state: RunState, cluster: Cluster) -> None:
    """Start one indexer actor (Ray places it where its resources are free)."""
    actor = cluster.ray.remote(NodeIndexer).options(
        max_restarts=0, max_concurrency=CALLS_PER_INDEXER + 1, scheduling_strategy="SPREAD",
        **cluster.resources)  # + 1: close() runs beside the videos in progress
    videos = [dataclasses.replace(r.info, path=os.path.abspath(r.info.path)) for r in state.results]
    indexer = actor.remote(node_settings(state.settings), videos, cluster.board)
    cluster.indexers.append(indexer)
    cluster.starting[indexer.node.remote()] = indexer


def dispatch(state: RunState, cluster: Cluster, waiting: list, bars: dict) -> None:
    """Keep every placed indexer busy with up to CALLS_PER_INDEXER videos (longest first) until
    every video has ended: its tracks handed to the run state, or failed for good (take_outcome
    says when a video is tried again). Raise OutputError when OUTPUT_DIR cannot be written."""
    ray, calls = cluster.ray, cluster.calls
    cluster.waiting_since = time.monotonic()
    while waiting or calls:
        give_videos(cluster, waiting)
        refs = [*calls, *cluster.starting]
        ready = ray.wait(refs, num_returns=1, timeout=POLL_S)[0] if refs else []
        if ready:
            ready = ray.wait(refs, num_returns=len(refs), timeout=0)[0]
        show_events(state, cluster, take_events(cluster), bars)
        for ref in ready:
            take_ready(state, cluster, ref, waiting, bars)
        fail_unplaceable(state, cluster, waiting, bars)
        refresh_frames(cluster, bars)
        finished = sum(r.finished for r in state.results)
        bars["videos"].update(finished - bars["videos"].n)
        if state.write_error:
            raise OutputError(state.write_error)


def take_events(cluster: Cluster) -> list:
    """Return the board's events; none when it cannot be reached (only progress is lost)."""
    try:
        return cluster.ray.get(cluster.board.take.remote(), timeout=10)
    except Exception:
        return []


def give_videos(cluster: Cluster, waiting: list) -> None:
    """Give the waiting videos to the placed indexers, one each before a second each. A video
    tried before goes alone to an idle indexer (a video that breaks its pipeline takes no other
    down with it), on another node than those that could not index it, where there is one."""
    for level in range(CALLS_PER_INDEXER):
        for indexer in list(cluster.placed):
            busy = sum(1 for owner, _ in cluster.calls.values() if owner is indexer)
            if not waiting or busy > level or any(s is indexer for s in cluster.solo.values()):
                continue
            result = waiting[0]
            retry = cluster.failed_tries.get(result.info.idx, 0) > 0
            avoided = cluster.avoid.get(result.info.idx, set())
            elsewhere = any(cluster.node_of.get(id(i)) not in avoided for i in cluster.placed)
            if retry and (busy or (elsewhere and cluster.node_of.get(id(indexer)) in avoided)):
                continue
            waiting.pop(0)
            if retry:
                cluster.solo[result.info.idx] = indexer
            cluster.calls[indexer.index.remote(result.info.idx)] = (indexer, result)
            cluster.times.setdefault(result.info.idx, {})["submitted"] = time.monotonic()


def take_ready(state: RunState, cluster: Cluster, ref, waiting: list, bars: dict) -> None:
    """Take one finished Ray call: an indexer's node() (placed, or it failed to start) or a
    video's index() (take_outcome)."""
    ray = cluster.ray
    if ref in cluster.starting:
        indexer = cluster.starting.pop(ref)
        try:
            cluster.node_of[id(indexer)] = ray.get(ref)["node"]
            cluster.placed.append(indexer)
        except ray.exceptions.RayError as error:
            cluster.start_error = first_line(error)
        return
    indexer, result = cluster.calls.pop(ref)
    cluster.solo.pop(result.info.idx, None)
    if not take_outcome(state, cluster, indexer, result, ref, waiting, bars) and indexer in cluster.placed:
        cluster.placed.remove(indexer)


def fail_unplaceable(state: RunState, cluster: Cluster, waiting: list, bars: dict) -> None:
    """Fail the waiting videos when no indexer can take them: every one failed to start, or
    none has been placed for PLACEMENT_WAIT_S (no node has room for one)."""
    if cluster.placed or cluster.calls or not waiting:
        cluster.waiting_since = time.monotonic()
        return
    if cluster.starting and time.monotonic() - cluster.waiting_since < PLACEMENT_WAIT_S:
        return
    why = (f"no node had room for an indexer ({cluster.resources}) "
           f"for {PLACEMENT_WAIT_S:.0f} s" if cluster.starting else
           f"no indexer could start on the cluster ({cluster.start_error})")
    while waiting:
        result = waiting.pop(0)
        cluster.done.add(result.info.idx)
        fail_video(state, result, why, bars)


def take_outcome(state: RunState, cluster: Cluster, indexer, result, ref, waiting: list,
                 bars: dict) -> bool:
    """Hand an indexed video's tracks to the run state (which writes its index and queues its
    search), or queue it again, or record why it failed for good; return whether the indexer
    can take another video."""
    ray, idx = cluster.ray, result.info.idx
    try:
        outcome = ray.get(ref)
    except ray.exceptions.RayError as error:
        lost = not isinstance(error, ray.exceptions.RayTaskError)  # the actor died: its node or process
        cause = getattr(error, "cause", None)
        cluster.failed_tries[idx] = cluster.failed_tries.get(idx, 0) + 1
        if isinstance(cause, BadInput):  # this node cannot index it (its file not there)
            cluster.avoid.setdefault(idx, set()).add(cluster.node_of.get(id(indexer)))
        if (lost or isinstance(cause, (PipelineBroken, BadInput))) and cluster.failed_tries[idx] <= TASK_RETRIES:
            waiting.insert(0, result)
        else:
            cluster.done.add(idx)
            fail_video(state, result, task_failure(ray, error, cluster.failed_tries[idx]), bars)
        if lost and not any(d is indexer for d in cluster.dead):
            cluster.dead.append(indexer)
            add_indexer(state, cluster)
        return not lost
    show_events(state, cluster, take_events(cluster), bars)
    cluster.done.add(idx)
    cluster.times[idx]["done"] = time.monotonic()
    cluster.frames[idx] = outcome["processed_frames"]
    with state.lock:
        apply_outcome(state, result, outcome)
    entry = cluster.used.setdefault(outcome["node"]["node"], {"node": outcome["node"], "videos": [],
                                                              "gpus": set()})
    entry["videos"].append(result.info.path)
    entry["gpus"].update(outcome["node"]["task_gpus"])
    tries = len(cluster.tries.get(idx, [])) or 1
    bars["frames"].write(f"[*] {Path(result.info.path).name}: indexed on {node_label(outcome['node'])}"
                         f" ({outcome['processed_frames']} frames{f', {tries} tries' if tries > 1 else ''})")
    return True


def show_events(state: RunState, cluster: Cluster, events: list, bars: dict) -> None:
    """Apply the indexers' events: a try started (the per-video line, with its node; a new try
    starts the video's frames again), frame counts of the live tries, notes (once per node)."""
    for event in events:
        if event[0] == "start":
            show_start(state, cluster, *event[1:], bars)
        elif event[0] == "frames":
            for video_idx, (attempt, count) in event[1].items():
                tries = cluster.tries.get(video_idx) or [(None, None)]
                if video_idx not in cluster.done and tries[-1][0] == attempt:
                    cluster.frames[video_idx] = count
                    times = cluster.times.setdefault(video_idx, {})
                    times["first_frames"] = times.get("first_frames") or (time.monotonic() if count else None)
        elif event[0] == "note":
            show_note(cluster, *event[1:], bars)


def show_start(state: RunState, cluster: Cluster, video_idx: int, attempt: str, node: dict,
               bars: dict) -> None:
    """Print that a video is being indexed on a node ('try 2' after a try that did not finish);
    nothing for a video already done (a late event)."""
    if video_idx in cluster.done:
        return
    name = Path(state.results[video_idx].info.path).name
    tries = cluster.tries.setdefault(video_idx, [])
    tries.append((attempt, node))
    cluster.frames[video_idx] = 0
    cluster.times.setdefault(video_idx, {}).update(started=time.monotonic(), first_frames=None)
    again = f", try {len(tries)} (the one before did not finish)" if len(tries) > 1 else ""
    bars["frames"].write(f"[{'!' if again else '*'}] {name}: indexing on {node_label(node)}{again}")


def show_note(cluster: Cluster, node: dict, text: str, bars: dict) -> None:
    """Print a node's note once per node ('[*] host (node 1a2b3c4d): worker-0: ...')."""
    where = node_label(node)
    mark, text = (text[:3], text[4:]) if re.match(r"\[.\] ", text) else ("[*]", text)
    if (where, text) not in cluster.notes_seen:
        cluster.notes_seen.add((where, text))
        bars["frames"].write(f"{mark} {where}: {text}")


def refresh_frames(cluster: Cluster, bars: dict) -> None:
    """Move the frames bar to the frames of the finished videos and of the live tries."""
    total = sum(cluster.frames.values())
    if total != bars["frames"].n:
        bars["frames"].update(total - bars["frames"].n)


def apply_outcome(state: RunState, result, outcome: dict) -> None:
    """Put an indexer's tracks into the video's result as a local worker's messages would, with
    the node's model files and providers in the index's identity (the truth of who made it)."""
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


def task_failure(ray, error, tries: int) -> str:
    """Return why a video failed for good, in words: its own error (BadInput: a missing file),
    a broken pipeline, or what Ray says was lost, with the number of tries."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause
        if isinstance(cause, BadInput):
            return str(cause)
        text = str(cause).strip().splitlines()
        return f"{text[0] if text else type(cause).__name__} ({tries} {'try' if tries == 1 else 'tries'})"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''} ({tries} tries)"


def fail_video(state: RunState, result, why: str, bars: dict) -> None:
    """Record a video that could not be indexed on the cluster; the others go on."""
    message = why if why.startswith(str(result.info.path)) else f"{result.info.path}: not indexed: {why}"
    with state.lock:
        result.errors.append(message)
        state.failures.append(message)
    bars["frames"].write(f"[!] {message}")


def stop_indexers(cluster: Cluster) -> None:
    """Cancel the calls still running (the indexer stops its pipeline), have every indexer
    close its pipeline (its processes end, its ring is freed), wait for that a little, then
    end the actors; the cluster stays usable."""
    ray = cluster.ray
    for ref in cluster.calls:
        with contextlib.suppress(Exception):
            ray.cancel(ref)
    closing, unplaced = [], set(cluster.starting.values())
    for indexer in cluster.indexers:
        if indexer not in unplaced:  # placed (or dead: then it answers at once)
            with contextlib.suppress(Exception):
                closing.append(indexer.close.remote())
    with contextlib.suppress(Exception):
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=CANCEL_WAIT_S)
    for indexer in cluster.indexers:
        with contextlib.suppress(Exception):
            ray.kill(indexer)
    cluster.indexers.clear()


def cluster_report(state: RunState, cluster: Cluster) -> dict:
    """Return the cluster's part of results.json's stats: the address, the nodes that indexed
    a video (with their GPUs and videos) and the videos tried more than once."""
    return {"address": cluster.address, "nodes_in_cluster": len(cluster.nodes), "connect_s": cluster.connect_s,
            "nodes_used": [{"node": e["node"]["node"], "host": e["node"]["host"], "ip": e["node"]["ip"],
                            "gpus": sorted(e["gpus"]), "videos": e["videos"]}
                           for e in cluster.used.values()],
            "gpus_used": sum(len(e["gpus"]) for e in cluster.used.values()),
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
