"""Run state: the parent's record of one run, filled from the children's messages.

Runs in the parent: the message loop (pipeline.py) and the clip thread share it under one lock.
In: "progress", "track", "video_tracked", "video_done" ... messages. Out: a `VideoResult` per
video; a finished video's ranges, clips, video.json and updated reports.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ClipError
from .settings import Settings
from .ring import QUEUE_TIMEOUT_S
from .decode import VideoInfo, packet_times_s
from .clips import TimeRange, cut_clip, keyframe_before, person_ranges
from .reports import format_hms, reference_thumbnail, video_report, video_status, write_reports
from .resume import replace_saved_video, saved_video_path


@dataclass
class VideoResult:
    """Everything found in one video; filled by the parent as results arrive."""

    info: VideoInfo
    detections: list = field(default_factory=list)
    processed_frame_count: int = 0
    sent_frame_count: int | None = None  # frames its decoder sent; set when it finished the video
    tracked: bool = False  # its worker has ended all its face tracks
    ranges: list = field(default_factory=list)
    clips: list = field(default_factory=list)  # (path or None, clip start s) per range, in order
    snapshots: set = field(default_factory=set)  # file names of the snapshots its tracks left
    errors: list = field(default_factory=list)
    finished: bool = False
    reused: dict | None = None  # its results.json entry, saved by an earlier run (see RESUME)
    face_counts: dict | None = None  # what its tracker saw (VideoTracker.counts), when it ended


class RunState:
    """The parent's bookkeeping: results per video, progress, what to finalise next."""

    def __init__(self, videos: list, settings: Settings, ffmpeg: str | None, run: dict):
        self.settings, self.ffmpeg, self.run = settings, ffmpeg, run
        self.results = [VideoResult(info) for info in videos]
        self.output_dir = Path(settings.OUTPUT_DIR)
        self.decoders_done = 0
        self.failures = []
        self.skipped_early = 0  # the first failures: the reference photos skipped, printed at once
        self.debug_rec_file = None
        self.started = time.monotonic()
        self.lock = threading.RLock()  # the clip thread and the message loop share the results
        self.clip_jobs, self.stop_clips, self.clips_s = queue.Queue(), threading.Event(), 0.0
        self.thumbnails = {p["name"]: reference_thumbnail(p["photos"][0]) for p in run["people"]}
        self.first_frame_s = None  # when the first processed frame came back, from the start
        self.last_frame_s = None  # ... and the last one
        self.ready_s = None  # when the last worker had loaded its models
        self.stages = {}  # process name -> StageClock report
        self.fingerprints = {}  # video_idx -> what its results depend on; saved in its video.json
        self.decoding = {}  # decoder name -> video_idx it started last ("video_start")
        self.started_videos = set()  # video_idx of every video a decoder has started
        self.write_error = None  # the first file in OUTPUT_DIR that could not be written

    def stats(self) -> dict:
        """Return the run's timing: wall time, frames/s and seconds per stage and process."""
        wall_s = time.monotonic() - self.started
        frames = sum(r.processed_frame_count for r in self.results)
        working_s = (self.last_frame_s or 0.0) - (self.ready_s or 0.0)
        return {"wall_s": round(wall_s, 3), "models_ready_s": self.ready_s,
                "first_frame_s": self.first_frame_s, "last_frame_s": self.last_frame_s,
                "processed_frames": frames,
                "frames_per_s": round(frames / wall_s, 3) if wall_s > 0 else None,
                "frames_per_s_after_models_ready": round(frames / working_s, 3) if working_s > 0 else None,
                "clips_s": round(self.clips_s, 3), "stages": self.stages,
                "reused_videos": [r.info.path for r in self.results if r.reused is not None]}

    def record_progress(self, video_idx: int, count: int) -> int:
        """Count frames a worker has finished; return the count."""
        self.last_frame_s = round(time.monotonic() - self.started, 3)
        if self.first_frame_s is None:
            self.first_frame_s = self.last_frame_s
        self.results[video_idx].processed_frame_count += count
        return count

    def record_track(self, video_idx: int, track: dict) -> None:
        """Store an ended face track: the frames it reports (those that count, see sighting_flags)
        are sightings of its person."""
        result = self.results[video_idx]
        if self.debug_rec_file:
            self.log_debug_rec(result.info, track)
        result.snapshots.update(track.get("snapshots", ()))
        if track["name"] is None:
            return
        for frame_idx, time_s, bbox, det_score, own_distance in track["frames"]:
            distance = track["best_distance"] if own_distance is None else own_distance
            result.detections.append({
                "frame": frame_idx, "time": round(time_s, 6), "time_hms": format_hms(time_s),
                "name": track["name"], "distance": distance, "similarity": round(1 - distance, 4),
                "bbox": bbox, "det_score": det_score, "track": track["track"],
                "recognized": own_distance is not None})

    def log_debug_rec(self, info: VideoInfo, track: dict) -> None:
        """Print and log each recognition's distance to every person (debug_rec)."""
        for frame_idx, time_s, distances in track["debug_rec"]:
            line = "\t".join([Path(info.path).name, str(frame_idx), f"{time_s:.3f}",
                              f"track {track['track']}", track["name"] or "-",
                              *(f"{p}={d:.4f}" for p, d in distances.items())])
            self.debug_rec_file.write(line + "\n")
            print("[debug_rec]", line)

    def video_started(self, decoder: str, video_idx: int) -> None:
        """Note which video a decoder is on (to name it if the decoder dies)."""
        self.decoding[decoder] = video_idx
        self.started_videos.add(video_idx)

    def unfinished_videos_of(self, child: str) -> list:
        """Return the unfinished VideoResults a child was working on: a decoder's current video,
        or the started videos of a worker (video i goes to worker i % NUM_GPU_PROCESSES)."""
        if child.startswith("decoder-"):
            idxs = [self.decoding[child]] if child in self.decoding else []
        elif child.startswith("worker-"):
            worker_idx = int(child.rsplit("-", 1)[1])
            idxs = [i for i in self.started_videos if i % self.settings.NUM_GPU_PROCESSES == worker_idx]
        else:  # the parent's result reader: every video in progress
            idxs = list(self.started_videos)
        return [self.results[i] for i in sorted(idxs) if not self.results[i].finished]

    def video_tracked(self, video_idx: int, face_counts: dict | None = None) -> None:
        """Note that the worker has ended every track of a video (face_counts: what its tracker
        saw, see VideoTracker.counts)."""
        self.results[video_idx].tracked = True
        self.results[video_idx].face_counts = face_counts
        self.maybe_finish(video_idx)

    def video_decoded(self, video_idx: int, sent: int, error: str | None) -> None:
        """Note that a video's decoder has sent all its frames."""
        result = self.results[video_idx]
        result.sent_frame_count = sent
        if error and error != "stopped":
            result.errors.append(error)
            self.failures.append(error)
        self.maybe_finish(video_idx)

    def maybe_finish(self, video_idx: int) -> None:
        """Finalise a video once every frame its decoder sent has come back."""
        result = self.results[video_idx]
        if result.finished or result.sent_frame_count is None or not result.tracked:
            return
        result.finished = True
        self.finish_video(result)

    def finish_video(self, result: VideoResult) -> None:
        """Compute the ranges of one finished video, save them, and queue its clips."""
        result.ranges.extend(self.ranges_of(result))
        self.save_reports()
        self.clip_jobs.put(result)

    def ranges_of(self, result: VideoResult) -> list:
        """Return the TimeRanges of a video's detections so far, person by person."""
        by_person = {}
        for d in result.detections:
            by_person.setdefault(d["name"], []).append((d["time"], d["distance"]))
        return [time_range for name in sorted(by_person)
                for time_range in person_ranges(name, by_person[name], result.info, self.settings)]

    def save_reports(self) -> None:
        """Rewrite results.json, results.csv and index.html with everything found so far."""
        with self.lock:
            self.write_output(write_reports, self.run, self.results, self.output_dir, self.settings,
                              self.thumbnails)

    def save_video(self, result: VideoResult) -> None:
        """Save a video's results in its folder (video.json) once every range has its clip entry,
        so a later run can reuse it (see reuse_problem), and only then remove what an earlier run
        left there that these results do not list. Not for a video that did not end "ok" (a
        truncated copy, a read error): it would never be reused, and must not replace an
        earlier run's good results; nothing without a fingerprint either."""
        fingerprint = self.fingerprints.get(result.info.idx)
        if fingerprint is not None and video_status(result) == "ok":
            with self.lock:
                entry = video_report(result, self.output_dir, self.settings.FRAME_INTERVAL)
                snapshots = sorted(result.snapshots)
            self.write_output(replace_saved_video, saved_video_path(self.output_dir, result.info),
                              fingerprint, entry, snapshots)

    def write_output(self, write, *args) -> None:
        """Run one write into OUTPUT_DIR. A failure (disk full, no permission) is kept in
        write_error, which stops the run at the next tick; the files written before stay whole."""
        try:
            write(*args)
        except OSError as error:
            with self.lock:
                if self.write_error is None:
                    self.write_error = str(error)

    def cut_clips(self) -> None:
        """Clip-cutting thread: cut each queued video's ranges; a None job ends it.

        ffmpeg runs beside the inference (on a GPU machine the CPU is free for it), and the
        parent keeps reading results meanwhile.
        """
        while (result := self.next_clip_job()) is not None:
            try:
                self.cut_video_clips(result)
            except Exception as error:  # recorded, and the next video's clips are still cut
                with self.lock:
                    message = f"{result.info.path}: clips not cut ({type(error).__name__}: {error})"
                    result.errors.append(message)
                    self.failures.append(message)
                    result.clips += [(None, None)] * (len(result.ranges) - len(result.clips))
            if len(result.clips) == len(result.ranges):  # not stopped halfway by Ctrl-C
                self.save_video(result)
            self.save_reports()

    def next_clip_job(self) -> VideoResult | None:
        """Return the next video whose clips are to be cut; None ends the clip thread (also once the
        run is stopping and no job is waiting)."""
        while True:
            try:
                return self.clip_jobs.get(timeout=QUEUE_TIMEOUT_S)
            except queue.Empty:
                if self.stop_clips.is_set():
                    return None

    def cut_video_clips(self, result: VideoResult) -> None:
        """Cut the clips of one video's ranges, in order, unless the run is stopping."""
        fast = self.settings.CLIP_MODE == "fast"
        clip_dir = self.output_dir / result.info.output_name / "clips"
        keyframes = packet_times_s(result.info, keyframes_only=True) if fast and result.ranges else []
        for time_range in result.ranges:
            if self.stop_clips.is_set():
                break
            started = time.monotonic()
            clip_start_s = keyframe_before(keyframes, time_range.start_s) if fast else time_range.start_s
            clip = self.cut_one(result, time_range, clip_dir, clip_start_s)
            if clip is None:  # stopped: this range and the later ones have no clip entry
                break
            with self.lock:
                result.clips.append(clip)
                self.clips_s += time.monotonic() - started

    def cut_one(self, result: VideoResult, time_range: TimeRange, clip_dir: Path,
                clip_start_s: float) -> tuple | None:
        """Cut one clip; return (its path, where it starts), (None, None) after recording the
        error, or None when the run is stopping (nothing recorded: the video is unfinished)."""
        if self.ffmpeg is None:
            return None, None
        try:
            try:
                return str(cut_clip(self.ffmpeg, result.info, time_range, clip_dir,
                                    self.settings.CLIP_MODE, clip_start_s, self.stop_clips)), clip_start_s
            except ClipError as error:
                if self.settings.CLIP_MODE != "fast" or self.stop_clips.is_set():
                    raise
                # MP4 cannot hold every codec as it is (PCM audio, VP8, WMV), and a copy of a
                # stream without timestamps has no video (clip_problem): re-encode this one.
                print(f"[!] fast clip failed, re-encoding instead: {str(error).splitlines()[0]}")
                clip = cut_clip(self.ffmpeg, result.info, time_range, clip_dir, "accurate",
                                time_range.start_s, self.stop_clips)
                return str(clip), time_range.start_s
        except (ClipError, OSError) as error:
            if self.stop_clips.is_set():
                return None
            with self.lock:
                result.errors.append(str(error))
                self.failures.append(str(error))
            return None, None
