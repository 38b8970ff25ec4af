"""Checkpoints on disk: written atomically, checked before resuming, pruned to the last N.

Trainer writes `checkpoint-N/` file by file (adapter, optimizer, scheduler, RNG, trainer state).
Killed in the middle, it leaves a folder that looks like a checkpoint but lacks its optimizer or
state, and resuming from it crashes or silently restarts. So `train.py` has Trainer write each
checkpoint inside a hidden staging dir (`checkpoints/.tmp-checkpoint-N/`), and `publish` fsyncs it
and renames it to `checkpoint-N` only once every file is on disk: a `checkpoint-N` folder is
complete by construction. `problem` still checks a checkpoint before resuming from it, for folders
that were copied, edited, or written by other tools.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

from qlora_lab import fsio, safety
from qlora_lab.errors import UserError

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^checkpoint-(\d+)$")  # Trainer's PREFIX_CHECKPOINT_DIR naming
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter_model.safetensors"
# torch.save files Trainer needs to continue exactly; rng_state*.pth is one per process.
TORCH_FILES = ("optimizer.pt", "scheduler.pt")


def name_for(step: int) -> str:
    return f"checkpoint-{step}"


def step_of(path: Path) -> int | None:
    match = NAME_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def staging_dir(root: Path, step: int) -> Path:
    """The hidden dir Trainer writes `checkpoint-{step}` into; the same path on every process."""
    return Path(root) / f"{fsio.TMP_PREFIX}{name_for(step)}"


def prepare_staging(root: Path, step: int) -> Path:
    staging = staging_dir(root, step)
    shutil.rmtree(staging, ignore_errors=True)  # left by a run killed at this very step
    staging.mkdir(parents=True)
    return staging


def publish(root: Path, step: int) -> Path:
    """Flush the staged `checkpoint-{step}` and rename it into `root`; return its final path.

    Until this rename nothing named `checkpoint-*` exists for the step, so a kill at any earlier
    moment leaves only the staging dir, which `fsio.remove_stale` deletes on the next start.
    """
    staging, final = staging_dir(root, step), Path(root) / name_for(step)
    fsio.publish_dir(staging / name_for(step), final)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def list_all(root: Path) -> list[Path]:
    """`checkpoint-N` folders under `root`, oldest step first (staging dirs never match)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and p.is_dir()]
    return sorted(found, key=step_of)


def problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from, or None if it looks complete.

    Cheap checks only: files present, trainer state parses, the adapter's safetensors header
    matches its size, and each torch file ends with a zip directory (torch.save writes zips, so a
    truncated file has none). Reading every tensor would cost as much as resuming.
    """
    path = Path(path)
    if any(part.startswith(fsio.TMP_PREFIX) for part in path.parts):
        return "is an unfinished checkpoint (its write was interrupted)"
    if not path.is_dir():
        return "is not a checkpoint folder"
    if (path / FSDP_MODEL_DIR).is_dir():
        return sharded_problem(path)
    for name in (STATE_FILE, ADAPTER_FILE, *TORCH_FILES):
        if not (path / name).is_file():
            return f"has no {name}"
    issue = _state_problem(path)
    if issue:
        return issue
    adapter_problem = safety.safetensors_problem(path / ADAPTER_FILE)
    if adapter_problem:
        return f"has an {ADAPTER_FILE} that {adapter_problem}"
    return _torch_files_problem(path, TORCH_FILES, "a truncated or corrupted")


def _state_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint's trainer_state.json (None: a readable global_step)."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return f"has a corrupted {STATE_FILE} (not JSON)"
    step = state.get("global_step") if isinstance(state, dict) else None
    # bool is an int to Python; a step is a count, never negative.
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"has a corrupted {STATE_FILE} (no global_step)"
    return None


def _torch_files_problem(path: Path, names: tuple, what: str) -> str | None:
    """torch.save writes zips: a file that is not one (truncated, garbled, absent) is named."""
    for name in (*names, *sorted(p.name for p in path.glob("rng_state*.pth"))):
        if not zipfile.is_zipfile(path / name):
            return f"has {what} {name}"
    return None


# Under FSDP with SHARDED_STATE_DICT, accelerate writes the adapter and the optimizer as
# torch.distributed.checkpoint folders (each rank its shard, `.metadata` written last) instead of
# adapter_model.safetensors and optimizer.pt.
FSDP_MODEL_DIR, FSDP_OPTIMIZER_DIR = "pytorch_model_fsdp_0", "optimizer_0"


def sharded_problem(path: Path) -> str | None:
    """`problem` for an FSDP sharded checkpoint: its own files, the same cheap checks."""
    for folder in (FSDP_MODEL_DIR, FSDP_OPTIMIZER_DIR):
        # `.metadata` is written last, by the coordinator, once every rank's shard is on disk.
        # A shard may be empty: a rank can hold none of the saved (trainable) weights.
        if not (path / folder / ".metadata").is_file():
            return f"has no {folder}/.metadata (its sharded write was interrupted)"
    return _state_problem(path) or _torch_files_problem(path, ("scheduler.pt",),
                                                        "a missing or truncated")


def global_step(path: Path) -> int:
    """The optimizer step a checkpoint was written at (call `problem` first)."""
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))["global_step"]


LAYOUT_FILE = "qlora_lab_layout.json"


def write_layout(path: Path, world_size: int) -> None:
    """Record how many processes wrote a checkpoint: its data position is counted per process."""
    (Path(path) / LAYOUT_FILE).write_text(json.dumps({"world_size": world_size}) + "\n",
                                          encoding="utf-8")


def check_layout(path: Path, world_size: int) -> None:
    """Refuse to resume a checkpoint written by a different number of processes.

    Trainer skips the micro-batches already seen by counting them per process; with another
    world size it would skip the wrong rows and silently repeat or drop data. Checkpoints from
    before this file existed carry no layout and are accepted.
    """
    layout = Path(path) / LAYOUT_FILE
    if not layout.is_file():
        return
    try:
        written = int(json.loads(layout.read_text(encoding="utf-8"))["world_size"])
    except (ValueError, KeyError, TypeError):
        return
    if written != world_size:
        raise UserError(f"--resume: {path} was written by {written} process(es) and this run has "
                        f"{world_size} — the data position is counted per process, so resume "
                        f"with {written} (torchrun --nproc-per-node {written}), or start again "
                        "with --overwrite")


def newest_usable(root: Path) -> Path | None:
    """The newest checkpoint that passes `problem`; broken newer ones are skipped with a warning."""
    for path in reversed(list_all(root)):
        issue = problem(path)
        if issue is None:
            return path
        log.warning("skipping %s: it %s", path, issue)
    return None


def prune(root: Path, keep: int, current: Path) -> None:
    """Delete checkpoints until `keep` remain, never `current` (the one just written).

    Checkpoints with a higher step than `current` come from a run that was resumed from an older
    checkpoint (`--resume checkpoint-N`): they go first, then the oldest.
    """
    current_step = step_of(current)
    others = [p for p in list_all(root) if p.name != Path(current).name]
    others.sort(key=lambda p: (step_of(p) < current_step, step_of(p)))
    for path in others[: max(0, len(others) + 1 - keep)]:
        shutil.rmtree(path, ignore_errors=True)
