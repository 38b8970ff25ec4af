"""Crash-safe writes: build beside the target, fsync, then rename.

`os.replace` of a file or an empty-target directory is atomic on POSIX filesystems, so a reader
(or a resumed run) sees either the old version or the complete new one, never half of it. The
fsyncs make that hold across a power cut too: without them the rename can reach the disk before
the data it points to, and the "complete" file comes back empty.

Temporary names start with `.tmp-`, so nothing that lists checkpoints or runs ever mistakes one
for real output; `remove_stale` deletes what a killed process left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


def _fsync_path(path: Path) -> None:
    # Directories are opened read-only too: fsync on a directory fd flushes its entries.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (and `root` itself) to disk."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def commit_file(tmp: Path, path: Path) -> None:
    """Flush a fully written `tmp` and rename it over `path` (same directory)."""
    _fsync_path(Path(tmp))
    os.replace(tmp, path)
    _fsync_path(Path(path).parent)


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (a kill leaves the old file or the new one)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        commit_file(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def publish_dir(staging: Path, target: Path) -> None:
    """Move a fully written `staging` dir to `target`, replacing an older `target` if any.

    A directory cannot be renamed over a non-empty one, so an existing target is first moved
    aside; a kill between the two renames leaves no `target` but both copies under `.tmp-` names
    (resume then falls back to the previous checkpoint, losing at most one interval).
    """
    fsync_tree(staging)
    old = None
    if target.exists():
        old = target.with_name(f"{TMP_PREFIX}old-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    _fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temp dir beside `target`; on success it becomes `target` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    try:
        yield staging
        publish_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale(directory: Path) -> list[Path]:
    """Delete `.tmp-*` leftovers of a killed writer in `directory`; return what was removed."""
    removed = []
    if not Path(directory).is_dir():
        return removed
    for entry in Path(directory).iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
