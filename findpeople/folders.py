"""Input folders: what the video folder and the reference folder hold, links followed.

Runs in the parent, before anything is opened. In: a folder. Out: `walk_folder`'s `FolderListing`
of its files and subfolders; `list_videos` (the videos to probe, each file once, and what is only
to be named) and `unique_output_names`; `references.reference_files` uses the listing for the
photos. Links to folders are followed and each real folder is walked once: a link that leads back
to a folder above it (a loop), or into a folder walked already, is not followed and gets one
note. Real subfolders are walked before links, so a folder inside the walked folder is listed
under its own path. Dead links and subfolders that cannot be opened are listed, to be named; a
file reached through several paths (links, hard links) is known by `file_identity`.
"""
from __future__ import annotations

import errno
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput


# Containers with timestamps that PyAV (ffmpeg) reads: searched.
_VIDEO_EXTENSIONS = {".mp4", ".mkv", ".avi", ".mov", ".m4v", ".webm", ".wmv", ".flv", ".mpg",
                     ".mpeg", ".ts", ".mts", ".m2ts", ".3gp", ".vob", ".ogv", ".mxf", ".asf",
                     ".f4v", ".qt", ".divx", ".dv", ".nut", ".mod", ".tod", ".lrv", ".insv", ".ivf",
                     ".rm", ".rmvb"}
# Raw video streams: no container, so no timestamps. Listed, so that the probe names each with
# the stream's own frame rate (decode.refuse_raw_stream), whatever its name.
_RAW_STREAM_EXTENSIONS = {".h264", ".264", ".h265", ".265", ".hevc", ".m2v"}
# Raw pictures without a container's timestamps, and formats ffmpeg reads badly: named as
# skipped, with how to convert them.
_OTHER_VIDEO_EXTENSIONS = {".y4m", ".yuv", ".mjpeg", ".dav"}


@dataclass
class FolderListing:
    """What walk_folder found under one folder, each list in walking order."""

    files: list = field(default_factory=list)  # one path per way to a file (links included)
    folders: list = field(default_factory=list)  # every subfolder found, walked or not
    dead_links: list = field(default_factory=list)  # links that lead to nothing
    unreadable: list = field(default_factory=list)  # (folder, OSError): could not be listed
    notes: list = field(default_factory=list)  # one per link to a folder that was not followed


def file_identity(path: Path) -> tuple:
    """Return what a path leads to (links followed) as (device, inode): equal for every path to
    one file, through symbolic or hard links; the real path where the file system has no inode
    numbers (st_ino 0 on some network shares on Windows)."""
    status = path.stat()
    return (status.st_dev, status.st_ino) if status.st_ino else (0, str(path.resolve()))


def entry_kind(path: Path) -> str:
    """Return "folder", "file", "dead link" or "other" (a pipe, a socket, a device: never
    opened) for what a path leads to, links followed; an entry that cannot be looked at is a
    "file", so that opening it says why."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "dead link" if path.is_symlink() else "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return "file" if stat.S_ISREG(mode) else "other"


def walk_folder(folder: Path, max_depth: int | None = None) -> FolderListing:
    """Return the files, subfolders and dead links under folder, sorted within each folder. Links
    are followed; each real folder is walked once (see the module's docstring). Files deeper than
    max_depth subfolders (None: any depth) are left out: max_depth 1 lists the folder's files and
    those of its subfolders."""
    listing, walked = FolderListing(), {}
    real, linked = deque([(folder, 0)]), deque()
    while real or linked:
        directory, depth = (real or linked).popleft()
        if not claim_folder(directory, walked, listing):
            continue
        for entry in folder_entries(directory, listing):
            kind = entry_kind(entry)
            if kind == "dead link":
                listing.dead_links.append(entry)
            elif kind == "file":
                listing.files.append(entry)
            elif kind == "folder":
                listing.folders.append(entry)
                if max_depth is None or depth < max_depth:
                    (linked if entry.is_symlink() else real).append((entry, depth + 1))
    return listing


def folder_entries(directory: Path, listing: FolderListing) -> list:
    """Return a folder's entries, sorted; none if it cannot be listed (added to unreadable)."""
    try:
        return sorted(directory.iterdir())
    except OSError as error:
        listing.unreadable.append((directory, error))
        return []


def claim_folder(directory: Path, walked: dict, listing: FolderListing) -> bool:
    """Return True if this real folder has not been walked yet (and mark it walked); else add a
    note that the link leading to it is not followed."""
    try:
        identity = file_identity(directory)
    except OSError as error:
        listing.unreadable.append((directory, error))
        return False
    if identity not in walked:
        walked[identity] = directory
        return True
    target = directory.resolve()
    if directory.parent.resolve().is_relative_to(target):
        listing.notes.append(f"{directory}: not followed: this link leads back to {target}, a "
                             f"folder above it (a loop of links)")
    else:
        listing.notes.append(f"{directory}: not followed: this link leads to {walked[identity]}, "
                             f"which is listed already")
    return False


def dead_link_message(path: Path) -> str:
    """Return the message for a link that leads to nothing: where it points, and what to do."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    try:
        path.stat()
        why = "which cannot be reached"
    except OSError as error:
        why = "a loop of links that never reaches a file" if error.errno == errno.ELOOP else \
            "which does not exist (moved, deleted, or on a disk that is not mounted)"
    return f"{path}: is a link to {target}, {why}; fix the link or remove it"


def unreadable_folder_message(path: Path, error: OSError, what: str) -> str:
    """Return the message for a subfolder that cannot be listed: why, and that `what` in it (the
    videos, the photos) are not used."""
    return (f"{path}: this folder cannot be opened ({error.strerror or error}), so {what} in it "
            f"are left out; make it readable (chmod a+rx, or ask its owner), or move them out")


def list_videos(folder: Path) -> list:
    """Return what the video folder holds, sorted: each video file once, by its real path (links
    to files and folders are followed, see walk_folder), and what decode.probe_video names
    without searching: folders named like a video, dead links, files in other video formats,
    subfolders that cannot be opened. Prints a note for each other way to a file or folder that
    is not followed; raises BadInput if the folder is missing."""
    if not folder.is_dir():
        raise BadInput(f"video folder {folder} does not exist: create it and put your videos in it "
                       f"(or see a complete example first with: python main.py --demo)")
    listing = walk_folder(folder)
    named = [p for p in listing.files if p.suffix.lower() in
             _VIDEO_EXTENSIONS | _RAW_STREAM_EXTENSIONS | _OTHER_VIDEO_EXTENSIONS]
    files, notes = first_path_of_each_file(named)
    for note in listing.notes + notes:
        print(f"[*] {note}")
    folders = [p.resolve() for p in listing.folders if p.suffix.lower() in _VIDEO_EXTENSIONS]
    dead = [p for p in listing.dead_links  # a link to a video or to a folder, not to notes.txt
            if p.suffix.lower() in _VIDEO_EXTENSIONS | _RAW_STREAM_EXTENSIONS or not p.suffix]
    return sorted({*files, *folders, *dead, *(p for p, _ in listing.unreadable)})


def first_path_of_each_file(paths: list) -> tuple:
    """Return ([the real path of each file, once], [a note for each other path to one of them]):
    a path reached without a link comes first, then in sorted order."""
    first, notes = {}, []
    for path in sorted(paths, key=lambda p: (p.resolve() != p.absolute(), p)):
        try:
            identity = file_identity(path)
        except OSError:  # probe_video says why
            identity = (0, str(path))
        if identity in first:
            notes.append(f"{path}: the same file as {first[identity]}: searched once, as "
                         f"{first[identity].resolve()}")
        else:
            first[identity] = path
    return [p.resolve() for p in first.values()], notes


def unique_output_names(paths: list, root: Path) -> list:
    """Return one output folder name per video, no two alike even ignoring case (as folders on
    Windows and macOS are): its stem; where stems clash, its path under root with the extension
    (a/x.mp4 -> a_x_mp4); a name still taken gets _2, _3, ..."""
    stems = [p.stem.casefold() for p in paths]

    def long_name(path: Path) -> str:
        relative = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        return "_".join([*relative.parent.parts, relative.stem, relative.suffix.lstrip(".")])
    names, taken = [], set()
    for path in paths:
        name = path.stem if stems.count(path.stem.casefold()) == 1 else long_name(path)
        unique, number = name, 1
        while unique.casefold() in taken:
            number += 1
            unique = f"{name}_{number}"
        taken.add(unique.casefold())
        names.append(unique)
    return names


def listed_only_to_be_named(path: Path) -> str | None:
    """Return the message for what list_videos lists only to name it: a dead link, a folder that
    cannot be opened, a file in a video format that is not searched; None for anything else."""
    if entry_kind(path) == "dead link":
        return dead_link_message(path)
    if path.is_dir():
        try:
            os.scandir(path).close()
        except OSError as error:
            return unreadable_folder_message(path, error, "the videos")
        return None
    suffix = path.suffix.lower()
    if suffix in _OTHER_VIDEO_EXTENSIONS:
        known = ", ".join(sorted(_VIDEO_EXTENSIONS))
        return (f"{path}: is not searched: {suffix} is not one of the video formats searched "
                f"({known}); convert it (ffmpeg -i IN -c:v libx264 OUT.mp4) and search that")
    return None
