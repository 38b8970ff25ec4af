"""A run's output folder: whose it is, who is writing it, and what `--resume` may change.

Three promises, each enforced here before `train` writes anything:

- `--overwrite` deletes only what qlora-lab wrote. Every run writes a marker file first
  (`.qlora-lab-run.json`, listing the top-level entries the run owns); a folder without one is
  never cleared, and a cleared folder loses only the entries the marker and `RUN_ENTRIES` name.
  A user's project folder that happens to hold a `config.yaml` is refused, not emptied.
- One writer at a time. `RunLock` takes an exclusive `flock` on the folder's lock file for the
  life of the process; a second `train` on the same folder stops with one line. The kernel drops
  the lock when the holder dies, so a `kill -9` never leaves a stale lock behind.
- `--resume` repeats the run it resumes. The saved `config.yaml` is compared key by key with this
  invocation's config before any file is touched: keys that only change bookkeeping, speed or
  memory (`RESUME_MAY_CHANGE`) are applied; any other change is refused, naming the key.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from qlora_lab import checkpoints, fsio
from qlora_lab.config import RunConfig, load_run_config, to_dict
from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

MARKER = ".qlora-lab-run.json"
LOCK = ".qlora-lab.lock"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
# What `train` (and `eval`'s default report dir) write at the top of a run folder. Tokenizer files
# vary by tokenizer, so the marker lists the ones this run saved.
RUN_ENTRIES = (MARKER, CONFIG, "adapter", CHECKPOINTS, "metrics.jsonl", "summary.json",
               "tensorboard", "eval")

# Keys a resumed run may change: none of them changes which rows are seen in which order, the
# model, or the optimisation, so the resumed run still equals an uninterrupted one.
RESUME_MAY_CHANGE = frozenset({
    "model.trust_remote_code", "model.allow_pickle", "model.varlen_kernel",
    "data.skip_bad_rows", "train.output_dir",  # a run folder may be moved or copied
    "train.save_steps", "train.save_total_limit", "train.logging_steps", "train.eval_steps",
    "train.tensorboard", "train.compile", "train.liger", "train.fused_loss",
    "train.activation_offload", "train.gradient_checkpointing", "train.checkpoint_every",
})


# --- ownership ---------------------------------------------------------------------------------


def is_run_dir(out: Path) -> bool:
    return (Path(out) / MARKER).is_file()


def _listed_entries(out: Path) -> set[str]:
    """Top-level names the marker says this run wrote (only plain names: never a path)."""
    try:
        record = json.loads((out / MARKER).read_text(encoding="utf-8"))
        names = record.get("entries", []) if isinstance(record, dict) else []
    except (OSError, ValueError):
        names = []
    return {n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")}


def write_marker(out: Path, extra_entries=()) -> None:
    """Claim `out` for qlora-lab (first write of every run), listing what the run wrote."""
    entries = sorted(set(RUN_ENTRIES) | _listed_entries(out) | {Path(e).name for e in extra_entries})
    fsio.write_text(out / MARKER, json.dumps({"tool": "qlora-lab", "entries": entries}) + "\n")


def _run_entries(out: Path) -> list[str]:
    """What a run wrote at the top of `out`, its marker last."""
    return sorted(_listed_entries(out) | set(RUN_ENTRIES) - {MARKER}) + [MARKER]


def clear_run(out: Path) -> None:
    """Delete what an earlier run wrote in `out` (never anything else; links are unlinked)."""
    for name in _run_entries(out):
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.is_dir():
            shutil.rmtree(path)
    leftover = [p.name for p in out.iterdir() if p.name != LOCK]
    if leftover:
        log.info("--overwrite kept %d entries no qlora-lab run wrote in %s: %s", len(leftover),
                 out, ", ".join(sorted(leftover)[:5]))


# --overwrite moves the earlier run here rather than deleting it: a new run that fails before
# its first checkpoint (a NaN loss, a full disk) gives it back. A `.tmp-` name: a run killed
# meanwhile leaves it for the next start's fsio.remove_stale.
REPLACED = f"{fsio.TMP_PREFIX}replaced-run"


def set_aside_run(out: Path) -> Path:
    """Move what an earlier run wrote in `out` into `out/REPLACED`; return that folder."""
    aside = out / REPLACED
    aside.mkdir()
    for name in _run_entries(out):
        if os.path.lexists(out / name):
            os.rename(out / name, aside / name)  # same folder: a rename, no copy
    leftover = [p.name for p in out.iterdir() if p.name not in (LOCK, REPLACED)]
    if leftover:
        log.info("--overwrite kept %d entries no qlora-lab run wrote in %s: %s", len(leftover),
                 out, ", ".join(sorted(leftover)[:5]))
    return aside


def restore_run(out: Path, aside: Path) -> None:
    """Undo `set_aside_run`: delete what the new run wrote, put the earlier run back."""
    clear_run(out)
    for path in aside.iterdir():
        os.rename(path, out / path.name)
    aside.rmdir()


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse to clobber anything unless told to; make sure the dir can be written.

    Returns True when `--overwrite` must clear an earlier run. The caller clears it only once the
    config, data and model have loaded, so a mistake in any of them costs nothing.
    """
    if out.is_symlink() and (overwrite or resume):
        raise UserError(f"output dir {out} is a symbolic link (to {os.readlink(out)}) — pass the "
                        f"real folder {out.resolve()} to --output-dir")
    if out.exists() and not out.is_dir():
        raise UserError(f"output dir {out} is a file — pass a directory to --output-dir")
    try:
        existing = out.is_dir() and any(p.name != LOCK for p in out.iterdir())
        # Resuming rewrites only a run's own files, and its config.yaml must parse as a run
        # config (check_resume_config), so a run copied without its marker may resume;
        # clearing needs the marker.
        ours = is_run_dir(out) or (resume and (out / CONFIG).is_file())
        if existing and not ours and (resume or overwrite):
            what = "--resume continues" if resume else "--overwrite replaces"
            raise UserError(f"output dir {out} holds files that no qlora-lab run wrote (no "
                            f"{MARKER}); {what} only qlora-lab runs — pick another "
                            "--output-dir")
        if existing and not resume and not overwrite:
            raise UserError(f"output dir {out} is not empty — pass --resume to continue that "
                            "run, --overwrite to replace it, or another --output-dir")
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f"{fsio.TMP_PREFIX}write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output dir {out} is not writable ({exc.strerror}) — pick another "
                        "--output-dir") from None
    return existing and not resume


class RunLock:
    """An exclusive, non-blocking `flock` on `out/.qlora-lab.lock`, held until `release`."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self._fh = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks to take
            return self
        self._fh = open(self.path, "a+")  # noqa: SIM115 - held open for the run's lifetime
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.release()
            raise UserError(f"output dir {self.path.parent} is in use by another qlora-lab "
                            "process — wait for it to finish, or pick another --output-dir"
                            ) from None
        return self

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None


# --- resume ------------------------------------------------------------------------------------


def find_checkpoint(out: Path, resume: str | bool | None) -> str | None:
    """The checkpoint `--resume` continues from; None means "start at step 0".

    `--resume` alone picks the newest complete checkpoint. A run killed before its first
    checkpoint has none: it starts again (losing less than one save interval, as promised).
    A name (`checkpoint-200`) or a path picks that checkpoint, which must be complete and belong
    to this run: a checkpoint of another folder would make this run's pruning delete that
    folder's checkpoints and its outputs overwrite this folder's.
    """
    if resume in (None, False):
        return None
    root = out / CHECKPOINTS
    if resume is True:
        newest = checkpoints.newest_usable(root)
        if newest is not None:
            return str(newest)
        existing = checkpoints.list_all(root)
        if existing:
            raise UserError(f"--resume: no usable checkpoint in {root} ({existing[-1].name} "
                            f"{checkpoints.problem(existing[-1])}) — restore it, or pass "
                            "--overwrite instead of --resume to start the run again")
        if (out / CONFIG).is_file():
            log.warning("--resume: %s has no checkpoint yet (it stopped before the first one); "
                        "starting it again from step 0", out)
            return None
        raise UserError(f"--resume: no checkpoint in {root} — train without --resume "
                        "first (checkpoints are written every train.save_steps steps)")
    given = Path(str(resume)).expanduser()
    candidate = given if given.exists() else root / str(resume)
    if not candidate.exists():
        raise UserError(f"--resume {resume}: no such checkpoint — pass a checkpoint-N folder "
                        f"from {root}, or --resume alone for the newest")
    issue = checkpoints.problem(candidate)
    if issue:
        raise UserError(f"--resume {resume}: {candidate} {issue} — pick another checkpoint from "
                        f"{root}, or --resume alone for the newest complete one")
    if candidate.resolve().parent != root.resolve():
        raise UserError(f"--resume {resume}: {candidate} is not a checkpoint of {out} — pass a "
                        f"checkpoint-N folder from {root}, or the --output-dir of the run it "
                        "belongs to")
    return str(candidate)


def check_checkpoint_matches(checkpoint: str, cfg: RunConfig) -> None:
    """Refuse a checkpoint whose adapter has another shape than the config asks for.

    A run's config.yaml edited by hand (or a checkpoint copied from another run) would otherwise
    fail deep inside Trainer's load, after the run's files were rewritten.
    """
    path = Path(checkpoint) / "adapter_config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # checkpoints.problem already vetted the adapter weights; nothing to compare
    for key, mine in (("r", cfg.lora.r), ("lora_alpha", cfg.lora.alpha)):
        theirs = saved.get(key) if isinstance(saved, dict) else None
        if theirs is not None and theirs != mine:
            raise UserError(f"--resume: {checkpoint} was trained with {key} = {theirs!r:.40} but "
                            f"the config says {mine} (lora.{'r' if key == 'r' else 'alpha'}) — "
                            "restore the run's config.yaml, or start a new run with another "
                            "--output-dir")


def _flat(cfg: RunConfig) -> dict:
    return {f"{section}.{key}": value for section, values in to_dict(cfg).items()
            for key, value in values.items()}


def check_resume_config(out: Path, cfg: RunConfig) -> None:
    """Refuse a resume whose config differs from the saved run's in a key that changes results.

    Runs before anything is loaded or written, so a refused resume leaves the run resumable.
    """
    saved_path = out / CONFIG
    if not saved_path.is_file():
        return  # killed before its config was written: nothing to compare, nothing to keep
    saved = load_run_config(saved_path)
    now, before = _flat(cfg), _flat(saved)
    for key in now:
        if key in RESUME_MAY_CHANGE or now[key] == before[key]:
            continue
        raise UserError(f"--resume: {key} is {now[key]!r:.80} now but {before[key]!r:.80} in "
                        f"{saved_path} — a resumed run repeats its config (only "
                        f"{', '.join(sorted(k.split('.')[1] for k in RESUME_MAY_CHANGE))} may "
                        "change); drop the change, or start a new run with another --output-dir")


def checkpoint_is_final(checkpoint: str | None) -> bool:
    """Whether `checkpoint` was written at the run's last step (its max_steps)."""
    if checkpoint is None:
        return False
    try:
        state = json.loads((Path(checkpoint) / checkpoints.STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    max_steps = state.get("max_steps") if isinstance(state, dict) else None
    return isinstance(max_steps, int) and max_steps > 0 and state["global_step"] >= max_steps


def finished_summary(out: Path, checkpoint: str | None) -> dict | None:
    """The saved summary when `checkpoint` is the end of a run that completed, else None.

    Resuming a finished run must not train or rewrite anything: Trainer would otherwise run its
    end-of-training steps again and replace the adapter.
    """
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / checkpoints.STATE_FILE).read_text(encoding="utf-8"))
    max_steps = state.get("max_steps")
    if not isinstance(max_steps, int) or state["global_step"] < max_steps:
        return None
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (out / "adapter" / checkpoints.ADAPTER_FILE).is_file():
        return None
    if not isinstance(summary, dict) or summary.get("steps") != state["global_step"]:
        return None
    return summary
