"""The index stage on a Ray cluster (--ray, issue #13), with real Ray on this machine.

A cluster of several real nodes (ray.cluster_utils.Cluster: a head without CPUs, so that no
video runs there, and worker nodes of 2 CPUs each, each its own raylet) indexes the three shared
clips and must give exactly the answers of the session's local run (conftest `search`, same
settings); a worker node killed while it indexes a video must not change them; Ctrl-C with
--ray local must stop everything it started; and --ray without Ray says how to install it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


from conftest import (
    REPO, TESTDATA, answers, link_all_refs, processes_with_marker, run_main, search_command, shm_names,
    start_logged, video_folder)

NODE_STORE_BYTES = 100 * 2**20  # each node's object store: the tracks of a clip are far smaller
KILL_AFTER_S = 1.5  # after a node's models are loaded (its first video: 10 s or more here)


CLUSTER_HELPER = """
import json, os, sys
from ray.cluster_utils import Cluster
workers, store = int(sys.argv[1]), int(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 0, "num_gpus": 0, "object_store_memory": store})
for _ in range(workers):  # no GPU even where the machine has one: the same shapes everywhere
    cluster.add_node(num_cpus=2, num_gpus=0, object_store_memory=store)
cluster.wait_for_nodes()
print(json.dumps({"address": cluster.address, "auth": os.environ.get("RAY_AUTH_MODE")}), flush=True)
for line in sys.stdin:
    words = line.split()
    if words and words[0] == "kill":
        node = next(n for n in list(cluster.worker_nodes) if n.node_id.startswith(words[1]))
        cluster.remove_node(node, allow_graceful=False)
        print("killed", flush=True)
    elif words and words[0] == "quit":
        break
cluster.shutdown()
"""


class ClusterNodes:
    """A cluster of real Ray nodes on this machine, run by a helper process (so that this test
    process never loads Ray: its threads would take the SIGINT other tests raise)."""

    def __init__(self, helper, info: dict):
        self.helper, self.address = helper, info["address"]
        self.env = {"RAY_AUTH_MODE": info["auth"]} if info["auth"] else {}  # the cluster's token mode

    def kill(self, node_prefix: str) -> None:
        """Kill the worker node whose id starts so (its raylet and processes, not gracefully)."""
        self.helper.stdin.write(f"kill {node_prefix}\n")
        self.helper.stdin.flush()
        assert self.helper.stdout.readline().strip() == "killed"


@contextlib.contextmanager
def ray_nodes(workers: int):
    """Start a cluster of a CPU-less head and `workers` nodes of 2 CPUs; yield it, then stop it."""
    helper = subprocess.Popen([sys.executable, "-c", CLUSTER_HELPER, str(workers), str(NODE_STORE_BYTES)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield ClusterNodes(helper, json.loads(helper.stdout.readline()))
    finally:
        with contextlib.suppress(OSError):
            helper.stdin.write("quit\n")
            helper.stdin.close()
        try:
            helper.wait(timeout=120)
        except subprocess.TimeoutExpired:
            helper.kill()


def pipeline_processes() -> set:
    """PIDs of the pipeline's processes and their resource trackers (spawned children)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                command = (entry / "cmdline").read_bytes()
                if b"spawn_main" in command or b"resource_tracker" in command:
                    found.add(int(entry.name))
    return found


def wait_until_gone(pids: set, timeout_s: float = 30.0) -> set:
    """Wait for these processes to end; return those still alive."""
    deadline = time.monotonic() + timeout_s
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = {pid for pid in alive if Path(f"/proc/{pid}").exists()}
    return alive


def read_results(output: Path) -> dict:
    return json.loads((output / "results.json").read_text())


def test_a_three_node_cluster_gives_the_local_runs_answers_and_its_indexes_serve_a_local_run(
        search, tmp_path):
    """Two worker nodes index the three clips (one video at a time each: a task asks 2 CPUs):
    names, ranges and sightings equal the local run's; both nodes took part; the indexes the
    driver wrote are current for a later local run, which decodes nothing."""
    refs = link_all_refs(tmp_path / "refs")
    with ray_nodes(2) as cluster:
        code, output = run_main(search_command(TESTDATA / "videos", refs, tmp_path / "out", "--ray",
                                               cluster.address), tmp_path, cluster.env, timeout=900)
    assert code == 0, output[-4000:]
    results = read_results(tmp_path / "out")
    assert answers(results) == answers(search["results"])
    report = results["stats"]["cluster"]
    assert report["nodes_in_cluster"] == 2 and len(report["nodes_used"]) == 2, report
    assert sorted(Path(v).name for n in report["nodes_used"] for v in n["videos"]) == \
        sorted(p.name for p in (TESTDATA / "videos").iterdir())
    for video in ("obama_whcd.mp4", "short_hamilton_clip.mp4", "crowd_royal_opera_house.mp4"):
        assert re.search(rf"{re.escape(video)}: indexing on \S+ \(node [0-9a-f]{{8}}\)", output), output[-4000:]
    assert "2 of 2 node(s) and 0 GPU(s) indexed videos" in output
    code, again = run_main(search_command(TESTDATA / "videos", refs, tmp_path / "local",
                                          index=tmp_path / "out_index"), tmp_path)
    assert code == 0, again[-3000:]
    assert "3 video(s) reused, 0 to index" in again
    assert answers(read_results(tmp_path / "local")) == answers(search["results"])


def test_a_worker_node_killed_mid_video_is_indexed_again_elsewhere_with_the_same_answers(
        search, tmp_path):
    """The raylet of the node indexing the first (longest) video is killed a few seconds into
    it: that video (and the next one that node had been given) is indexed again on the other
    node, the run ends with exit code 0 and the local
    run's answers, the index folder holds only whole indexes, and no pipeline process or ring
    of the lost try is left (its ring is swept by the next ring made on this machine)."""
    refs = link_all_refs(tmp_path / "refs")
    before_pids, before_rings = pipeline_processes(), shm_names()
    with ray_nodes(2) as cluster:
        process, lines, reader = start_logged(search_command(
            TESTDATA / "videos", refs, tmp_path / "out", "--ray", cluster.address), tmp_path, cluster.env)
        try:
            victim = None
            deadline = time.monotonic() + 300
            while victim is None and time.monotonic() < deadline and process.poll() is None:
                found = [re.search(r"(\S+\.mp4): indexing on \S+ \(node ([0-9a-f]{8})\)", line)
                         for line in list(lines)]
                found = [m for m in found if m]
                if found:
                    victim = found[0]
                time.sleep(0.2)
            assert victim is not None, "".join(lines)[-4000:]
            loaded = f"(node {victim.group(2)}): worker-0: "  # its models loaded: frames come next
            while not any(loaded in line for line in list(lines)) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(KILL_AFTER_S)
            cluster.kill(victim.group(2))
            code = process.wait(timeout=900)
        finally:
            if process.poll() is None:
                process.kill()
            reader.join(timeout=10)
        left = wait_until_gone(pipeline_processes() - before_pids)
    output = "".join(lines)
    assert code == 0, output[-4000:]
    assert f"{victim.group(1)}: indexing on" in output and "try 2 (the one before did not finish)" in output
    results = read_results(tmp_path / "out")
    assert answers(results) == answers(search["results"])
    retried = [Path(p).name for p in results["stats"]["cluster"]["retried_videos"]]
    assert victim.group(1) in retried  # with the other video that node had been given (if any)
    for name in retried:
        assert re.search(rf"{re.escape(name)}: indexing on \S+ \(node {victim.group(2)}\)", output)
    index = tmp_path / "out_index"
    assert sorted(p.name for p in index.iterdir() if not p.name.startswith(".search")) == \
        sorted(f"{p.stem}.parquet" for p in (TESTDATA / "videos").iterdir())
    assert not left, f"processes of the lost try still running: {left}"
    from findpeople.ring import remove_dead_rings
    remove_dead_rings(older_than_s=0)  # what the next run on this machine does
    assert shm_names() <= before_rings, shm_names() - before_rings


def interrupt_while_indexing(command: list, cwd: Path, env: dict) -> tuple:
    """Run main.py and send SIGINT to its process group (a terminal's Ctrl-C) shortly after a
    video starts to be indexed; return (exit code, output)."""
    process, lines, reader = start_logged(command, cwd, env)
    try:
        deadline = time.monotonic() + 300
        while not any("indexing on" in line for line in list(lines)) and time.monotonic() < deadline:
            assert process.poll() is None, "".join(lines)[-4000:]
            time.sleep(0.2)
        time.sleep(KILL_AFTER_S)
        os.killpg(process.pid, signal.SIGINT)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        reader.join(timeout=10)
    return code, "".join(lines)


def test_ctrl_c_with_ray_local_stops_the_run_and_the_ray_instance_it_started(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while a video is being indexed on a
    `--ray local` instance: exit code 130, the reports saved, and no process of the run (Ray's
    own included: they carry the run's environment) nor ring left."""
    refs = link_all_refs(tmp_path / "refs")
    marker = f"SFV_RAY_TEST_{os.getpid()}_{time.monotonic_ns()}"
    before_rings = shm_names()
    code, output = interrupt_while_indexing(search_command(
        TESTDATA / "videos", refs, tmp_path / "out", "--ray", "local"), tmp_path, {marker: "1"})
    assert code == 130, output[-4000:]
    assert "interrupted" in output and (tmp_path / "out" / "results.json").is_file()
    deadline = time.monotonic() + 30
    while processes_with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_with_marker(marker), output[-3000:]
    assert shm_names() <= before_rings


def test_ctrl_c_on_a_running_cluster_leaves_it_usable_for_the_next_run(search, tmp_path):
    """Ctrl-C while a running cluster indexes: exit code 130; the driver's indexers end and the
    cluster stays up: the next run on it finishes with the local run's answers."""
    refs = link_all_refs(tmp_path / "refs")
    with ray_nodes(1) as cluster:
        command = search_command(TESTDATA / "videos", refs, tmp_path / "out", "--ray", cluster.address)
        code, output = interrupt_while_indexing(command, tmp_path, cluster.env)
        assert code == 130, output[-4000:]
        code, output = run_main(command, tmp_path, cluster.env, timeout=900)
    assert code == 0, output[-4000:]
    assert answers(read_results(tmp_path / "out")) == answers(search["results"])


def test_index_only_on_ray_local_writes_the_index_and_a_rerun_reuses_it_without_indexers(tmp_path):
    """--index-only --ray local: the video is indexed by an indexer on the local instance, its
    index written by the driver, nothing written to OUTPUT_DIR; a second such run reuses the
    index and starts no indexer (nothing to index)."""
    videos = video_folder(tmp_path, "obama_whcd.mp4")
    command = search_command(videos, tmp_path / "no_refs", tmp_path / "out", "--ray", "local",
                             "--index-only")
    code, output = run_main(command, tmp_path, timeout=300)
    assert code == 0, output[-3000:]
    assert re.search(r"obama_whcd\.mp4: indexed on \S+ \(node [0-9a-f]{8}\) \(60 frames\)", output), output
    assert (tmp_path / "out_index" / "obama_whcd.parquet").is_file() and not (tmp_path / "out").exists()
    code, again = run_main(command, tmp_path, timeout=300)
    assert code == 0 and "1 video(s) reused, 0 to index" in again, again[-3000:]
    assert "indexing on" not in again and "0 of 1 node(s)" in again


def test_ray_without_ray_installed_gives_the_pip_command_and_exit_code_2(tmp_path):
    """A Python in which `import ray` fails (a stand-in package first on the path): exit code
    2 at once, with the pip command, and nothing written."""
    stand_in = tmp_path / "no_ray" / "ray"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\")\n")
    code, output = run_main(search_command(TESTDATA / "videos", link_all_refs(tmp_path / "refs"),
                                           tmp_path / "out", "--ray", "local"), tmp_path,
                            {"PYTHONPATH": str(tmp_path / "no_ray")}, timeout=120)
    assert code == 2, output
    assert "needs Ray, which is not installed" in output and "pip install -r requirements-ray.txt" in output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out_index").exists()
    assert any(line.startswith("ray>=") for line in (REPO / "requirements-ray.txt").read_text().splitlines())


def test_a_bad_ray_address_is_refused_before_anything_runs(tmp_path):
    """--ray with something that is no address: exit code 2 naming the flag and what it takes."""
    code, output = run_main(search_command(TESTDATA / "videos", link_all_refs(tmp_path / "refs"),
                                           tmp_path / "out", "--ray", "my cluster"), tmp_path, timeout=120)
    assert code == 2 and "--ray must be empty (this machine), local, auto" in output, output


BROKEN_EVERY_TIME = """
import json, sys
import ray
import main
from conftest import make_info
from findpeople import cluster as cluster_module
from findpeople.runstate import RunState

def broken_pipeline():
    from findpeople.errors import PipelineBroken
    raise PipelineBroken("worker-0", -9, "killed")

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
         runtime_env={"py_modules": [sys.argv[1] + "/findpeople"]})
task = ray.remote(broken_pipeline).options(num_cpus=1, max_retries=0)
settings = main.load_settings(["--output", sys.argv[2] + "/out", "--index-dir", sys.argv[2] + "/idx"])
state = RunState([make_info(main, path="/videos/obama_whcd.mp4")], settings, None, {"people": []})
cluster = cluster_module.Cluster(ray, "local", [], cluster_module.start_board(ray))
written, result, waiting, steps = [], state.results[0], [], []
bars = {"frames": type("Bar", (), {"write": lambda self, text: written.append(text)})()}
for attempt in range(cluster_module.TASK_RETRIES + 1):
    ref = task.remote()
    ray.wait([ref], timeout=120)
    usable = cluster_module.take_outcome(state, cluster, None, result, ref, waiting, bars)
    steps.append([usable, len(waiting), len(result.errors)])
    waiting.clear()
print(json.dumps({"steps": steps, "errors": result.errors, "failures": state.failures,
                  "finished": result.finished, "done": sorted(cluster.done), "written": written,
                  "retries": cluster_module.TASK_RETRIES}))
ray.shutdown()
"""


def test_a_video_whose_pipeline_breaks_on_every_try_is_reported_and_the_run_goes_on(tmp_path):
    """An indexer call that fails as a broken pipeline goes back to the front of the queue, up
    to TASK_RETRIES more times; then the video gets one error naming its file, the failure and
    the tries, in the run's failures (exit code 1), and is not finished (no index); the indexer
    may take the next video. (Real Ray errors, in a process of its own: Ray leaves threads in
    the process that starts it, which would take SIGINT from the tests that raise it.)"""
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    code, output = run_main([sys.executable, "-c", BROKEN_EVERY_TIME, str(REPO), str(tmp_path)],
                            tmp_path, env, timeout=300)
    assert code == 0, output[-3000:]
    found = json.loads(output.strip().splitlines()[-1])
    retries = found["retries"]
    assert found["steps"] == [[True, 1, 0]] * retries + [[True, 0, 1]], found["steps"]
    assert len(found["errors"]) == 1 and found["errors"] == found["failures"], found
    assert found["errors"][0].startswith("/videos/obama_whcd.mp4: not indexed: worker-0 stopped (exit code -9)")
    assert f"({retries + 1} tries)" in found["errors"][0]
    assert not found["finished"] and found["done"] == [0] and found["written"] == [f"[!] {found['errors'][0]}"]


def node(cpus: int, gpus: int, provider: str = "CPUExecutionProvider") -> dict:
    """node_facts of a node as check_nodes completes them."""
    return {"cpus": cpus, "gpus": gpus, "execution": {"providers": [provider], "gpus": []}}


def test_an_indexer_asks_what_one_node_can_hold(main_module):
    """GPU nodes: a GPU per worker process and a CPU per decoder, shaped on the node with the
    most GPUs (not its CPUs from another node); CPU nodes: a CPU per decoder and worker, at most
    the largest node's."""
    from findpeople.cluster import task_resources
    settings = main_module.load_settings(["--num-gpu-processes", "2", "--num-cpu-loaders", "8"])
    gpu = "CUDAExecutionProvider"
    assert task_resources(settings, [node(4, 1, gpu), node(64, 0)]) == {"num_gpus": 1, "num_cpus": 4}
    assert task_resources(settings, [node(16, 4, gpu), node(8, 2, gpu)]) == {"num_gpus": 2, "num_cpus": 8}
    assert task_resources(settings, [node(2, 0), node(6, 0)]) == {"num_cpus": 6}
    assert task_resources(settings, [node(32, 0), node(2, 1, "CPUExecutionProvider")]) == {"num_cpus": 10}


class FakeIndexer:
    """Stands in for an indexer actor: index.remote(idx) returns a token and is recorded."""

    def __init__(self, name: str, calls: list):
        self.name, self.index = name, self
        self.calls = calls

    def remote(self, video_idx: int):
        self.calls.append((self.name, video_idx))
        return (self.name, video_idx)


def test_videos_go_two_per_indexer_and_a_retried_one_alone_on_another_node(main_module):
    """give_videos: one video each before a second each; a video tried before goes to an idle
    indexer alone (no second video beside it), on a node that did not fail it when one is free."""
    from findpeople.cluster import Cluster, give_videos
    from conftest import make_info
    from findpeople.runstate import VideoResult
    calls = []
    a, b = FakeIndexer("a", calls), FakeIndexer("b", calls)
    cluster = Cluster(None, "test", [], placed=[a, b], node_of={id(a): "node-a", id(b): "node-b"})
    results = [VideoResult(make_info(main_module, idx=i)) for i in range(5)]
    waiting = list(results)
    give_videos(cluster, waiting)
    assert calls == [("a", 0), ("b", 1), ("a", 2), ("b", 3)] and waiting == [results[4]]
    for ref in [("a", 0), ("a", 2)]:  # a's videos ended; video 4 failed on node-b before
        cluster.calls.pop(ref)
    cluster.failed_tries[4], cluster.avoid[4] = 1, {"node-b"}
    calls.clear()
    give_videos(cluster, waiting)
    assert calls == [("a", 4)] and cluster.solo == {4: a}
    waiting.append(VideoResult(make_info(main_module, idx=5)))
    give_videos(cluster, waiting)
    assert calls == [("a", 4)], "a video was given beside a retried one, or to a full indexer"
