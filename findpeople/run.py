"""One run from start to end, in the parent: inputs, indexes, the pipeline, the search, the summary.

In: the Settings. Checks the output folder, reads the reference photos, lists and probes the
videos, reuses every current index in INDEX_DIR (searching those at once), indexes the other
videos with the pipeline (each searched as soon as its index is written), and prints the
summary. With --index-only: no photos, no search, only the indexes. Returns the exit code: 0 all went well; 1 something was skipped or failed;
2 nothing could start; 130 interrupted (what was found so far is saved).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from .errors import BadInput, OutputError, PipelineBroken
from .settings import Settings
from .outputs import output_folder_lock
from .ring import check_fits_ring, ring_memory_budget
from .folders import list_videos, unique_output_names
from .decode import probe_video
from .providers import both_onnxruntime_builds_problem
from .models import classify_pack_models, find_model_pack, load_face_models
from .references import list_reference_photos, load_references, reference_matrix, scan_reference_folder
from .index import checked_index, index_identity, index_path, model_sha256, read_index, remove_abandoned_parts
from .search import cached_stamps, file_stamp, open_templates, search_templates
from .clips import find_ffmpeg
from .reports import nobody_found_hint, summary_table, video_done, video_report
from .resume import execution_fingerprint, video_fingerprint
from .snapshots import frames_at
from .people import people_report, people_table, read_last_people, save_best_faces, save_person_photo, unnamed_people
from .runstate import RunState, SearchInputs, VideoResult
from .pipeline import run_pipeline
from .indexer import node_label
from .cluster import import_ray, index_on_cluster, ray_cluster


def prepare_references(settings: Settings) -> tuple:
    """Return (references, problems), the references computed with the CPU provider in the
    parent."""
    if not list_reference_photos(Path(settings.REFERENCE_DIR)):
        raise BadInput(no_photo_message(Path(settings.REFERENCE_DIR)))
    models = load_face_models(settings, "cpu", max(1, (os.cpu_count() or 2)))
    references, problems, notes = load_references(Path(settings.REFERENCE_DIR), models, settings)
    report_problems("reference photos skipped", problems)
    report_problems("reference photos", notes)
    if not references:
        raise BadInput(f"no usable reference photo in {settings.REFERENCE_DIR}: add a photo per "
                       f"person named after them (e.g. Barack_Obama.jpg) showing the face clearly")
    return references, problems


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


def prepare_search(settings: Settings, held: contextlib.ExitStack, index_only: bool = False) -> tuple:
    """Return (video paths, references, problems, model files), with the output folder's lock
    entered into held (not with index_only: no photos, no output folder); raise BadInput for no
    videos, an output folder that cannot be written or that another run uses, no usable
    reference photo or no usable models."""
    output_dir = Path(settings.OUTPUT_DIR)
    video_paths = videos_outside_output(list_videos(Path(settings.VIDEO_DIR)), output_dir)
    if not video_paths:
        raise BadInput(f"no videos in {settings.VIDEO_DIR}: put .mp4/.mkv/.avi/... files there "
                       f"and one photo per person in {settings.REFERENCE_DIR} (Name.jpg); or "
                       f"see a complete example first with: python main.py --demo")
    model_paths = list(classify_pack_models(find_model_pack(settings.MODEL_ROOT, settings.MODEL_PACK_NAME)))
    check_index_dir(Path(settings.INDEX_DIR))
    if index_only:
        return video_paths, [], [], model_paths
    check_output_dir(output_dir)
    held.enter_context(output_folder_lock(output_dir))
    return (video_paths, *prepare_references(settings), model_paths)


def check_index_dir(folder: Path) -> None:
    """Create INDEX_DIR and check that a file can be made in it (check_output_dir's test)."""
    try:
        check_output_dir(folder)
    except BadInput as error:
        raise BadInput(str(error).replace("output folder", "index folder").replace(
            "--output", "--index-dir")) from None


def start_run(settings: Settings, video_paths: list, references: list, problems: list,
              model_paths: list, reindex: bool = False, cluster=None) -> RunState:
    """Return the run's state: ffmpeg found, videos probed, current indexes reused (those made
    on any of the cluster's kinds of node, with --ray)."""
    if references:
        print(f"[*] people: {', '.join(f'{r.name} ({len(r.photos)} photo(s))' for r in references)}")
    ffmpeg = find_ffmpeg(settings.FFMPEG_DIR)
    if references:
        print(f"[*] ffmpeg: {ffmpeg or 'NOT FOUND - clips will not be cut (pip install imageio-ffmpeg)'}")
    videos, video_problems = probe_all(video_paths, Path(settings.VIDEO_DIR))
    report_problems("videos skipped", video_problems)
    search = SearchInputs(*reference_matrix(references), [r.name for r in references]) \
        if references else None
    state = RunState(videos, settings, ffmpeg, run_header(settings, references, ffmpeg), search)
    state.failures.extend(problems + video_problems)  # each printed once already, above
    state.skipped_early = len(problems)
    if ffmpeg is None and references:
        state.failures.append(f"no ffmpeg in {settings.FFMPEG_DIR}/, on PATH or from "
                              f"imageio-ffmpeg: clips were not cut")
    plan_indexes(state, model_paths, reindex, cluster.executions if cluster else None)
    return state


def plan_indexes(state: RunState, model_paths: list, reindex: bool,
                 executions: list | None = None) -> None:
    """Take every video's index in INDEX_DIR that is current (same video content, model files,
    INDEX_SETTINGS and providers, this machine's or any of executions; readable) unless reindex
    or RESUME is off; say why each other one is indexed again. A reused video is finished: it is
    not decoded again."""
    settings = state.settings
    index_dir = Path(settings.INDEX_DIR)
    remove_abandoned_parts(index_dir)
    executions = executions or [execution_fingerprint(settings)]
    models, execution = model_sha256(model_paths), executions[0]
    checked = cached_stamps(index_dir)  # read whole when cached: then only the metadata is checked
    for result in state.results:
        info = result.info
        try:
            state.fingerprints[info.idx] = video_fingerprint(info.path)
        except OSError as error:  # indexed, but its index is not written
            print(f"[!] {info.path}: cannot be read to recognise it ({error.strerror or error}): "
                  f"it is indexed, but its index is not kept for a rerun")
            continue
        state.identities[info.idx] = index_identity(state.fingerprints[info.idx], models, settings,
                                                    execution)
        if not reindex and settings.RESUME:
            reuse_index(state, result, checked, executions)
    reused = sum(r.index_reused for r in state.results)
    why = " (--reindex)" if reindex else " (--force: RESUME off)" if not settings.RESUME else ""
    print(f"[*] index {index_dir}: {reused} video(s) reused, {len(state.results) - reused} to "
          f"index{why}")


def reuse_index(state: RunState, result: VideoResult, checked: dict,
                executions: list | None = None) -> None:
    """Mark a video finished from its index if that is current, made on any of executions (its
    pages are checked unless the search cache read it whole as it is: checked); else say why it
    is indexed again."""
    info = result.info
    path = index_path(Path(state.settings.INDEX_DIR), info.output_name)
    if not path.exists():
        return
    identity = state.identities[info.idx]
    read_data = checked.get(path.name) != file_stamp(path)
    problem, metadata = checked_index(path, identity, read_data)
    for execution in (executions or [])[1:]:  # made on another kind of node of the cluster
        if problem is not None and metadata is not None and metadata.get("execution") == execution:
            problem, metadata = checked_index(path, {**identity, "execution": execution}, read_data)
    if problem is not None:
        print(f"[*] {Path(info.path).name}: indexed again: {problem}")
        return
    counts = metadata.get("counts") or {}
    result.index_reused = result.finished = True
    result.face_counts = counts if "looks_per_track" in counts else None
    result.processed_frame_count = int(counts.get("processed_frames", 0))


def search_reused(state: RunState) -> None:
    """Search every reused index at once (search.search_templates over INDEX_DIR's track
    templates), and queue those videos for the finisher thread."""
    reused = [r for r in state.results if r.index_reused]
    if reused and state.search is not None:
        started = time.perf_counter()
        search = state.search
        templates = open_templates(Path(state.settings.INDEX_DIR))
        found = search_templates(templates, search.ref_embeddings, search.ref_owners,
                                 len(search.people), state.settings.CUSTOM_THRESHOLD)
        for track in found:
            state.reused_looks.setdefault(Path(track.index_file).name, []).append(track)
        for result in reused:  # left out of the cache (damaged since): searched from the file
            name = index_path(Path(state.settings.INDEX_DIR), result.info.output_name).name
            if name in templates.skipped:
                result.index = read_index(Path(state.settings.INDEX_DIR) / name)
        state.search_s += time.perf_counter() - started
    for result in reused:
        state.clip_jobs.put(result)


def search_videos(state: RunState, cluster=None) -> int:
    """Search the reused indexes, index (and search) the other videos (on this machine, or on
    the Ray cluster) and save the reports, also after a broken pipeline or Ctrl-C; return 0, 1
    (broken, or a file could not be written) or 130 (interrupted)."""
    exit_code, why = 0, "the search ended without it"
    if state.settings.debug_rec and state.search is not None:
        state.debug_rec_file = open(state.output_dir / "debug_rec.tsv", "w", encoding="utf-8")
    try:
        search_reused(state)
        if cluster is None:
            run_pipeline(state)
        else:
            index_on_cluster(state, cluster)
        find_unnamed_people(state)
    except BadInput as error:  # a setting the workers cannot follow (GPU_DEVICE_IDS), a damaged index
        print(f"error: {error}", file=sys.stderr)
        state.failures.append(str(error))
        exit_code, why = 2, "not searched (see the error above)"
    except PipelineBroken as error:
        report_broken(state, error)
        exit_code, why = 1, f"pipeline broken ({error.name})"
    except OutputError:  # reported by finish_run
        exit_code, why = 1, "a file in OUTPUT_DIR could not be written"
    except OSError as error:  # the search cache in INDEX_DIR: a full disk, no permission
        print(f"error: {error}", file=sys.stderr)
        state.failures.append(str(error))
        exit_code, why = 1, "a file in INDEX_DIR could not be written"
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


def find_unnamed_people(state: RunState) -> None:
    """Group the tracks no reference named, across every searched video with a current index
    (people.py), save each group's best face and put the groups in results.json; say how many
    and how long it took. A failure here (a damaged index, a full disk) is a problem of the run,
    not of the search: the results stay."""
    if state.search is None:
        return
    started = time.perf_counter()
    current = [r.searched and (r.index_reused or r.index_written) for r in state.results]
    files = [index_path(state.index_dir, r.info.output_name) if ok else None
             for r, ok in zip(state.results, current)]
    named = [{s["track"] for s in r.named} for r in state.results]
    videos = [r.info for r in state.results]
    keys = [json.dumps(state.fingerprints.get(r.info.idx), sort_keys=True) for r in state.results]
    try:
        people, problems = unnamed_people(files, named, videos, state.settings, keys)
        problems += save_best_faces(people, videos, state.output_dir, frames_at)
    except OSError as error:
        state.failures.append(f"unnamed people not grouped: {error}")
        return
    state.failures += problems
    state.run["unnamed_people"] = people_report(people, videos, state.settings)
    state.people_s = round(time.perf_counter() - started, 3)
    if people:
        print(f"[*] unnamed people: {len(people)} group(s) of faces no photo named, in "
              f"{state.people_s:.1f} s (python main.py --people lists them; index.html shows them)")
    else:
        print("[*] unnamed people: none (every face large and long enough to group was named)")


def print_people(settings: Settings) -> int:
    """--people: print the unnamed people of the last search in OUTPUT_DIR; write nothing."""
    try:
        print(people_table(read_last_people(Path(settings.OUTPUT_DIR))))
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def name_person(settings: Settings, spec: str, changed: dict) -> int:
    """--name-person ID=Name: save that unnamed person's best face as REFERENCE_DIR/Name.jpg
    (never over an existing photo), then run the search (its indexes are reused)."""
    try:
        photo = save_person_photo(Path(settings.OUTPUT_DIR), Path(settings.REFERENCE_DIR), spec)
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"[*] wrote {photo}: the search now looks for {photo.stem}")
    return run_search(settings, changed)


def mark_unfinished(state: RunState, why: str) -> None:
    """Give every video that is not done (see video_done) and has no error yet the error 'not
    finished: <why>', so that its entry says why it is not "ok"; one indexed but not searched
    yet, or stopped midway, is searched now with what it has (its ranges, without clips), so
    reports show them, marked incomplete."""
    with state.lock:
        for result in state.results:
            if not video_done(result) and not result.errors:
                result.errors.append(f"{result.info.path}: not finished: {why}")
    for result in state.results:
        try:
            if result.finished:
                state.search_video(result)
            else:
                state.search_unfinished(result)
        except Exception as error:  # the reports are still written
            state.failures.append(f"{result.info.path}: not searched ({type(error).__name__}: {error})")


def report_broken(state: RunState, error: PipelineBroken) -> None:
    """Print a broken pipeline and the videos it left unfinished; record it in failures and in
    each of those videos' errors."""
    with state.lock:
        unfinished = state.unfinished_videos_of(error.name)
        names = ", ".join(Path(r.info.path).name for r in unfinished) or "no video in progress"
        lines = error.remote_traceback.strip().splitlines()
        what = str(error).splitlines()[0] + (f": {lines[-1]}" if lines else "")
        print(f"\n[!] pipeline broken: {error}", file=sys.stderr)
        print(f"[!] {error.name} was working on: {names}. Not finished; a rerun indexes "
              f"{'them' if len(unfinished) > 1 else 'it'} again and reuses the finished videos' indexes",
              file=sys.stderr)
        for result in unfinished:
            result.errors.append(f"{result.info.path}: not finished: {what}")
        state.failures.append(f"pipeline broken: {what}; unfinished: {names}")


def finish_run(state: RunState, exit_code: int) -> int:
    """Print the summary and the problems; return the final exit code (1 if anything failed)."""
    if state.search is None:
        return finish_index_only(state, exit_code)
    entries = [video_report(r, state.output_dir, state.settings.FRAME_INTERVAL) for r in state.results]
    print(summary_table(entries, {r.info.path for r in state.results if r.index_reused}))
    for result in state.results:
        hint = None if result.ranges or result.face_counts is None else \
            nobody_found_hint(result.face_counts, state.settings)
        if hint:
            print(f"[*] {Path(result.info.path).name}: nobody found: {hint}")
    print_timing(state)
    report_problems("problems", final_problems(state))
    if state.write_error:
        print(f"error: {state.write_error}. Free some space (or fix the permissions, or choose "
              f"another --output) and run again: the files saved before are whole, and the videos "
              f"indexed so far are reused", file=sys.stderr)
        return exit_code or 1
    print(f"[*] results: {state.output_dir / 'results.json'}; report: {state.output_dir / 'index.html'}")
    if exit_code == 0 and (state.failures or not state.run["complete"]):
        exit_code = 1
    return exit_code


def print_timing(state: RunState) -> None:
    """Print how many videos were indexed and reused, and how long each stage took."""
    stats = state.run["stats"]
    indexed, reused = len(stats["indexed_videos"]), len(stats["index_reused_videos"])
    print(f"[*] {indexed} video(s) indexed, {reused} index(es) reused; {stats['processed_frames']} "
          f"frames processed in {stats['wall_s']:.1f} s ({stats['frames_per_s'] or 0:.1f} frames/s)")
    print(f"[*] index stage {stats['index_s'] or 0:.1f} s, search {stats['search_s']:.2f} s, "
          f"snapshots {stats['snapshots_s']:.1f} s, clips {stats['clips_s']:.1f} s")
    if stats.get("cluster"):
        print_cluster(stats["cluster"])


def print_cluster(report: dict) -> None:
    """Print which Ray nodes and GPUs indexed the videos (cluster.cluster_report)."""
    used = report["nodes_used"]
    print(f"[*] Ray {report['address']}: {len(used)} of {report['nodes_in_cluster']} node(s) and "
          f"{report['gpus_used']} GPU(s) indexed videos")
    for node in used:
        gpus = f", GPU {', '.join(node['gpus'])}" if node["gpus"] else ""
        print(f"    - {node_label(node)}: {len(node['videos'])} video(s){gpus}")
    if report["retried_videos"]:
        print(f"[*] indexed again after a try that did not finish: "
              f"{', '.join(Path(p).name for p in report['retried_videos'])}")


def finish_index_only(state: RunState, exit_code: int) -> int:
    """Print what --index-only did; return the exit code (1 if a video could not be indexed)."""
    state.run["stats"] = state.stats()
    print_timing(state)
    failed = [r for r in state.results if not r.finished or r.errors]
    for result in failed:
        state.failures.extend(e for e in result.errors if e not in state.failures)
    report_problems("problems", final_problems(state))
    print(f"[*] indexes: {state.index_dir}")
    return exit_code or (1 if state.failures or failed else 0)


def final_problems(state: RunState) -> list:
    """Return the run's problems for the closing list: the reference photos skipped (printed at
    the start, possibly hundreds) as one line with their count, then every other problem, the
    videos skipped included (named again: the start has scrolled away after a long run)."""
    photos = state.skipped_early
    early = [f"{photos} reference photo(s) skipped: listed at the start (and in results.json's "
             f"failures)"] if photos else []
    return early + state.failures[photos:]


def run_search(settings: Settings, changed: dict, index_only: bool = False,
               reindex: bool = False) -> int:
    """Run the whole search (or with index_only, only index the videos; reindex: make every
    index again), first printing the changed settings (by name); return the exit code (see the
    module's docstring). The output folder stays locked until the end."""
    with contextlib.ExitStack() as held:
        return run_locked_search(settings, changed, held, index_only, reindex)


def run_locked_search(settings: Settings, changed: dict, held: contextlib.ExitStack,
                      index_only: bool = False, reindex: bool = False) -> int:
    """Run the whole search; the output folder's lock goes into held (see run_search)."""
    cluster = None
    try:
        for name, value in changed.items():
            print(f"[*] {name} = {value!r}")
        if settings.RAY_ADDRESS:
            import_ray(settings.RAY_ADDRESS)  # before anything else: the pip command, exit 2
        if both_onnxruntime_builds_problem():
            print(f"[!] {both_onnxruntime_builds_problem()}")
        inputs = prepare_search(settings, held, index_only)
        if settings.RAY_ADDRESS:
            cluster = held.enter_context(ray_cluster(settings, inputs[3]))
        state = start_run(settings, *inputs, reindex=reindex, cluster=cluster)
    except (BadInput, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[!] interrupted before the search started", file=sys.stderr)
        return 130
    try:
        return finish_run(state, search_videos(state, cluster))
    except KeyboardInterrupt:  # just before the search, or again while the reports are written
        print("\n[!] interrupted: the reports are those of the last finished video",
              file=sys.stderr)
        return 130


def stop_on_sigterm(signum, frame) -> None:
    """Treat SIGTERM (kill, a service manager) like Ctrl-C: stop cleanly, keep what was found."""
    raise KeyboardInterrupt
