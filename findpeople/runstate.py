"""Run state: the parent's record of one run, filled from the children's messages, and the
finisher thread that searches each indexed video and makes its outputs.

Runs in the parent: the message loop (pipeline.py) and the finisher thread share it under one
lock. In: "progress", "track", "video_tracked", "video_done" ... messages. Out: per video a
`VideoResult`; a video's tracks written as its index (index.py) once it is finished, then
searched (naming.py), its snapshots and clips made (or reused), and the reports updated.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ClipError
from .settings import Settings
from .outputs import encode_snapshot, snapshot_path, write_bytes_atomic
from .ring import QUEUE_TIMEOUT_S
from .decode import VideoInfo, packet_times_s
from .index import (
    faces_with_boxes, index_metadata, index_path, read_faces, records_table, table_index, write_index)
from .naming import name_video
from .search import video_track_looks
from .clips import TimeRange, clip_file_name, cut_clip, keyframe_before, person_ranges
from .reports import format_hms, reference_thumbnail, video_status, write_reports
from .resume import (
    clip_key, made_before, made_entry, read_made, remove_unlisted_files, reused_clip_problem,
    snapshot_key, write_made)
from .snapshots import frames_at


@dataclass
class SearchInputs:
    """Who is searched: the references as reference_matrix gives them, and the people's names."""

    ref_embeddings: object  # [photos, dim] float32, L2-normalised
    ref_owners: object  # [photos] person index of each photo
    people: list


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
    snapshots: set = field(default_factory=set)  # file names of its snapshots
    errors: list = field(default_factory=list)
    finished: bool = False  # indexed (its index reused, or all its frames tracked)
    index_reused: bool = False  # its index in INDEX_DIR was current: not decoded again
    tracks: list = field(default_factory=list)  # track records from its worker (tracks.track_record)
    index: object = None  # its index.VideoIndex once tracked, until it is searched
    searched: bool = False
    index_written: bool = False  # its index was written to INDEX_DIR by this run
    searching: bool = False  # a thread is searching it (search_video)
    named: list = field(default_factory=list)  # summaries of its named tracks (naming.name_track)
    made: dict = field(default_factory=dict)  # this run's made.json entries (resume.py)
    face_counts: dict | None = None  # what its tracker saw (VideoTracker.counts), when it ended


class RunState:
    """The parent's bookkeeping: results per video, progress, what to finalise next."""

    def __init__(self, videos: list, settings: Settings, ffmpeg: str | None, run: dict,
                 search: SearchInputs | None = None):
        self.settings, self.ffmpeg, self.run, self.search = settings, ffmpeg, run, search
        self.results = [VideoResult(info) for info in videos]
        self.output_dir = Path(settings.OUTPUT_DIR)
        self.index_dir = Path(settings.INDEX_DIR)
        self.decoders_done = 0
        self.failures = []
        self.skipped_early = 0  # the first failures: the reference photos skipped, printed at once
        self.debug_rec_file = None
        self.started = time.monotonic()
        self.lock = threading.RLock()  # the finisher thread and the message loop share the results
        self.clip_jobs, self.stop_clips, self.clips_s = queue.Queue(), threading.Event(), 0.0
        self.thumbnails = {p["name"]: reference_thumbnail(p["photos"][0]) for p in run["people"]}
        self.first_frame_s = None  # when the first processed frame came back, from the start
        self.last_frame_s = None  # ... and the last one
        self.ready_s = None  # when the last worker had loaded its models
        self.stages = {}  # process name -> StageClock report
        self.fingerprints = {}  # video_idx -> its content fingerprint (resume.video_fingerprint)
        self.identities = {}  # video_idx -> what its index must match (index.index_identity)
        self.reused_looks = {}  # index file -> TrackLooks of the search over reused indexes
        self.decoding = {}  # decoder name -> video_idx it started last ("video_start")
        self.started_videos = set()  # video_idx of every video a decoder has started
        self.write_error = None  # the first file in OUTPUT_DIR that could not be written
        self.index_s = None  # s the index stage took (decoders and workers), when it ran
        self.search_s = 0.0  # s spent matching the references and naming tracks
        self.snapshots_s = 0.0  # s spent making snapshots
        self.people_s = None  # s spent grouping the unnamed tracks (people.py)
        self.cluster = None  # with --ray: the nodes that indexed (cluster.cluster_report)

    def stats(self) -> dict:
        """Return the run's timing: wall time, frames/s and seconds per stage and process."""
        wall_s = time.monotonic() - self.started
        frames = sum(r.processed_frame_count for r in self.results if not r.index_reused)
        working_s = (self.last_frame_s or 0.0) - (self.ready_s or 0.0)
        return {"wall_s": round(wall_s, 3), "models_ready_s": self.ready_s,
                "first_frame_s": self.first_frame_s, "last_frame_s": self.last_frame_s,
                "processed_frames": frames,
                "frames_per_s": round(frames / wall_s, 3) if wall_s > 0 else None,
                "frames_per_s_after_models_ready": round(frames / working_s, 3) if working_s > 0 else None,
                "index_s": self.index_s, "search_s": round(self.search_s, 3),
                "snapshots_s": round(self.snapshots_s, 3), "unnamed_people_s": self.people_s,
                "clips_s": round(self.clips_s, 3), "stages": self.stages, "cluster": self.cluster,
                "index_reused_videos": [r.info.path for r in self.results if r.index_reused],
                "indexed_videos": [r.info.path for r in self.results if r.index_written]}

    def record_progress(self, video_idx: int, count: int) -> int:
        """Count frames a worker has finished; return the count."""
        self.last_frame_s = round(time.monotonic() - self.started, 3)
        if self.first_frame_s is None:
            self.first_frame_s = self.last_frame_s
        self.results[video_idx].processed_frame_count += count
        return count

    def record_track(self, video_idx: int, record: dict) -> None:
        """Keep an ended face track (tracks.track_record) for the video's index."""
        self.results[video_idx].tracks.append(record)

    def record_named(self, result: VideoResult, summary: dict) -> None:
        """Store a searched track piece (naming.name_track): the frames it reports (those that
        count, see naming.sighting_flags) are sightings of its person."""
        if self.debug_rec_file:
            self.log_debug_rec(result.info, summary)
        if summary["name"] is None:
            return
        result.named.append(summary)
        for frame_idx, time_s, bbox, det_score, own_distance in summary["frames"]:
            distance = summary["best_distance"] if own_distance is None else own_distance
            result.detections.append({
                "frame": frame_idx, "time": round(time_s, 6), "time_hms": format_hms(time_s),
                "name": summary["name"], "distance": distance, "similarity": round(1 - distance, 4),
                "bbox": bbox, "det_score": det_score, "track": summary["track"],
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
        """Finish a video's index once every frame its decoder sent has come back, and queue
        it for the finisher thread."""
        result = self.results[video_idx]
        if result.finished or result.sent_frame_count is None or not result.tracked:
            return
        result.finished = True
        self.finish_index(result)
        self.clip_jobs.put(result)

    def finish_index(self, result: VideoResult) -> None:
        """Make a tracked video's index from its tracks and write it to INDEX_DIR (atomically),
        unless it could not be decoded to its end (then the next run indexes it again). Written
        here, in the message loop, so that a run stopped later keeps it."""
        identity = self.identities.get(result.info.idx)
        counts = {**(result.face_counts or {}), "processed_frames": result.processed_frame_count}
        metadata = {**index_metadata(identity or {}, result.info), "counts": counts}
        table = records_table(result.tracks, metadata)
        result.index, result.tracks = table_index(table), []
        if identity is None or result.errors:
            return
        try:
            write_index(index_path(self.index_dir, result.info.output_name), table)
            result.index_written = True
        except OSError as error:
            self.failures.append(f"{error}; the video is searched from memory and indexed again by "
                                 f"the next run")

    def search_video(self, result: VideoResult) -> None:
        """Name a video's tracks from its index (just made, or reused: then from the search over
        all reused indexes) and compute its ranges; nothing without references (--index-only)."""
        with self.lock:  # claimed once: the finisher and mark_unfinished may both try
            if result.searched or result.searching:
                return
            result.searching = True
        started = time.perf_counter()
        summaries = self.named_tracks(result) if self.search is not None else []
        with self.lock:
            for summary in summaries:
                self.record_named(result, summary)
            result.ranges.extend(self.ranges_of(result))
            result.searched, result.index = True, None
            self.search_s += time.perf_counter() - started

    def named_tracks(self, result: VideoResult) -> list:
        """Return the summaries of a video's named track pieces (naming.name_video)."""
        search, settings = self.search, self.settings
        path = index_path(self.index_dir, result.info.output_name)
        if result.index is None:  # reused: found by the search over every reused index
            looks = self.reused_looks.get(path.name, [])
            if not looks:  # no track near anybody: its faces need not be read
                return []
            faces = read_faces(path)[0]
        else:
            faces = faces_with_boxes(result.index.faces)
            looks = video_track_looks(result.index, path, search.ref_embeddings, search.ref_owners,
                                      len(search.people), settings.CUSTOM_THRESHOLD, settings.debug_rec)
        return name_video(faces, looks, search.people, settings)

    def search_unfinished(self, result: VideoResult) -> None:
        """Search what a video stopped midway has so far (its ended tracks), for the reports."""
        if result.searched or result.finished or not result.tracks or self.search is None:
            return
        result.index = table_index(records_table(result.tracks, {"counts": {}}))
        self.search_video(result)

    def ranges_of(self, result: VideoResult) -> list:
        """Return the TimeRanges of a video's detections so far, person by person."""
        by_person = {}
        for d in result.detections:
            by_person.setdefault(d["name"], []).append((d["time"], d["distance"]))
        return [time_range for name in sorted(by_person)
                for time_range in person_ranges(name, by_person[name], result.info, self.settings)]

    def save_reports(self) -> None:
        """Rewrite results.json, results.csv and index.html with everything found so far (none
        with --index-only: nothing is searched)."""
        if self.search is None:
            return
        with self.lock:
            self.write_output(write_reports, self.run, self.results, self.output_dir, self.settings,
                              self.thumbnails)

    def outputs_done(self, result: VideoResult) -> None:
        """Record what this run made in the video's folder (made.json) and, when the video ended
        "ok", remove main.py's files there that this run did not list (stale snapshots and
        clips, .part files of an interrupted run)."""
        folder = self.output_dir / result.info.output_name
        if not result.made and not folder.is_dir():
            return
        self.write_output(write_made, folder, result.made)
        if video_status(result) == "ok":
            try:
                remove_unlisted_files(folder, set(result.made))
            except OSError as error:
                with self.lock:
                    self.failures.append(f"{error.filename}: cannot be removed ({error.strerror}); "
                                         f"it is not part of the results, remove it by hand")

    def write_output(self, write, *args) -> None:
        """Run one write into OUTPUT_DIR. A failure (disk full, no permission) is kept in
        write_error, which stops the run at the next tick; the files written before stay whole."""
        try:
            write(*args)
        except OSError as error:
            with self.lock:
                if self.write_error is None:
                    self.write_error = str(error)

    def finish_videos(self) -> None:
        """Finisher thread: search each queued video, make its snapshots and clips; a None job
        ends it.

        It runs beside the inference (on a GPU machine the CPU is free for ffmpeg), and the
        parent keeps reading results meanwhile.
        """
        while (result := self.next_clip_job()) is not None:
            try:
                self.search_video(result)
                self.save_reports()
                self.write_snapshots(result)
                self.cut_video_clips(result)
            except Exception as error:  # recorded, and the next video is still finished
                with self.lock:
                    message = f"{result.info.path}: not finished ({type(error).__name__}: {error})"
                    result.errors.append(message)
                    self.failures.append(message)
                    result.clips += [(None, None)] * (len(result.ranges) - len(result.clips))
            if len(result.clips) == len(result.ranges) and self.search is not None:
                self.outputs_done(result)  # not stopped halfway by Ctrl-C; not --index-only
            self.save_reports()

    def next_clip_job(self) -> VideoResult | None:
        """Return the next video to finish; None ends the finisher thread (also once the run is
        stopping and no job is waiting)."""
        while True:
            try:
                return self.clip_jobs.get(timeout=QUEUE_TIMEOUT_S)
            except queue.Empty:
                if self.stop_clips.is_set():
                    return None

    def write_snapshots(self, result: VideoResult) -> None:
        """Write a snapshot of each named track's best looks (naming.snapshot_looks): the frames
        are decoded again (snapshots.frames_at), except those whose snapshot is on disk as made
        before (resume.made_before)."""
        started = time.perf_counter()
        folder, settings = self.output_dir / result.info.output_name, self.settings
        made, fingerprint = read_made(folder) if settings.RESUME else {}, self.fingerprints.get(result.info.idx)
        todo = []
        for summary in result.named:
            for look in summary["snapshot_looks"]:
                path = snapshot_path(self.output_dir, result.info, look[0], look[1], summary["name"])
                key = snapshot_key(fingerprint, look, summary["person"], settings)
                entry = made_before(made, folder, path.name, key)
                if entry is not None:
                    self.note_made(result, path.name, entry, snapshot=True)
                else:
                    todo.append((path, key, look, summary))
        if todo and not self.stop_clips.is_set():
            self.make_snapshots(result, todo)
        self.snapshots_s += time.perf_counter() - started

    def make_snapshots(self, result: VideoResult, todo: list) -> None:
        """Decode the frames of these snapshots and write them; a video that cannot be decoded
        again is this video's error (its ranges and clips still come)."""
        folder = self.output_dir / result.info.output_name
        try:
            frames = frames_at(result.info, [look[1] for _, _, look, _ in todo])
        except Exception as error:
            message = (f"{result.info.path}: snapshots not made: its frames could not be decoded "
                       f"again ({type(error).__name__}: {error})")
            with self.lock:
                result.errors.append(message)
                self.failures.append(message)
            return
        for path, key, look, summary in todo:
            image = frames.get(look[1])
            if image is None:
                continue
            jpeg = encode_snapshot(image, look[2], summary["name"], look[3], summary["person"],
                                   self.settings)
            write_bytes_atomic(path, jpeg, flush=False)
            self.note_made(result, path.name, made_entry(folder, path.name, key), snapshot=True)

    def note_made(self, result: VideoResult, name: str, entry: dict, snapshot: bool = False) -> None:
        """Record a file of this run in the video's folder (made.json), and a snapshot as one."""
        with self.lock:
            result.made[name] = entry
            if snapshot:
                result.snapshots.add(name)

    def cut_video_clips(self, result: VideoResult) -> None:
        """Cut the clips of one video's ranges, in order, unless the run is stopping; a clip made
        before from the same range of the same video, in the same mode, is reused."""
        fast = self.settings.CLIP_MODE == "fast"
        folder = self.output_dir / result.info.output_name
        clip_dir = folder / "clips"
        made = read_made(folder) if self.settings.RESUME else {}
        keyframes = None
        for time_range in result.ranges:
            if self.stop_clips.is_set():
                break
            started = time.monotonic()
            name, key = f"clips/{clip_file_name(time_range)}", clip_key(
                self.fingerprints.get(result.info.idx), time_range, self.settings)
            clip = self.reused_clip(result, made, name, key, time_range)
            if clip is None:
                if keyframes is None:
                    keyframes = packet_times_s(result.info, keyframes_only=True) if fast else []
                clip_start_s = keyframe_before(keyframes, time_range.start_s) if fast else time_range.start_s
                clip = self.cut_one(result, time_range, clip_dir, clip_start_s)
                if clip is None:  # stopped: this range and the later ones have no clip entry
                    break
                if clip[0] is not None:
                    self.note_made(result, name, made_entry(folder, name, key, clip_start=clip[1]))
            with self.lock:
                result.clips.append(clip)
                self.clips_s += time.monotonic() - started

    def reused_clip(self, result: VideoResult, made: dict, name: str, key: dict,
                    time_range: TimeRange) -> tuple | None:
        """Return (path, clip start) of a clip made before that may be reused (resume.made_before,
        and it still plays as cut), else None."""
        folder = self.output_dir / result.info.output_name
        entry = made_before(made, folder, name, key)
        if entry is None or "clip_start" not in entry:
            return None
        problem = reused_clip_problem(folder, name, entry, result.info, time_range.end_s,
                                      self.settings.CLIP_MODE)
        if problem is not None:
            print(f"[*] {folder / name}: cut again: {problem}")
            return None
        self.note_made(result, name, entry)
        return str(folder / name), entry["clip_start"]

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
