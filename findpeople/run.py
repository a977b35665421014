"""One search from start to end, in the parent: inputs, resume, the pipeline, reports, the summary.

In: the Settings. Checks the output folder, reads the reference photos, lists and probes the
videos, reuses the videos an earlier run finished (RESUME), runs the pipeline over the rest, and
prints the summary. Returns the exit code: 0 all went well; 1 something was skipped or failed;
2 nothing could start; 130 interrupted (what was found so far is saved).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

from .errors import BadInput, OutputError, PipelineBroken
from .settings import Settings
from .outputs import output_folder_lock
from .ring import check_fits_ring, ring_memory_budget
from .folders import list_videos, unique_output_names
from .decode import VideoInfo, probe_video
from .providers import both_onnxruntime_builds_problem
from .models import load_face_models
from .references import list_reference_photos, load_references, scan_reference_folder
from .clips import find_ffmpeg
from .reports import nobody_found_hint, summary_table, video_done, video_report
from .resume import (
    read_saved_video, remove_unlisted_files, reuse_problem, run_fingerprint, saved_clips_problem,
    saved_video_path, video_fingerprint)
from .runstate import RunState, VideoResult
from .pipeline import run_pipeline


def prepare_references(settings: Settings) -> tuple:
    """Return (references, problems, [detector file, recognizer file]), the references computed
    with the CPU provider in the parent."""
    if not list_reference_photos(Path(settings.REFERENCE_DIR)):
        raise BadInput(no_photo_message(Path(settings.REFERENCE_DIR)))
    models = load_face_models(settings, "cpu", max(1, (os.cpu_count() or 2)))
    references, problems, notes = load_references(Path(settings.REFERENCE_DIR), models, settings)
    report_problems("reference photos skipped", problems)
    report_problems("reference photos", notes)
    if not references:
        raise BadInput(f"no usable reference photo in {settings.REFERENCE_DIR}: add a photo per "
                       f"person named after them (e.g. Barack_Obama.jpg) showing the face clearly")
    return references, problems, [Path(models.det_path), Path(models.rec_path)]


def no_photo_message(folder: Path) -> str:
    """Return the message for a reference folder without a photo in a supported format: empty,
    or only files in other formats (an iPhone's .heic), which it counts."""
    others = scan_reference_folder(folder)[2]
    if not others:
        return (f"no photo in {folder}: add one photo per person named after them (e.g. "
                f"Barack_Obama.jpg), or try: python main.py --demo")
    kinds = ", ".join(sorted({p.suffix.lower() or "no extension" for p in others}))
    return (f"no photo in {folder} in a format this can read: its {len(others)} file(s) are in "
            f"other formats ({kinds}, e.g. {others[0].name}); convert them to .jpg or .png (an "
            f"iPhone's .heic: export as JPEG, or set Settings > Camera > Formats > Most Compatible)")


def probe_all(paths: list, video_dir: Path) -> tuple:
    """Return ([VideoInfo] for the usable videos, [problems]): each problem names the file, what
    is wrong and what to do (see read_head, probe_video, check_fits_ring)."""
    videos, problems = [], []
    budget_bytes, why = ring_memory_budget()
    for path in paths:
        try:
            info = probe_video(path, len(videos), path.stem)
            check_fits_ring(info, budget_bytes, why)
            videos.append(info)
        except BadInput as error:
            problems.append(str(error))
        except Exception as error:  # an odd file must not stop the run: it is skipped by name
            problems.append(f"{path}: cannot be probed ({type(error).__name__}: {error}); check "
                            f"that it plays in a video player, or remove it from the folder")
    # Output folders are named among the videos searched: a file refused above (a dead link, a
    # raw stream) must not rename a video's folder, and so lose its saved results.
    names = unique_output_names([Path(v.path) for v in videos], video_dir.resolve())
    return [dataclasses.replace(v, output_name=name) for v, name in zip(videos, names)], problems


def run_header(settings: Settings, references: list, ffmpeg: str | None) -> dict:
    """Return the run-level fields of results.json."""
    return {"tool": "find-people-in-videos", "format_version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": False,
            "threshold_kind": "cosine distance = 1 - cosine similarity; match when <= CUSTOM_THRESHOLD",
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.values.items()},
            "people": [{"name": r.name, "photos": r.photos} for r in references],
            "ffmpeg": ffmpeg, "failures": []}


def report_problems(title: str, problems: list) -> None:
    """Print a titled list of problems (nothing when empty)."""
    if problems:
        print(f"[!] {title}:")
        for problem in problems:
            print(f"    - {problem}")


def check_output_dir(folder: Path) -> None:
    """Create the output folder and make (and remove) a file in it; raise BadInput naming the
    folder if that fails, so an unwritable folder stops the run before any heavy work."""
    import tempfile
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"output folder {folder} is a file, not a folder: choose another with --output")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise BadInput(f"output folder {folder} cannot be written ({error.strerror or error}): "
                       f"choose another with --output, or make it writable") from None


def videos_outside_output(paths: list, output_dir: Path) -> list:
    """Return the videos that are not inside OUTPUT_DIR: with the output folder inside the video
    folder, its clips would otherwise be searched by the next run (saying so when it happens)."""
    output = output_dir.resolve()
    kept = [p for p in paths if not p.is_relative_to(output)]
    if len(kept) < len(paths):
        print(f"[*] {len(paths) - len(kept)} video(s) inside the output folder {output_dir} (the "
              f"clips of earlier runs) are not searched")
    return kept


def prepare_search(settings: Settings, held: contextlib.ExitStack) -> tuple:
    """Return (video paths, references, problems, model files), with the output folder's lock
    entered into held; raise BadInput for no videos, an output folder that cannot be written or
    that another run uses, no usable reference photo or no usable models."""
    output_dir = Path(settings.OUTPUT_DIR)
    video_paths = videos_outside_output(list_videos(Path(settings.VIDEO_DIR)), output_dir)
    if not video_paths:
        raise BadInput(f"no videos in {settings.VIDEO_DIR}: put .mp4/.mkv/.avi/... files there "
                       f"and one photo per person in {settings.REFERENCE_DIR} (Name.jpg); or "
                       f"see a complete example first with: python main.py --demo")
    check_output_dir(output_dir)
    held.enter_context(output_folder_lock(output_dir))
    return (video_paths, *prepare_references(settings))


def start_run(settings: Settings, video_paths: list, references: list, problems: list,
              model_paths: list) -> RunState:
    """Return the run's state: ffmpeg found, videos probed, earlier results reused (RESUME)."""
    print(f"[*] people: {', '.join(f'{r.name} ({len(r.photos)} photo(s))' for r in references)}")
    ffmpeg = find_ffmpeg(settings.FFMPEG_DIR)
    print(f"[*] ffmpeg: {ffmpeg or 'NOT FOUND - clips will not be cut (pip install imageio-ffmpeg)'}")
    videos, video_problems = probe_all(video_paths, Path(settings.VIDEO_DIR))
    report_problems("videos skipped", video_problems)
    state = RunState(videos, settings, ffmpeg, run_header(settings, references, ffmpeg))
    state.failures.extend(problems + video_problems)  # each printed once already, above
    state.skipped_early = len(problems)
    if ffmpeg is None:
        state.failures.append(f"no ffmpeg in {settings.FFMPEG_DIR}/, on PATH or from "
                              f"imageio-ffmpeg: clips were not cut")
    plan_resume(state, run_fingerprint(settings, references, model_paths))
    return state


def plan_resume(state: RunState, fingerprint: dict) -> None:
    """Reuse every video an earlier run finished with the same fingerprint (when RESUME is on),
    removing what a later, interrupted run left in its folder. Every other video is searched
    from scratch, and nothing of it is removed before its new results are saved (save_video):
    a rerun stopped early loses nothing."""
    for result in state.results:
        info = result.info
        try:
            state.fingerprints[info.idx] = {"video": video_fingerprint(info.path), **fingerprint}
        except OSError as error:  # searched, but not saved for a rerun
            print(f"[!] {info.path}: cannot be read to recognise it ({error.strerror or error}): "
                  f"its results will not be reused by a rerun")
            continue
        saved = reusable_video(state, info) if state.settings.RESUME else None
        if saved is not None:
            reuse_video(state, result, saved)
    reused = sum(r.reused is not None for r in state.results)
    if not state.settings.RESUME:
        print("[*] --force (RESUME off): every video is searched again")
    elif reused:
        print(f"[*] {reused} of {len(state.results)} video(s) reused from an earlier run "
              f"(--force searches them again)")


def reuse_video(state: RunState, result: VideoResult, saved: dict) -> None:
    """Take a video's saved results as this run's (under its path now: the folder may have
    moved), and remove main.py's files in its folder that they do not list."""
    info = result.info
    result.reused, result.finished = {**saved["entry"], "file": info.path}, True
    print(f"[*] reused: {Path(info.path).name} (finished by an earlier run, "
          f"{saved_video_path(state.output_dir, info)})")
    try:
        stale = remove_unlisted_files(state.output_dir / info.output_name, saved)
    except OSError as error:
        state.failures.append(f"{error.filename}: cannot be removed ({error.strerror}); it is "
                              f"not part of the results, remove it by hand")
        return
    if stale:
        print(f"[*] {Path(info.path).name}: removed {len(stale)} file(s) an interrupted later "
              f"run left, e.g. {stale[0].name}")


def reusable_video(state: RunState, info: VideoInfo) -> dict | None:
    """Return what an earlier run saved for this video (video.json), if it can be reused; else
    None, saying why when there was a saved one."""
    path = saved_video_path(state.output_dir, info)
    try:
        saved = read_saved_video(path)
    except BadInput as error:
        print(f"[!] {error}")
        return None
    if saved is None:
        return None
    problem = reuse_problem(saved, state.fingerprints[info.idx], path.parent, state.output_dir) \
        or saved_clips_problem(saved["entry"], info, state.output_dir, state.settings.CLIP_MODE)
    if problem is not None:
        print(f"[*] {Path(info.path).name}: searched again: {problem} (since {path})")
        return None
    return saved


def search_videos(state: RunState, references: list) -> int:
    """Search every video not reused and save the reports, also after a broken pipeline or
    Ctrl-C; return 0, 1 (broken, or a file could not be written) or 130 (interrupted)."""
    exit_code, why = 0, "the search ended without it"
    if state.settings.debug_rec:
        state.debug_rec_file = open(state.output_dir / "debug_rec.tsv", "w", encoding="utf-8")
    try:
        if any(r.reused is None for r in state.results):
            run_pipeline(state, references)
    except BadInput as error:  # a setting the workers cannot follow (GPU_DEVICE_IDS)
        print(f"error: {error}", file=sys.stderr)
        state.failures.append(str(error))
        exit_code, why = 2, "not searched (see the error above)"
    except PipelineBroken as error:
        report_broken(state, error)
        exit_code, why = 1, f"pipeline broken ({error.name})"
    except OutputError:  # reported by finish_run
        exit_code, why = 1, "a file in OUTPUT_DIR could not be written"
    except KeyboardInterrupt:
        print("\n[!] interrupted: results so far are saved, marked incomplete", file=sys.stderr)
        exit_code, why = 130, "interrupted"
    finally:
        if state.debug_rec_file:
            state.debug_rec_file.close()
        mark_unfinished(state, why)
        state.run["complete"] = exit_code == 0 and all(video_done(r) for r in state.results)
        state.run["failures"] = state.failures
        state.run["stats"] = state.stats()
        state.save_reports()
    return exit_code


def mark_unfinished(state: RunState, why: str) -> None:
    """Give every video that is not done (see video_done) and has no error yet the error 'not
    finished: <why>', so that its entry says why it is not "ok"; one stopped midway gets the
    ranges of what was found so far (without clips), so reports show them, marked incomplete."""
    with state.lock:
        for result in state.results:
            if not video_done(result) and not result.errors:
                result.errors.append(f"{result.info.path}: not finished: {why}")
            if not result.finished and result.reused is None and not result.ranges:
                result.ranges = state.ranges_of(result)


def report_broken(state: RunState, error: PipelineBroken) -> None:
    """Print a broken pipeline and the videos it left unfinished; record it in failures and in
    each of those videos' errors."""
    with state.lock:
        unfinished = state.unfinished_videos_of(error.name)
        names = ", ".join(Path(r.info.path).name for r in unfinished) or "no video in progress"
        lines = error.remote_traceback.strip().splitlines()
        what = str(error).splitlines()[0] + (f": {lines[-1]}" if lines else "")
        print(f"\n[!] pipeline broken: {error}", file=sys.stderr)
        print(f"[!] {error.name} was working on: {names}. Not finished; a rerun searches "
              f"{'them' if len(unfinished) > 1 else 'it'} again and reuses the finished videos",
              file=sys.stderr)
        for result in unfinished:
            result.errors.append(f"{result.info.path}: not finished: {what}")
        state.failures.append(f"pipeline broken: {what}; unfinished: {names}")


def finish_run(state: RunState, exit_code: int) -> int:
    """Print the summary and the problems; return the final exit code (1 if anything failed)."""
    entries = [video_report(r, state.output_dir, state.settings.FRAME_INTERVAL) for r in state.results]
    print(summary_table(entries, {r.info.path for r in state.results if r.reused is not None}))
    for result in state.results:
        hint = None if result.ranges or result.face_counts is None else \
            nobody_found_hint(result.face_counts, state.settings)
        if hint:
            print(f"[*] {Path(result.info.path).name}: nobody found: {hint}")
    stats = state.run["stats"]
    print(f"[*] {stats['processed_frames']} frames in {stats['wall_s']:.1f} s "
          f"({stats['frames_per_s'] or 0:.1f} frames/s; first frame after {stats['first_frame_s']} s)")
    report_problems("problems", final_problems(state))
    if state.write_error:
        print(f"error: {state.write_error}. Free some space (or fix the permissions, or choose "
              f"another --output) and run again: the files saved before are whole, and the videos "
              f"finished so far are reused", file=sys.stderr)
        return exit_code or 1
    print(f"[*] results: {state.output_dir / 'results.json'}; report: {state.output_dir / 'index.html'}")
    if exit_code == 0 and (state.failures or not state.run["complete"]):
        exit_code = 1
    return exit_code


def final_problems(state: RunState) -> list:
    """Return the run's problems for the closing list: the reference photos skipped (printed at
    the start, possibly hundreds) as one line with their count, then every other problem, the
    videos skipped included (named again: the start has scrolled away after a long run)."""
    photos = state.skipped_early
    early = [f"{photos} reference photo(s) skipped: listed at the start (and in results.json's "
             f"failures)"] if photos else []
    return early + state.failures[photos:]


def run_search(settings: Settings, changed: dict) -> int:
    """Run the whole search, first printing the changed settings (by name); return the exit code
    (see the module's docstring). The output folder stays locked until the end."""
    with contextlib.ExitStack() as held:
        return run_locked_search(settings, changed, held)


def run_locked_search(settings: Settings, changed: dict, held: contextlib.ExitStack) -> int:
    """Run the whole search; the output folder's lock goes into held (see run_search)."""
    try:
        for name, value in changed.items():
            print(f"[*] {name} = {value!r}")
        if both_onnxruntime_builds_problem():
            print(f"[!] {both_onnxruntime_builds_problem()}")
        prepared = prepare_search(settings, held)
        state = start_run(settings, *prepared)
    except (BadInput, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[!] interrupted before the search started", file=sys.stderr)
        return 130
    try:
        return finish_run(state, search_videos(state, prepared[1]))
    except KeyboardInterrupt:  # just before the search, or again while the reports are written
        print("\n[!] interrupted: the reports are those of the last finished video",
              file=sys.stderr)
        return 130


def stop_on_sigterm(signum, frame) -> None:
    """Treat SIGTERM (kill, a service manager) like Ctrl-C: stop cleanly, keep what was found."""
    raise KeyboardInterrupt
