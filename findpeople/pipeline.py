"""Pipeline: the processes, queues and shared memory of one search, and their one shutdown path.

Runs in the parent, which owns everything shared: it creates every queue, the stop event and the
ring from one `spawn` context; starts NUM_CPU_LOADERS decoders and NUM_GPU_PROCESSES workers;
reads their messages (a reader thread moves result_q into an inbox read with a timeout) while
checking every child's exit code, so a child killed by kill -9 or the OOM killer is noticed
within a second (`PipelineBroken`); and on success, Ctrl-C or error alike joins the children,
terminates stragglers, closes the queues and unlinks the ring.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path

from .errors import BadInput, OutputError, PipelineBroken
from .settings import Settings
from .ring import QUEUE_TIMEOUT_S, RingLayout, create_ring, new_slot_queue, plan_ring, sigint_held
from .decode import decoder_main
from .providers import gpu_slots, provider_chain
from .worker import worker_main
from .runstate import RunState


_JOIN_TIMEOUT_S = 10.0  # per child at shutdown, then terminate


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


def start_pipeline(settings: Settings, videos: list, jobs: list | None = None,
                   open_ended: bool = False) -> Pipeline:
    """Create the queues and ring, then start the decoder and worker processes; if a start
    fails, stop what was started and release the ring before re-raising. The decoders take the
    jobs (default: every video); the workers know every video by its index. open_ended: the
    ring fits every video, and more jobs come later (feed_job) until end_jobs."""
    gpus = worker_gpus(settings)
    ctx = mp.get_context("spawn")
    jobs = videos if jobs is None else jobs
    layout = plan_ring(videos if open_ended else jobs, settings, str(os.getpid()))
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
        for item in jobs:
            pipe.jobs_q.put(item)
        if not open_ended:
            end_jobs(pipe, settings)
        for i in range(settings.NUM_CPU_LOADERS):
            start_child(pipe, f"decoder-{i}", decoder_main, layout, pipe.jobs_q, pipe.free_q,
                        pipe.filled_qs, pipe.result_q, pipe.stop_event, settings.FRAME_INTERVAL)
        # Intra-op threads per ONNX Runtime session, so that all workers together fit the cores.
        threads = max(1, (os.cpu_count() or 2) // (settings.NUM_GPU_PROCESSES * settings.GPU_WORKER_THREADS))
        for i in range(settings.NUM_GPU_PROCESSES):
            start_child(pipe, f"worker-{i}", worker_main, settings, layout, videos,
                        pipe.filled_qs[i], pipe.free_q, pipe.result_q, pipe.stop_event, threads,
                        gpus[i])
    except BaseException:
        shutdown_pipeline(pipe)
        raise
    return pipe


def end_jobs(pipe: Pipeline, settings: Settings) -> None:
    """Tell the decoders that no more videos come (one stop sentinel each): once they are done,
    the workers are stopped too (handle_message), and every child ends."""
    for _ in range(settings.NUM_CPU_LOADERS):
        pipe.jobs_q.put(None)


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
            message = result_q.get(timeout=QUEUE_TIMEOUT_S)
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
        with contextlib.suppress(FileNotFoundError):  # removed by ring.remove_dead_rings of a
            pipe.shm.unlink()  # pipeline in another PID namespace sharing /dev/shm


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
        state.video_tracked(*message[1:])
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


def run_pipeline(state: RunState, progress=None) -> None:
    """Index every video whose index is not reused (decoders and workers, until all children are
    done), while the finisher thread searches and finishes each video as it comes (the reused
    ones first). Everything after the children are started is inside the `finally` that stops
    them: a Ctrl-C at any moment leaves no child behind. progress(state, jobs) returns the two
    bars (default: progress_bars; a Ray task relays them to the driver, see cluster.py)."""
    jobs = [r.info for r in state.results if not r.index_reused]
    started = time.monotonic()
    pipe = start_pipeline(state.settings, [r.info for r in state.results], jobs) if jobs else None
    bars, finisher, finished = {}, None, False
    try:
        finisher = threading.Thread(target=state.finish_videos, name="finisher", daemon=True)
        finisher.start()
        if pipe is not None:
            bars = (progress or progress_bars)(state, jobs)
            follow_children(state, pipe, bars)
        finished = True
    finally:
        if pipe is not None:  # also when interrupted: how long it ran
            state.index_s = round(time.monotonic() - started, 3)
        for bar in bars.values():
            bar.close()
        if not finished:  # broken or interrupted: cut no more clips, stop the one being cut
            state.stop_clips.set()
        try:
            if pipe is not None:
                shutdown_pipeline(pipe)
        finally:
            if finisher is not None:
                finish_clips(state, finisher)


def progress_bars(state: RunState, jobs: list) -> dict:
    """Return the two progress bars: videos indexed (reused ones included), frames processed."""
    from tqdm import tqdm
    total = sum(math.ceil(v.frame_count / state.settings.FRAME_INTERVAL) for v in jobs)
    return {"videos": tqdm(total=len(state.results), initial=len(state.results) - len(jobs),
                           desc="videos", unit="video", position=0),
            "frames": tqdm(total=total, desc="frames", unit="frame", position=1, smoothing=0.1)}


def finish_clips(state: RunState, cutter: threading.Thread) -> None:
    """Let the finisher thread finish the videos queued so far and end; on Ctrl-C or SIGTERM meanwhile,
    stop the clip being cut, wait for the thread a little, and go on with the interruption."""
    state.clip_jobs.put(None)
    try:
        while cutter.is_alive():  # the last clips may take long: no deadline here
            cutter.join(timeout=QUEUE_TIMEOUT_S)
    except BaseException:
        state.stop_clips.set()
        cutter.join(timeout=_JOIN_TIMEOUT_S)
        raise


def follow_children(state: RunState, pipe: Pipeline, bars: dict, until=None) -> None:
    """Apply the children's messages until every child is done (or until() is true); raise
    PipelineBroken when one dies or fails, OutputError when a file in OUTPUT_DIR could not be
    written."""
    def receive():
        try:
            message = pipe.inbox.get(timeout=QUEUE_TIMEOUT_S)
        except queue.Empty:
            return
        with state.lock:
            handle_message(message, state, pipe, bars)

    next_check = time.monotonic()
    while len(pipe.finished_children) < len(pipe.processes) and not (until and until()):
        receive()
        if time.monotonic() >= next_check:  # also while messages keep coming
            check_children(pipe, receive)
            if state.write_error:
                raise OutputError(state.write_error)
            next_check = time.monotonic() + QUEUE_TIMEOUT_S
