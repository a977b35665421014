"""Reports: results.json, results.csv, index.html and the summary table.

Runs in the parent, after each finished video and at the end. In: the run header and each
video's results. Out: the report files in OUTPUT_DIR, each written atomically.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadInput
from .settings import Settings
from .outputs import person_color, safe_file_name, write_bytes_atomic
from .references import read_image
from .clips import TimeRange

if TYPE_CHECKING:  # annotations only: importing these would make a cycle
    from .runstate import VideoResult


def format_hms(time_s: float) -> str:
    """Return HH:MM:SS.mmm for a time in seconds."""
    millis = int(round(time_s * 1000))
    return f"{millis // 3_600_000:02d}:{millis // 60_000 % 60:02d}:{millis // 1000 % 60:02d}.{millis % 1000:03d}"


def video_done(result: VideoResult) -> bool:
    """Return True once a video is indexed and searched to its end and every range has its clip
    entry (a clip, or None after an error)."""
    return result.finished and result.searched and len(result.clips) == len(result.ranges)


def video_status(result: VideoResult) -> str:
    """Return "ok" (done, see video_done, and no errors), "incomplete" (some frames processed)
    or "failed"."""
    if video_done(result) and not result.errors:
        return "ok"
    return "incomplete" if result.processed_frame_count else "failed"


def video_report(result: VideoResult, output_dir: Path, frame_interval: int) -> dict:
    """Return the results.json entry of one video."""
    info = result.info
    return {
        "file": info.path, "output_folder": info.output_name, "status": video_status(result),
        "errors": result.errors, "fps": round(info.fps, 6), "frame_count": info.frame_count,
        "duration_s": round(info.duration_s, 6), "width": info.width, "height": info.height,
        "video_start_offset_s": round(info.video_start_offset_s, 6),
        "frame_interval": frame_interval, "processed_frame_count": result.processed_frame_count,
        "index_reused": result.index_reused,
        "detections": sorted(result.detections, key=lambda d: (d["frame"], d["name"])),
        "ranges": [range_report(r, *(result.clips[i] if i < len(result.clips) else (None, None)),
                                output_dir) for i, r in enumerate(result.ranges)],
    }


def range_report(time_range: TimeRange, clip: str | None, clip_start_s: float | None,
                 output_dir: Path) -> dict:
    """Return the results.json entry of one range; clip_start is where its clip really starts
    (earlier than start in fast mode: the keyframe before)."""
    return {
        "name": time_range.name, "start": round(time_range.start_s, 3),
        "end": round(time_range.end_s, 3), "start_hms": format_hms(time_range.start_s),
        "end_hms": format_hms(time_range.end_s),
        "first_sighting": round(time_range.first_sighting_s, 3),
        "last_sighting": round(time_range.last_sighting_s, 3),
        "best_distance": round(time_range.best_distance, 4),
        "best_similarity": round(1 - time_range.best_distance, 4),
        "clip": Path(os.path.relpath(clip, output_dir)).as_posix() if clip else None,
        "clip_start": None if clip is None else round(clip_start_s, 3),
        "clip_starts_early_by": None if clip is None else round(time_range.start_s - clip_start_s, 3),
    }


def write_json_atomic(path: Path, data) -> None:
    """Write JSON through a temporary file and os.replace, so no half-written file is left."""
    write_bytes_atomic(path, json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8"))


def write_reports(run: dict, results: list, output_dir: Path, settings: Settings,
                  thumbnails: dict | None = None) -> None:
    """Write results.json, results.csv (one row per range) and index.html for all found so far."""
    videos = [video_report(r, output_dir, settings.FRAME_INTERVAL) for r in results]
    report = {**run, "videos": videos}
    write_json_atomic(output_dir / "results.json", report)
    write_html_report(report, output_dir, thumbnails or {})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["video", "name", "start_s", "end_s", "start_hms", "end_hms",
                     "best_distance", "best_similarity", "clip", "clip_start_s"])
    for entry in videos:
        for r in entry["ranges"]:
            writer.writerow([entry["file"], r["name"], r["start"], r["end"], r["start_hms"],
                             r["end_hms"], r["best_distance"], r["best_similarity"], r["clip"] or "",
                             "" if r["clip_start"] is None else r["clip_start"]])
    write_bytes_atomic(output_dir / "results.csv", buffer.getvalue().encode("utf-8"))


_HTML_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;background:#f6f6f6}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 10px} .meta{color:#666}
.people{display:flex;flex-wrap:wrap;gap:14px}
.person{background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px 12px;width:360px}
.person .pics img{height:120px;border-radius:4px;margin:6px 6px 0 0;vertical-align:top}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px}
.video{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 14px;margin:14px 0}
.row{display:flex;align-items:center;margin:6px 0} .label{width:190px;flex:none;overflow:hidden}
.bar{position:relative;flex:1;height:22px;background:#e6e6e6;border-radius:4px}
.seg{position:absolute;top:0;bottom:0;min-width:3px;border-radius:3px}
.axis{display:flex;justify-content:space-between;color:#777;font-size:12px;margin-left:190px}
table{border-collapse:collapse;margin-top:8px} td,th{padding:3px 10px 3px 0;text-align:left;
border-bottom:1px solid #eee;vertical-align:top} .note{color:#a60}
"""


def link(relative_path: str) -> str:
    """Return a relative path as an href/src value (percent-encoded, so '#', '?' or spaces in a
    video's name cannot break the link)."""
    import html
    from urllib.parse import quote
    return html.escape(quote(relative_path))


def color_hex(person_idx: int) -> str:
    """Return a person's colour as #rrggbb (the snapshots' BGR colour)."""
    blue, green, red = person_color(person_idx)
    return f"#{red:02x}{green:02x}{blue:02x}"


def reference_thumbnail(photo: str, height_px: int = 120) -> str:
    """Return a reference photo as a small JPEG data URI (the report must work offline, alone)."""
    import base64
    import cv2
    try:
        image = read_image(Path(photo))
    except BadInput:
        return ""
    scale = height_px / image.shape[0]
    small = cv2.resize(image, (max(1, int(image.shape[1] * scale)), height_px),
                       interpolation=cv2.INTER_AREA)
    data = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes()
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def snapshot_links(video: dict, output_dir: Path) -> dict:
    """Return {person: [(time_s, distance, relative snapshot path)]} for snapshots on disk."""
    links = {}
    folder = output_dir / video["output_folder"]
    for d in video["detections"]:
        if d.get("recognized"):
            name = f"frame_{d['frame']:07d}_{d['time']:09.3f}s_{safe_file_name(d['name'])}.jpg"
            if (folder / name).is_file():
                links.setdefault(d["name"], []).append(
                    (d["time"], d["distance"], f"{video['output_folder']}/{name}"))
    return links


def html_person_cards(report: dict, links_per_video: list, thumbnails: dict) -> str:
    """Return the people section: reference photo, best snapshot, where and how well found."""
    import html
    cards = []
    for idx, person in enumerate(report["people"]):
        name = person["name"]
        ranges = [(v, r) for v in report["videos"] for r in v["ranges"] if r["name"] == name]
        shots = [s for links in links_per_video for s in links.get(name, [])]
        best = min(shots, key=lambda s: s[1]) if shots else None
        pics = f'<img src="{thumbnails.get(name, "")}" alt="reference photo of {html.escape(name)}">'
        if best:
            pics += (f'<a href="{link(best[2])}"><img src="{link(best[2])}" '
                     f'alt="best match of {html.escape(name)}"></a>')
        if ranges:
            best_d = min(r["best_distance"] for _, r in ranges)
            videos = len({v["file"] for v, _ in ranges})
            found = (f"found in {videos} video(s), {len(ranges)} range(s); best distance "
                     f"{best_d:.3f} (similarity {1 - best_d:.3f})")
        else:
            found = "not found"
        cards.append(f'<div class="person"><b><span class="swatch" style="background:'
                     f'{color_hex(idx)}"></span>{html.escape(name)}</b><div>{found}</div>'
                     f'<div class="pics">{pics}</div></div>')
    return '<div class="people">' + "".join(cards) + "</div>"


def html_video(video: dict, people: list, shots: dict) -> str:
    """Return one video's block: a timeline bar per person found and a table of ranges."""
    import html
    duration = max([video["duration_s"]] + [r["end"] for r in video["ranges"]]) or 1.0
    names = sorted({r["name"] for r in video["ranges"]})
    rows, table = [], []
    for name in names:
        idx = people.index(name) if name in people else 0
        segments = []
        for r in (r for r in video["ranges"] if r["name"] == name):
            left, width = 100 * r["start"] / duration, 100 * (r["end"] - r["start"]) / duration
            tip = f"{name} {r['start_hms']}-{r['end_hms']}, distance {r['best_distance']:.3f}"
            href = link(r["clip"]) if r["clip"] else "#"
            segments.append(f'<a class="seg" href="{href}" title="{html.escape(tip)}" style="left:'
                            f'{left:.3f}%;width:{width:.3f}%;background:{color_hex(idx)}"></a>')
            inside = [s for s in shots.get(name, []) if r["start"] <= s[0] <= r["end"]]
            table.append(html_range_row(r, inside))
        rows.append(f'<div class="row"><div class="label"><span class="swatch" style="background:'
                    f'{color_hex(idx)}"></span>{html.escape(name)}</div><div class="bar">'
                    f'{"".join(segments)}</div></div>')
    if not names:
        nobody = "nobody found" if video["status"] == "ok" else "nobody found so far"
        rows.append(f'<div class="row"><div class="label">{nobody}</div><div class="bar"></div></div>')
    axis = "".join(f"<span>{format_hms(duration * k / 4)}</span>" for k in range(5))
    head = (f'<h3>{html.escape(Path(video["file"]).name)}</h3><div class="meta">'
            f'{format_hms(video["duration_s"])}, {video["processed_frame_count"]} frames processed, '
            f'status {html.escape(video["status"])}</div>')
    ranges = ("<table><tr><th>person</th><th>from</th><th>to</th><th>best distance</th>"
              "<th>clip</th><th>snapshots</th></tr>" + "".join(table) + "</table>") if table else ""
    return (f'<div class="video">{head}{"".join(rows)}<div class="axis">{axis}</div>{ranges}</div>')


def html_range_row(r: dict, shots: list) -> str:
    """Return one table row of a range: times, distance, clip link, snapshot links."""
    import html
    clip = (f'<a href="{link(r["clip"])}">clip</a>' if r["clip"] else "no clip")
    if r["clip"] and r.get("clip_starts_early_by"):
        clip += (f' <span class="note">(fast mode: starts {r["clip_starts_early_by"]:.2f} s early, '
                 f'at the keyframe before)</span>')
    links = " ".join(f'<a href="{link(path)}">{format_hms(t)}</a>' for t, _, path in shots[:12])
    return (f"<tr><td>{html.escape(r['name'])}</td><td>{r['start_hms']}</td><td>{r['end_hms']}</td>"
            f"<td>{r['best_distance']:.3f} (similarity {r['best_similarity']:.3f})</td>"
            f"<td>{clip}</td><td>{links}</td></tr>")


def write_html_report(report: dict, output_dir: Path, thumbnails: dict) -> None:
    """Write index.html: a self-contained page (no internet) showing who was found where."""
    import html
    people = [p["name"] for p in report["people"]]
    threshold = report["settings"]["CUSTOM_THRESHOLD"]
    links_per_video = [snapshot_links(v, output_dir) for v in report["videos"]]  # one pass each
    videos = "".join(html_video(v, people, links) for v, links in zip(report["videos"], links_per_video))
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>People found in '
            f'videos</title><style>{_HTML_STYLE}</style></head><body><h1>People found in '
            f'{len(report["videos"])} video(s)</h1><p class="meta">{html.escape(report["created"])}; '
            f'a face matches when its cosine distance to a person is at most {threshold} (similarity '
            f'at least {1 - threshold:.2f}); model pack {html.escape(report["settings"]["MODEL_PACK_NAME"])}; '
            f'{"complete" if report["complete"] else "INCOMPLETE (interrupted or failed)"}</p>'
            f'<h2>People</h2>{html_person_cards(report, links_per_video, thumbnails)}'
            f'<h2>Videos</h2>{videos}{html_unnamed_people(report.get("unnamed_people"))}</body></html>')
    write_bytes_atomic(output_dir / "index.html", page.encode("utf-8"))


def html_unnamed_people(people: list | None) -> str:
    """Return the section "Other people in these videos": a card per unnamed person (best face,
    screen time, links that open each video at each range, the command that names them)."""
    import html
    if people is None:
        return ""
    if not people:
        return "<h2>Other people in these videos</h2><p>None: every face large and long enough to group was named.</p>"
    cards = []
    for person in people:
        picture = f'<img src="{link(person["snapshot"])}" alt="{person["id"]}">' if person["snapshot"] else ""
        moments = "<br>".join(
            f'{html.escape(Path(v["file"]).name)}: ' + ", ".join(
                f'<a href="{Path(v["file"]).resolve().as_uri()}#t={r["start"]:.2f}">'
                f'{format_hms(r["start"])}-{format_hms(r["end"])}</a>' for r in v["ranges"])
            for v in person["videos"])
        cards.append(f'<div class="person"><b>{person["id"]}</b>: {person["screen_time_s"]:.1f} s on '
                     f'screen, {person["tracks"]} track(s)<div class="pics">{picture}</div>'
                     f'<p>{moments}</p><p class="meta">name them: <code>python main.py --name-person '
                     f'{person["id"]}=First_Last</code></p></div>')
    return f'<h2>Other people in these videos</h2><div class="people">{"".join(cards)}</div>'


def nobody_found_hint(counts: dict, settings: Settings) -> str | None:
    """Return why a searched video found nobody, when its tracker's counts (VideoTracker.counts,
    kept in its index) show a reason the user can act on: no face at all, most faces below
    MIN_FACE_SIZE, or most face tracks recognised fewer than MIN_TRACK_HITS times; else None."""
    faces, small, tracks = counts["faces"], counts["small_faces"], counts["tracks"]
    short = sum(n for looks, n in counts["looks_per_track"].items() if int(looks) < settings.MIN_TRACK_HITS)
    if faces == 0:
        return "no face was detected in it"
    if small >= faces / 2:
        return (f"{100 * small / faces:.0f} % of its {faces} faces were smaller than MIN_FACE_SIZE "
                f"({settings.MIN_FACE_SIZE} px) and never recognised: try --pre-upscale-factor 2 "
                f"(small faces in a large frame) or a lower --min-face-size")
    if tracks and short >= tracks / 2:
        return (f"{short} of its {tracks} face tracks were recognised fewer than MIN_TRACK_HITS "
                f"({settings.MIN_TRACK_HITS}) times (a very short video, or faces that come and go): "
                f"try --min-track-hits 1 or --recognition-interval 1")
    return None


def summary_table(videos: list, reused_files: set) -> str:
    """Return the end-of-run table from the results.json entries: one line per video and person
    found; a video whose index was reused (not decoded again) says so."""
    lines = [f"{'video':<36} {'frames':>7}  {'person':<24} {'ranges':>6} {'best d':>7}  status"]
    for video in videos:
        name = Path(video["file"]).name[:36]
        status = video["status"] + (" (index reused)" if video["file"] in reused_files else "")
        frames = video["processed_frame_count"]
        people = sorted({r["name"] for r in video["ranges"]})
        if not people:
            nobody = "(nobody)" if video["status"] == "ok" else "(nobody so far)"
            lines.append(f"{name:<36} {frames:>7}  {nobody:<24} {0:>6} {'':>7}  {status}")
        for person in people:
            mine = [r["best_distance"] for r in video["ranges"] if r["name"] == person]
            lines.append(f"{name:<36} {frames:>7}  {person:<24} {len(mine):>6} {min(mine):>7.3f}  {status}")
    return "\n".join(lines)
