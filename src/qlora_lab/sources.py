"""Where rows come from: local files, dataset folders, hub datasets, and weighted mixes of them.

A source is a local .jsonl/.json/.csv/.parquet file, a hub dataset read by `datasets`, or a local
dataset folder: data files, with a README declaring configs or not, or one written by
`save_to_disk`; `data.hub_config` picks its config and `data.split` its split. `datasets` says
which files of a folder make up a split, and the reader of a file given directly reads them, so a
folder's bad row is named and skipped as a file's is. Every row comes back as a `Row` that says
where it came from (`file:line`); a row that fails to parse carries its UserError instead of
values, so `--skip-bad-rows` can count it. What the rows mean (schemas, prompts, masks) is
data.py's business, not this module's.

Public API:
- `read_rows(source, hub_config, split)`: all rows of one source.
- `source_rows(cfg)`: the rows of the source a DataConfig names, as `train` reads them.
- `check_sources(cfg)`: read every source a run trains on (`data.source`, or each `data.mix`
  entry with its own settings), so a wrong name fails before any slow work starts.
- `check_local_files(cfg)`: only that each local data file is there, reading nothing (`train`
  calls it before it touches the model).
- `mix_counts` and `draw_mix`: how many rows, and which, a weighted mix takes from each source.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_lab.config import DataConfig
from qlora_lab.errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from (`file:line`), for error messages."""

    where: str
    values: Any


# --- reading -------------------------------------------------------------------------------------


def short_path(path: str, limit: int = 160) -> str:
    """A path as an error message quotes it: whole, or its two ends around '...'."""
    return path if len(path) <= limit else f"{path[: limit // 2]}...{path[-limit // 2:]}"


def bad_row(where: str, problem: str) -> UserError:
    """The error of a malformed row (a parse error here, a schema error in data.py)."""
    return UserError(f"{where}: {problem} — fix the row, or pass --skip-bad-rows to skip such rows")


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line, for a one-line UserError."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _iter_jsonl(path: Path, text: str) -> Iterator[Row]:
    # Split on "\n" alone, as JSON Lines does (a "\r" before it is allowed): str.splitlines()
    # also splits on U+2028, U+2029, U+0085, \x1c-\x1e, \v and \f, and JSON strings may hold
    # the first three raw, so it broke valid rows apart and shifted every later line number.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield Row(where, json.loads(line))
        except json.JSONDecodeError as exc:
            yield Row(where, bad_row(where, f"invalid JSON ({exc.msg} at column {exc.colno})"))
        except (ValueError, RecursionError) as exc:  # a 5000-digit number, nesting 1000 deep
            yield Row(where, bad_row(where, f"invalid JSON ({first_line(exc)})"))


def _iter_json(path: Path, text: str) -> Iterator[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.lineno > 1 and text.lstrip().startswith("{"):
            yield from _iter_jsonl(path, text)  # JSON Lines saved with a .json suffix
            return
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}) — the file must hold a "
                        "list of objects, or one object per line") from None
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{path}: invalid JSON ({first_line(exc)}) — the file must hold a "
                        "list of objects, or one object per line") from None
    if isinstance(data, dict):
        # Accept {"train": [...]} / {"data": [...]}-style wrappers with a single list inside.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            yield Row(f"{path}:1", data)
            return
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of row objects, got {type(data).__name__}")
    for i, item in enumerate(data):
        yield Row(f"{path}:item {i}", item)


def _iter_csv(path: Path, text: str) -> Iterator[Row]:
    # StringIO, not splitlines(): a quoted field may hold newlines (multi-line answers).
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record:
                yield Row(where, bad_row(where, "more fields than the header names"))
            else:
                yield Row(where, dict(record))
    except csv.Error as exc:  # a NUL byte, a field over the csv module's 128 KiB limit...
        # The reader cannot resync after this, so the rest of the file is unreadable.
        raise UserError(f"{path}:{reader.line_num + 1}: unreadable CSV ({exc}) — fix the file, "
                        "or convert it to .jsonl (which has no field size limit)") from None


def _iter_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        items = pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 — pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable Parquet file ({type(exc).__name__}: "
                        f"{first_line(exc)})") from None
    for i, item in enumerate(items):
        yield Row(f"{path}:row {i}", item)


def _read_dataset(name: str, hub_config: str, split: str, split_key: str) -> list[Row]:
    """Rows of one split of a hub dataset or a local dataset folder.

    A folder's data files are read by `_read_file`, as the same files given directly are:
    `datasets`' readers stop at the first bad row with a traceback or a multi-line log and lose
    the file and line, guess types (a JSON-looking string becomes a dict, so the wrong row is
    blamed), and number rows from 0. `datasets` still reads hub datasets, folders written by
    `save_to_disk`, and folders whose README gives its readers options (a `field`, a `sep`).
    """
    import datasets

    path = Path(name).expanduser()
    files = None
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))  # written by save_to_disk: no configs
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise _not_a_split(name, split, list(ds), split_key)
                ds = ds[split]
            elif split != "train":
                raise _not_a_split(name, split, ["train"], split_key)
        else:
            if path.is_dir():
                _check_folder_card(path)
                files = _folder_files(path, name, hub_config, split, split_key)
            if files is None:
                ds = datasets.load_dataset(name, hub_config or None, split=split)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 — network, offline, no such dataset/config/split
        raise _dataset_error(name, hub_config, split, split_key, exc) from None
    if files is not None:
        rows = [row for file in files for row in _read_file(file, str(file))]
        if not rows:
            raise UserError(f"data source {short_path(name)} has no rows in "
                            f"{short_path(', '.join(map(str, files)))} — add rows or pick "
                            "another file")
        return rows
    label = name if (split, hub_config) == ("train", "") else f"{name}[{hub_config}:{split}]"
    return [Row(f"{label}:row {i}", item) for i, item in enumerate(ds)]


# The fields every `datasets` builder config has; any other field set away from its default is a
# reader option (a README config's `field: data`, `sep: ";"`), which only `datasets` applies.
_PLAIN_CONFIG_FIELDS = {"name", "version", "data_dir", "data_files", "description"}


def _folder_files(folder: Path, name: str, hub_config: str, split: str,
                  split_key: str) -> list[Path] | None:
    """The data files of one split of a dataset folder, as the folder's `name` spells them; None
    where its config gives reader options, so `datasets` must read it.

    `datasets` resolves the split, reading nothing: a README's configs, else
    data/train-00000-of-00001.* shards, else subfolders named for a split (train/, test/), else
    files named for one (train.jsonl, dev.jsonl), else every data file of the most common format
    as `train`. Their suffixes follow the rule
    for a file given directly, so a folder of notes.txt is refused as notes.txt is, not trained
    on line by line as plain text.
    """
    import datasets

    config = datasets.load_dataset_builder(str(folder), hub_config or None).config
    splits = {str(key): value for key, value in (config.data_files or {}).items()}
    if split not in splits:
        raise _not_a_split(name, split, list(splits), split_key)
    files = [_as_given(folder, Path(file)) for file in splits[split]]
    for file in files:
        if file.suffix.lower() not in LOCAL_SUFFIXES:
            raise UserError(f"data file {short_path(str(file))} in dataset folder "
                            f"{short_path(name)} has an unsupported suffix {file.suffix!r} — "
                            f"a folder's data files take the suffixes a file does "
                            f"({', '.join(LOCAL_SUFFIXES)}): convert it, or move it out")
    defaults = type(config)()
    if any(getattr(config, f.name) != getattr(defaults, f.name)
           for f in dataclasses.fields(config) if f.name not in _PLAIN_CONFIG_FIELDS):
        return None
    return files


def _as_given(folder: Path, file: Path) -> Path:
    """`file`, which `datasets` names by an absolute path, under `folder` as the user spelled it
    (`data/train.jsonl`, not `/home/me/project/data/train.jsonl`), for error messages."""
    for base in (folder.absolute(), folder.resolve()):
        if file.is_relative_to(base):
            return folder / file.relative_to(base)
    return file


def _check_folder_card(folder: Path) -> None:
    """A dataset folder's README may declare configs whose `data_files` `datasets` resolves
    relative to the folder, `..` and absolute paths included, and the folder may hold links:
    refuse any that leave it, so a folder someone hands you cannot make a run train on files
    elsewhere on the machine."""
    from qlora_lab.config import parse_yaml_text

    root = folder.resolve()
    # The hub's cache links a snapshot's files to its repo's blobs/: those links are fine.
    snapshot = next((p for p in (root, *root.parents) if p.parent.name == "snapshots"), None)
    blobs = snapshot.parent.parent / "blobs" if snapshot is not None else None
    for i, entry in enumerate(folder.rglob("*")):
        if i >= 100_000:  # a data folder, not a file system: stop looking
            break
        target = entry.resolve() if entry.is_symlink() else None
        if target is not None and not target.is_relative_to(root) and not (
                blobs is not None and target.is_relative_to(blobs)):
            raise UserError(f"{short_path(str(entry))} links outside its dataset folder "
                            f"(to {short_path(str(target))}) — copy the data in "
                            "instead of linking to it")
    card = folder / "README.md"
    if not card.is_file():
        return
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return
    front = text[3:].split("\n---", 1)[0]
    meta = parse_yaml_text(front, f"{short_path(str(card))} (its YAML header)")
    configs = meta.get("configs") if isinstance(meta, dict) else None

    def paths(value) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for item in value:
                yield from paths(item)
        elif isinstance(value, dict):
            yield from paths(value.get("path"))

    for config in configs if isinstance(configs, list) else []:
        if not isinstance(config, dict):
            continue
        for pattern in paths(config.get("data_files")):
            target = (root / pattern).resolve()
            if "://" in pattern or not target.is_relative_to(root):
                raise UserError(f"{short_path(str(card))}: config "
                                f"{str(config.get('config_name', 'default'))[:40]!r} reads "
                                f"{pattern[:80]!r}, outside the folder — keep data_files "
                                "inside the dataset folder")


def _not_a_split(name: str, split: str, splits: list[str], split_key: str) -> UserError:
    return UserError(f"{split_key} = {split!r} is not a split of {short_path(name)} (its splits: "
                     f"{', '.join(splits)}) — set {split_key} to one of them")


def _dataset_error(name: str, hub_config: str, split: str, split_key: str,
                   exc: Exception) -> UserError:
    """Why `load_dataset` failed, in one line: asked again through `datasets`' own listings of
    configs and splits (its exceptions are all ValueError), else its first line."""
    import datasets

    def listed(function, *args) -> list[str]:
        try:
            return list(function(name, *args))
        except Exception:  # noqa: BLE001 — offline, or no such dataset: no listing
            return []

    configs = listed(datasets.get_dataset_config_names)
    if configs and hub_config and hub_config not in configs:
        return UserError(f"data.hub_config = {hub_config!r} is not a config of {short_path(name)} "
                         f"(its configs: {', '.join(configs[:20])}) — set data.hub_config to one")
    if len(configs) > 1 and not hub_config:
        return UserError(f"{short_path(name)} has several configs ({', '.join(configs[:20])}) — "
                         "pick one with data.hub_config")
    splits = listed(datasets.get_dataset_split_names, hub_config or None)
    if splits and split not in splits:
        return _not_a_split(name, split, splits, split_key)
    return UserError(f"could not load dataset {short_path(name)!r} ({first_line(exc)}) — pass a "
                     "local .jsonl/.json/.csv/.parquet file or dataset folder with --data, or "
                     "check the name")


def read_rows(source: str, hub_config: str = "", split: str = "train",
              split_key: str = "data.split") -> list[Row]:
    """All rows of a source. A row whose `values` is a UserError failed to parse.

    `hub_config` and `split` pick the part of a hub dataset or dataset folder to read; a file has
    neither (`split_key` names the config key that chose `split`, for error messages).
    """
    if _names_a_file(source):
        if hub_config or split != "train":
            given = f"{split_key} = {split!r}" if split != "train" else ""
            given = given or f"data.hub_config = {hub_config!r}"
            raise UserError(f"{given} applies to hub datasets and dataset folders, but "
                            f"{short_path(source)} is a file — leave it unset for files")
        rows = _read_file(Path(source).expanduser(), source)
    else:
        rows = _read_dataset(source, hub_config, split, split_key)
    if not rows:
        raise UserError(f"data source {short_path(source)} has no rows — add rows or pick another "
                        "file")
    return rows


def _names_a_file(source: str) -> bool:
    """Whether `source` is a local file (a file's suffix, or something at that path that is not
    a dataset folder), not a hub dataset name; raises where that file is not there."""
    path = Path(source).expanduser()
    is_file_like = path.suffix.lower() in LOCAL_SUFFIXES
    if path.is_dir() and not is_file_like:
        return False
    if not (is_file_like or path.exists()):
        return False
    if path.is_dir():
        raise UserError(f"data file {short_path(source)} is a directory — pass a "
                        ".jsonl/.json/.csv/.parquet file inside it")
    if not path.is_file():
        raise UserError(f"data file {short_path(source)} does not exist — pass an existing "
                        ".jsonl/.json/.csv/.parquet file, a dataset folder or a hub dataset "
                        "name")
    return True


def check_local_files(cfg: DataConfig) -> None:
    """Fail on a local data file that is not there (`data.source`, `data.eval_source`, each
    `data.mix` entry) without reading anything: `train` checks this before it touches the model,
    so a wrong path is the first error, not a model download or a hub error."""
    for sub, _ in cfg.mix_sources() or [(cfg, 1.0)]:
        _names_a_file(sub.source)
    if cfg.eval_source:
        _names_a_file(cfg.eval_source)


def _read_file(path: Path, source: str) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return list(_iter_parquet(path))
    if suffix not in LOCAL_SUFFIXES:
        raise UserError(f"data file {short_path(source)} has an unsupported suffix {suffix!r} — use "
                        "one of " + ", ".join(LOCAL_SUFFIXES))
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"data file {short_path(source)} cannot be read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {exc.start}) — re-save "
                        "the file as UTF-8") from None
    reader = {".jsonl": _iter_jsonl, ".json": _iter_json, ".csv": _iter_csv}[suffix]
    return list(reader(path, text))


def source_rows(cfg: DataConfig) -> list[Row]:
    """All rows of the one source `cfg` names: `cfg.source`, with its `hub_config` and `split`."""
    return read_rows(cfg.source, cfg.hub_config, cfg.split)


def check_sources(cfg: DataConfig) -> int:
    """Read every source `cfg` trains on as `train` reads it, `data.source` or each `data.mix`
    entry with its own config and split; returns the rows read. A wrong path, format, config or
    split fails here, before any process or model load starts."""
    return sum(len(source_rows(sub)) for sub, _ in cfg.mix_sources() or [(cfg, 1.0)])


# --- mixing --------------------------------------------------------------------------------------


def mix_counts(available: list[int], weights: list[float], cap: int = 0) -> list[int]:
    """Rows to draw from each source: as many in all as the sources give without drawing any
    row twice (the scarcest source for its weight sets the total), at most `cap` (0 = no cap),
    split in shares as close to the weights as whole rows allow (largest remainders round up)."""
    shares = [w / sum(weights) for w in weights]
    total = min(math.floor(n / share + 1e-9) for n, share in zip(available, shares))
    total = min(total, cap) if cap else total
    exact = [min(share * total, n) for share, n in zip(shares, available)]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw_mix(sizes: list[int], weights: list[float], cap: int, seed: int) -> list[list[int]]:
    """The indices to draw from each source of a mix (of `sizes` items), in source order.

    Each source gives `mix_counts` of its items: the first of a shuffle seeded with `seed` (one
    generator for all sources, in order), so no item is drawn twice and the same seed draws the
    same rows.
    """
    rng = random.Random(seed)
    picks = []
    for n, k in zip(sizes, mix_counts(sizes, weights, cap)):
        order = list(range(n))
        rng.shuffle(order)
        picks.append(sorted(order[:k]))
    return picks
