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
    if is_fsdp_checkpoint(path):
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
# adapter_model.safetensors and optimizer.pt. qlora-lab's own FSDP checkpoints (trainer.py) keep
# the optimizer folder but hold the adapter as one adapter_model.safetensors (save_fsdp_adapter).
FSDP_MODEL_DIR, FSDP_OPTIMIZER_DIR = "pytorch_model_fsdp_0", "optimizer_0"
FSDP_FULL_OPTIMIZER = "optimizer.bin"  # accelerate's name under FULL_STATE_DICT


def is_fsdp_checkpoint(path: Path) -> bool:
    path = Path(path)
    return ((path / FSDP_MODEL_DIR).is_dir() or (path / FSDP_OPTIMIZER_DIR).is_dir()
            or (path / FSDP_FULL_OPTIMIZER).is_file())


def sharded_problem(path: Path) -> str | None:
    """`problem` for an FSDP checkpoint: its own files, the same cheap checks."""
    path = Path(path)
    if (path / ADAPTER_FILE).is_file():  # qlora-lab's layout: the adapter gathered by name
        issue = _adapter_file_problem(path / ADAPTER_FILE)
        if issue:
            return issue
    elif (path / FSDP_MODEL_DIR).is_dir():  # accelerate's layout: adapter shards
        issue = _folder_problem(path, FSDP_MODEL_DIR)
        if issue:
            return issue
        # Every shard empty: no adapter weights at all. accelerate's FSDP1 checkpoints come out so
        # with peft 0.21, which picks no adapter entries from FSDP-wrapped models (the name
        # mismatch that save_adapter works around); resuming would restart the adapter from init.
        if not any(p.stat().st_size for p in (path / FSDP_MODEL_DIR).glob("*.distcp")):
            return (f"has no adapter weights ({FSDP_MODEL_DIR} holds only empty shards, as FSDP "
                    "checkpoints written with peft 0.21 do)")
    else:
        return f"has no {ADAPTER_FILE}"
    torch_files = ("scheduler.pt",)
    if (path / FSDP_FULL_OPTIMIZER).is_file():
        torch_files = (FSDP_FULL_OPTIMIZER, *torch_files)
    else:
        issue = _folder_problem(path, FSDP_OPTIMIZER_DIR)
        if issue:
            return issue
    return _state_problem(path) or _torch_files_problem(path, torch_files,
                                                        "a missing or truncated")


def _folder_problem(path: Path, folder: str) -> str | None:
    # `.metadata` is written last, by the coordinator, once every rank's shard is on disk.
    # A shard may be empty: a rank can hold none of the saved (trainable) weights.
    if not (path / folder / ".metadata").is_file():
        return f"has no {folder}/.metadata (its sharded write was interrupted)"
    return None


def _adapter_file_problem(adapter: Path) -> str | None:
    """A damaged adapter file, or one with no LoRA weight in it (an empty save)."""
    issue = safety.safetensors_problem(adapter)
    if issue:
        return f"has an {ADAPTER_FILE} that {issue}"
    names = safety.tensor_shapes(adapter, fix="")
    if not any(".lora_" in name for name in names):
        return (f"has no adapter weights ({ADAPTER_FILE} holds {len(names)} tensors, "
                "none of them LoRA)")
    return None


def global_step(path: Path) -> int:
    """The optimizer step a checkpoint was written at (call `problem` first)."""
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))["global_step"]


LAYOUT_FILE = "qlora_lab_layout.json"


def write_layout(path: Path, world_size: int, rows: str | None = None) -> None:
    """Record how many processes wrote a checkpoint (its data position is counted per process)
    and which training rows it stands in (`rows_fingerprint`)."""
    layout = {"world_size": world_size, **({"rows": rows} if rows else {})}
    (Path(path) / LAYOUT_FILE).write_text(json.dumps(layout) + "\n", encoding="utf-8")


def rows_fingerprint(rows: list[dict]) -> str:
    """A digest of the tokenized training rows in order: what a checkpoint's data position
    counts through. An edited data file, another template or another split changes it."""
    import hashlib

    digest = hashlib.sha256()
    for row in rows:
        for key in ("input_ids", "labels"):
            digest.update(json.dumps(row.get(key), separators=(",", ":")).encode())
        digest.update(b";")
    return digest.hexdigest()[:16]


def check_rows(path: Path, rows: str) -> None:
    """Refuse to resume a checkpoint trained on other rows: its saved position would point at
    rows it never saw, silently. Checkpoints from before the record are accepted."""
    try:
        written = json.loads((Path(path) / LAYOUT_FILE).read_text(encoding="utf-8")).get("rows")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(written, str) and written != rows:
        raise UserError(f"--resume: {path} was trained on other rows than the data now gives "
                        "(the data file, its filters or the template changed) — restore the "
                        "data it was trained on, or start again with --overwrite")


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


# --- the adapter of an FSDP-wrapped model, picked by name ----------------------------------------
#
# peft 0.21 picks an adapter's entries from a state dict by the names of the modules it walks,
# taking off only a leading `_fsdp_wrapped_module.` (_get_tuner_state_dict_key_prefixes, since
# huggingface/peft#3490). FSDP's auto-wrap nests a unit in every decoder layer and LoRA linear, so
# the names it walks read `layers.0._fsdp_wrapped_module.self_attn...` while the gathered keys read
# `layers.0.self_attn...`: nothing matches, and peft's save_pretrained (like accelerate's
# save_fsdp_model(adapter_only=True), which Trainer's checkpoints use) writes no tensors. So under
# FSDP the adapter's tensors are picked here, with every FSDP segment taken out of the module names.

FSDP_SEGMENT = "_fsdp_wrapped_module."  # what FSDP1 inserts into module names, not state dict keys


def _adapter_owners(model) -> dict[str, str]:
    """`...q_proj.lora_A.default` (a state dict key's owner) -> `...q_proj.lora_A` (peft's file)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter = model.active_adapter
    saved_as = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            name = name.replace(FSDP_SEGMENT, "")
            for attr in module.adapter_layer_names:
                if adapter in getattr(module, attr, {}):
                    saved_as[f"{name}.{attr}.{adapter}"] = f"{name}.{attr}"
    return saved_as


def _refuse_incomplete(what: str, missing: list, expected: int) -> None:
    if not expected or missing:
        raise RuntimeError(f"FSDP adapter {what}: {len(missing)} of {expected} adapter weights "
                           f"are not in the {'gathered state dict' if what == 'save' else 'file'} "
                           f"(first: {(missing or ['no adapter layers found'])[0]}) — refusing "
                           f"to {what} an incomplete adapter")


def fsdp_adapter_tensors(model, full_state: dict) -> dict:
    """The active adapter's tensors in a gathered FSDP state dict, keyed as peft saves them."""
    saved_as = _adapter_owners(model)
    tensors, found = {}, set()
    for key, value in full_state.items():
        owner, _, leaf = key.rpartition(".")
        if owner in saved_as:
            found.add(owner)
            # A copy: gathered tensors can be views of one flat buffer, which safetensors refuses.
            tensors[f"{saved_as[owner]}.{leaf}"] = value.detach().clone()
    _refuse_incomplete("save", sorted(saved_as.keys() - found), len(saved_as))
    return tensors


def fsdp_adapter_state(model, tensors: dict) -> dict:
    """`fsdp_adapter_tensors` undone: peft's file keys back to the FSDP state dict's keys."""
    loaded_as = {saved: owner for owner, saved in _adapter_owners(model).items()}
    state, found = {}, set()
    for key, value in tensors.items():
        saved, _, leaf = key.rpartition(".")
        if saved not in loaded_as:
            raise RuntimeError(f"FSDP adapter load: {key} is not a weight of this model's "
                               "adapter — the checkpoint belongs to another model or LoRA setup")
        found.add(saved)
        state[f"{loaded_as[saved]}.{leaf}"] = value
    _refuse_incomplete("load", sorted(loaded_as.keys() - found), len(loaded_as))
    return state


def save_adapter(model, adapter_dir: Path, full_state: dict | None = None) -> None:
    """Write adapter_model.safetensors and adapter_config.json, as plain peft loads them.

    `full_state`: under FSDP, the model's state dict gathered onto this rank (FULL_STATE_DICT);
    the sharded model cannot give its weights itself, and peft alone would pick none of them.
    """
    model.save_pretrained(adapter_dir, state_dict=full_state)  # config, model card, weights
    if full_state is None:
        return
    from safetensors.torch import save_file

    tmp = Path(adapter_dir) / f"{fsio.TMP_PREFIX}{ADAPTER_FILE}"
    save_file(fsdp_adapter_tensors(model, full_state), tmp, metadata={"format": "pt"})
    fsio.commit_file(tmp, Path(adapter_dir) / ADAPTER_FILE)  # over peft's empty file


def _full_state_type(wrapped, offload_to_cpu: bool):
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # rank0_only only shapes the gather; a load always reads the full dict on every rank.
    return FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=offload_to_cpu,
                                                    rank0_only=True))


def save_fsdp_adapter(wrapped, checkpoint_dir: Path, write: bool) -> None:
    """Every rank: gather an FSDP1-wrapped peft model's weights; where `write`, save its adapter.

    The gather is FULL_STATE_DICT, a collective that assembles the whole model (4-bit base
    included, moved to host RAM on GPUs) on rank 0, as the final `adapter/` save does. Whatever
    `fsdp_state_dict_type` says, the checkpoint's adapter is then one safetensors file: plain peft
    loads it, and `load_fsdp_adapter` reads it back on any number of processes.
    """
    on_gpu = any(p.device.type == "cuda" for p in wrapped.parameters())
    with _full_state_type(wrapped, offload_to_cpu=on_gpu):  # FSDP1 cannot offload CPU tensors
        full_state = wrapped.state_dict()
    if write:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        save_adapter(wrapped.module, Path(checkpoint_dir), full_state)


def load_fsdp_adapter(wrapped, checkpoint_dir: Path) -> None:
    """Every rank: load a checkpoint's adapter_model.safetensors into an FSDP1-wrapped peft model.

    Each rank reads the whole (small) adapter file and FSDP's FULL_STATE_DICT load keeps its own
    shard of every unit; the base weights are absent from the file and left as they are.
    """
    from safetensors.torch import load_file

    state = fsdp_adapter_state(wrapped.module, load_file(Path(checkpoint_dir) / ADAPTER_FILE))
    with _full_state_type(wrapped, offload_to_cpu=False):
        result = wrapped.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"FSDP adapter load: {len(result.unexpected_keys)} weights were not "
                           f"taken (first: {result.unexpected_keys[0]})")


def load_fsdp_optimizer(wrapped, optimizer, checkpoint_dir: Path) -> None:
    """Every rank: load `optimizer_0/` (accelerate's save_fsdp_optimizer, SHARDED_STATE_DICT).

    accelerate's own load_fsdp_optimizer asks FSDP1 which entries to read (FSDP.optim_state_dict),
    and a fresh optimizer has none before its first step: it reads only the hyperparameters and
    the resumed run restarts AdamW's moments and step count. torch's get_optimizer_state_dict
    first gives every trainable parameter its state (one zero-gradient step at lr 0), so the
    template `dcp.load` fills holds every moment.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    sharded = StateDictOptions(full_state_dict=False)
    state = {"optimizer": get_optimizer_state_dict(wrapped, optimizer, options=sharded)}
    dcp.load(state, checkpoint_id=str(Path(checkpoint_dir) / FSDP_OPTIMIZER_DIR))
    set_optimizer_state_dict(wrapped, optimizer, state["optimizer"], options=sharded)
