"""Safe loading: weights come from safetensors files, never from pickles, unless the user says so.

A pickle file (`pytorch_model.bin`, `adapter_model.bin`, `*.pt`) can run arbitrary code when it
is loaded; a safetensors file is a JSON header plus raw tensor bytes and cannot. Everything
qlora-lab writes is safetensors, so the only way a pickle reaches us is a folder from somewhere
else: we refuse it with a one-line error unless the caller passes `allow_pickle=True`.

The same header parser checks that a safetensors file is whole (a truncated or garbled file is
reported by name, instead of failing deep inside a loader), and gives `adapters` the tensor shapes
to check an adapter's config against without reading a single weight.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from qlora_lab.errors import UserError

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Trainer pickles its own arguments beside every checkpoint; nothing of ours ever loads it.
IGNORED_PICKLES = {"training_args.bin"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def pickle_files(directory: Path) -> list[str]:
    names = {p.name for pattern in PICKLE_PATTERNS for p in Path(directory).glob(pattern)}
    return sorted(names - IGNORED_PICKLES)


def require_safetensors(directory: Path, what: str, allow_pickle: bool = False,
                        allow_hint: str | None = "pass --allow-pickle") -> None:
    """Refuse a weights folder that holds pickle weights but no safetensors ones.

    `allow_hint` names the switch that sets `allow_pickle` for the calling command (None: none).
    """
    directory = Path(directory)
    if allow_pickle or not directory.is_dir() or list(directory.glob("*.safetensors")):
        return
    pickles = pickle_files(directory)
    if pickles:
        raise UserError(f"{what} {directory} holds only pickle weights ({', '.join(pickles)}), "
                        "which can run code when loaded — convert them to safetensors "
                        "(save_pretrained writes safetensors)"
                        + (f", or {allow_hint} if you trust where they came from"
                           if allow_hint else ""))


class _Damaged(Exception):
    """What is wrong with a safetensors file, as the end of "<path> ..." (internal)."""


def _read_header(path: Path) -> dict:
    """The checked JSON header (tensor name -> dtype, shape, offsets); reads no tensor data."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _Damaged("is truncated (no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise _Damaged("is truncated or not a safetensors file (bad header length)")
            header = json.loads(fh.read(header_len).decode("utf-8"))
    except OSError as exc:
        raise _Damaged(f"cannot be read ({exc.strerror})") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Damaged("is corrupted (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise _Damaged("is corrupted (its header is not a JSON object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets) or offsets[0] > offsets[1]):
            raise _Damaged(f"is corrupted (bad entry for tensor {name!r})")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _Damaged(f"is corrupted (bad shape for tensor {name!r})")
        end = max(end, offsets[1])
    if 8 + header_len + end > size:
        raise _Damaged(f"is truncated ({size} bytes, its header needs {8 + header_len + end})")
    return header


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file (None if its header and size are consistent)."""
    try:
        _read_header(Path(path))
    except _Damaged as exc:
        return str(exc)
    return None


def tensor_shapes(path: Path, fix: str) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header, without reading any tensor data."""
    try:
        header = _read_header(Path(path))
    except _Damaged as exc:
        raise UserError(f"{path} {exc} — {fix}") from None
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}


def require_whole_safetensors(path: Path, fix: str) -> None:
    problem = safetensors_problem(path)
    if problem:
        raise UserError(f"{path} {problem} — {fix}")
