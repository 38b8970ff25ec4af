"""Crash-safe writes: build beside the target, fsync, then rename.

`os.replace` of a file or an empty-target directory is atomic on POSIX filesystems, so a reader
(or a resumed run) sees either the old version or the complete new one, never half of it. The
fsyncs make that hold across a power cut too: without them the rename can reach the disk before
the data it points to, and the "complete" file comes back empty.

Temporary names start with `.tmp-`, so nothing that lists checkpoints or runs ever mistakes one
for real output; `remove_stale` deletes what a killed process left behind.

Two more properties every writer here keeps:
- Published files and dirs get the usual permissions for the process umask (0644/0755 under
  umask 022), not the 0600/0700 of `mkstemp`/`mkdtemp` (or of safetensors, which creates its
  files 0600 too): a merged model must be readable by the container that serves it.
- Nothing is written through a symlink. A rename replaces a link itself, never its target; and
  `check_inside` refuses a path that a symlink (say, an `eval -> /elsewhere` shipped inside a
  downloaded run folder) would lead out of the folder the user chose.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qlora_lab.errors import UserError

TMP_PREFIX = ".tmp-"


def current_umask() -> int:
    """The process umask.

    Linux shows it in /proc/self/status; elsewhere the only way to read it is to set it and set
    it back, and for that instant it is 0o077, so a file another thread creates meanwhile comes
    out too private rather than too open.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o077)
    os.umask(old)
    return old


def check_inside(root: Path, path: Path, fix: str = "remove the symlink or choose another "
                 "output dir") -> Path:
    """Refuse `path` unless it resolves, symlinks followed, to `root` or somewhere under it.

    `root` itself may be a symlink (the user chose it); only what lies below it is checked.
    Returns the resolved path. A non-existent tail resolves to itself, so a missing file is fine.
    """
    real_root, real = Path(os.path.realpath(root)), Path(os.path.realpath(path))
    if not real.is_relative_to(real_root):
        raise UserError(f"{path} leads outside {root} (it resolves to {real}, through a "
                        f"symlink) — nothing was written; {fix}")
    return real


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


def write_text(path: Path, text: str, inside: Path | None = None) -> None:
    """Replace `path` with `text` atomically (a kill leaves the old file or the new one).

    A symlink at `path` is replaced, not written through. With `inside`, `path` must also stay
    inside that folder once symlinked parents are followed (`check_inside`).
    """
    path = Path(path)
    if inside is not None:
        check_inside(inside, path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())  # mkstemp made it 0600
            fh.write(text)
        commit_file(Path(tmp), path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def set_umask_modes(root: Path) -> None:
    """Give every file and dir under `root` (and `root`) the modes a plain open/mkdir would.

    Symlinks are skipped: chmod would follow them out of the tree.
    """
    umask = current_umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def publish_dir(staging: Path, target: Path) -> None:
    """Move a fully written `staging` dir to `target`, replacing an older `target` if any.

    A directory cannot be renamed over a non-empty one, so an existing target is first moved
    aside; a kill between the two renames leaves no `target` but both copies under `.tmp-` names
    (resume then falls back to the previous checkpoint, losing at most one interval). A symlink
    at `target` is moved aside and unlinked like a file: its target is never written or deleted.
    """
    set_umask_modes(staging)
    fsync_tree(staging)
    old = None
    if os.path.lexists(target):  # exists() is False for a dangling symlink
        old = target.with_name(f"{TMP_PREFIX}old-{target.name}-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    _fsync_path(target.parent)
    if old is None:
        return
    if old.is_symlink() or not old.is_dir():
        old.unlink(missing_ok=True)
    else:
        shutil.rmtree(old, ignore_errors=True)


class TargetTaken(UserError):
    """`publish_new_dir` found its target filled meanwhile; the finished result was kept."""


def publish_new_dir(staging: Path, target: Path) -> None:
    """Move a fully written `staging` dir to `target`, which must be absent or an empty dir.

    One rename decides, atomically: the kernel replaces an empty dir and refuses anything else
    (a dir that filled up while `staging` was written, a file, a symlink). Refused, `staging`
    stays where it is, named in the error, and `target` is untouched.
    """
    set_umask_modes(staging)
    fsync_tree(staging)
    try:
        os.rename(staging, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise TargetTaken(f"{target} was filled by something else while this was written — "
                          f"nothing there was touched; the result is in {staging}: move it "
                          "where you want it") from None
    _fsync_path(target.parent)


@contextlib.contextmanager
def staged_dir(target: Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temp dir beside `target`; on success it becomes `target` atomically.

    replace=False: `target` may only be absent or empty then (`publish_new_dir`); what appeared
    there meanwhile is never deleted, and the finished result is kept for the user to move.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}-", dir=target.parent))
    try:
        yield staging
        (publish_dir if replace else publish_new_dir)(staging, target)
    except TargetTaken:
        raise  # the finished result stays in `staging`, which the message names
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
