"""Worker processes: load the models, then turn filled ring slots into face tracks (the index stage).

Each of the NUM_GPU_PROCESSES workers (`worker_main`) runs GPU_WORKER_THREADS threads. A thread
takes up to BATCH_SIZE filled slots, detects their faces (detect.py or device.py), and hands each
frame to its video's `FrameSequencer`, which feeds the tracker in frame order and returns the
slot to the decoders. Threads are joined before the worker returns, and pass their errors to its
main thread.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .settings import Settings
from .outputs import write_bytes_atomic
from .ring import StageClock, get_with_stop, run_child, slot_image
from .detect import detect_faces
from .device import detect_on_device
from .models import FaceModels, load_face_models
from .tracks import VideoTracker, thumbnail


def worker_main(name, settings, layout, videos, filled_q, free_q, result_q,
                stop_event, threads_per_session, gpu):
    """Load the models (on its GPU, if any), then run GPU_WORKER_THREADS threads over the
    filled ring slots."""
    def body(ring):
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # number GPUs like nvidia-smi
        models = load_face_models(settings, settings.PROVIDERS, threads_per_session, gpu,
                                  lambda text: result_q.put(("note", name, text)))
        result_q.put(("ready", name, models.providers, models.rec_max_chunk == 1))
        context = WorkerContext(settings, ring, videos, models, free_q, result_q)
        run_worker_threads(context, filled_q, stop_event)
        result_q.put(("stats", name, context.clock.report()))
    run_child(name, layout, result_q, (free_q,), body)


@dataclass
class WorkerContext:
    """What a worker thread needs to turn ring slots into results."""

    settings: Settings
    ring: np.ndarray
    videos: list
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
                self.context.result_q.put(("video_tracked", self.video_idx, self.tracker.counts))
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
