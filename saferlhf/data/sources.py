"""Turn ``cfg.data`` into a validated ``datasets.DatasetDict`` with ``train`` and ``test`` splits.

Three sources, one contract: the Hugging Face hub (``datasets.load_dataset``), local files in
the hub schema (jsonl, json, parquet, csv; the same ``datasets`` builders), and the embedded
benchmark. Every row is validated against :mod:`saferlhf.data.schema`; a bad row raises an
error naming the file, the row and the field, or with ``on_bad_row=skip`` is dropped and
recorded in ``skipped_rows.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets

from saferlhf.data import benchmark, schema
from saferlhf.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ON_BAD_ROW = ("raise", "skip")


class DataSourceError(UserError):
    """The configured data cannot be loaded; the message says which config key to change."""


@dataclass
class SkippedRow:
    source: str
    row: int
    field: str
    reason: str
    data: dict[str, Any]


@dataclass
class LoadedData:
    """The validated splits, their row kind, and every row that was skipped on the way."""

    splits: datasets.DatasetDict
    kind: str
    skipped: list[SkippedRow] = field(default_factory=list)

    def write_skipped(self, run_dir: Path) -> Path | None:
        """Write each skipped row with its reason to ``run_dir/skipped_rows.jsonl``."""
        if not self.skipped:
            return None
        path = Path(run_dir) / "skipped_rows.jsonl"
        with path.open("w") as f:
            for row in self.skipped:
                f.write(json.dumps(row.__dict__, default=str) + "\n")
        return path


def load_data(data_cfg: Mapping[str, Any]) -> LoadedData:
    """Load, validate and split the data described by ``cfg.data``."""
    if data_cfg["on_bad_row"] not in ON_BAD_ROW:
        raise DataSourceError(
            f"data.on_bad_row={data_cfg['on_bad_row']!r}: expected one of {ON_BAD_ROW}"
        )
    loaders: dict[
        str, Callable[[Mapping[str, Any]], dict[str, list[tuple[str, datasets.Dataset]]]]
    ] = {
        "benchmark": _benchmark_parts,
        "hub": _hub_parts,
        "local": _local_parts,
    }
    if data_cfg["source"] not in loaders:
        raise DataSourceError(
            f"data.source={data_cfg['source']!r}: expected one of {sorted(loaders)}"
        )
    parts = loaders[data_cfg["source"]](data_cfg)
    kind = _resolve_kind(data_cfg, parts)
    skipped: list[SkippedRow] = []
    splits = {}
    for split, split_parts in parts.items():
        valid = [
            _validate(ds, kind, source, data_cfg["on_bad_row"], skipped)
            for source, ds in split_parts
        ]
        splits[split] = datasets.concatenate_datasets(valid) if len(valid) > 1 else valid[0]
    if "test" not in splits:
        halves = splits["train"].train_test_split(test_size=data_cfg["test_fraction"], seed=0)
        splits = {"train": halves["train"], "test": halves["test"]}
    if skipped:
        log.warning("skipped %d invalid rows (data.on_bad_row=skip)", len(skipped))
    return LoadedData(datasets.DatasetDict(splits), kind, skipped)


def _resolve_kind(data_cfg: Mapping[str, Any], parts) -> str:
    kind = data_cfg["kind"]
    if kind == "auto":
        source, first = parts["train"][0]
        kind = schema.detect_kind(_columns(first))
        log.info("data.kind=auto: %s has %s rows", source, kind)
    if kind not in schema.ROW_KINDS:
        raise DataSourceError(f"data.kind={kind!r}: expected auto or one of {schema.ROW_KINDS}")
    return kind


def _columns(rows: datasets.Dataset | list[dict[str, Any]]) -> list[str]:
    if isinstance(rows, datasets.Dataset):
        return rows.column_names
    return list(rows[0]) if rows else []


def _validate(
    rows: datasets.Dataset | list[dict[str, Any]],
    kind: str,
    source: str,
    on_bad_row: str,
    skipped: list[SkippedRow],
) -> datasets.Dataset:
    """Check every row; raise on the first bad one, or drop and record bad ones (skip)."""
    missing = [f for f in schema.REQUIRED_FIELDS[kind] if f not in _columns(rows)]
    if missing and on_bad_row == "raise":
        # A whole column is absent: report it once, at the first row, not for every row.
        raise schema.RowError(source, 1, missing[0], "missing required field (no such column)")
    keep = []
    for index, row in enumerate(rows):
        problem = schema.row_problem(_normalise(row, kind), kind)
        if problem is None:
            keep.append(index)
        elif on_bad_row == "raise":
            raise schema.RowError(source, index + 1, *problem)
        else:
            skipped.append(SkippedRow(source, index + 1, *problem, data=row))
    if isinstance(rows, list):
        return datasets.Dataset.from_list([_normalise(rows[i], kind) for i in keep])
    if len(keep) < len(rows):
        rows = rows.select(keep)
    if _needs_normalising(rows, kind):
        rows = rows.map(lambda row: _normalise(row, kind), features=None)
    return rows


def _needs_normalising(ds: datasets.Dataset, kind: str) -> bool:
    """True when a column holds a JSON string for a dict or floats for an int (CSV, JSON)."""
    for name, expected in schema.REQUIRED_FIELDS[kind].items():
        dtype = getattr(ds.features.get(name), "dtype", None)
        if (expected is dict and dtype in ("string", "large_string")) or (
            expected is int and dtype in ("float32", "float64")
        ):
            return True
    return False


def _normalise(row: dict[str, Any], kind: str) -> dict[str, Any]:
    """Undo what file formats do to hub rows: JSON-encoded dicts in CSV, 1.0 for 1 in JSON,
    and the ``None`` that arrow puts into a struct for category names another row used."""
    row = dict(row)
    for name, expected in schema.REQUIRED_FIELDS[kind].items():
        value = row.get(name)
        if expected is dict and isinstance(value, str):
            try:
                row[name] = json.loads(value)
            except json.JSONDecodeError:
                pass
        elif expected is int and isinstance(value, float) and value.is_integer():
            row[name] = int(value)
        if expected is dict and isinstance(row[name], dict):
            row[name] = {k: v for k, v in row[name].items() if v is not None}
    return row


# -- the embedded benchmark ------------------------------------------------------------------


def _benchmark_parts(data_cfg):
    b = data_cfg["benchmark"]
    rows = benchmark.generate_benchmark(
        num_train=b["num_train"],
        num_test=b["num_test"],
        seed=b["seed"],
        label_noise=b["label_noise"],
        benign_fraction=b["benign_fraction"],
    )
    kind = data_cfg["kind"]
    parts = {}
    for split in SPLITS:
        split_rows = rows[split]
        if kind == schema.SINGLE:
            split_rows = benchmark.single_preference_rows(
                split_rows,
                seed=b["seed"],
                label_noise=b["label_noise"],
                harm_penalty=b["single_harm_penalty"],
            )
        elif kind == schema.QA:
            split_rows = qa_rows_from_preference(split_rows)
        parts[split] = [(f"benchmark[{split}]", datasets.Dataset.from_list(split_rows))]
    return parts


def qa_rows_from_preference(rows) -> list[dict[str, Any]]:
    """QA-schema rows (one response each) from preference rows; see views.qa_items."""
    from saferlhf.data.views import qa_items

    return [item.to_row() for item in qa_items(rows)]


# -- the hub -----------------------------------------------------------------------------------


def _hub_parts(data_cfg):
    name = data_cfg["name"]
    if not name:
        raise DataSourceError("data.source=hub needs data.name (a hub dataset id)")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline and not _hub_reachable():
        raise DataSourceError(_offline_message(name, "the hub is unreachable from this machine"))
    parts = {}
    for split in SPLITS:
        try:
            ds = datasets.load_dataset(
                name,
                data_cfg["subset"],
                split=data_cfg["split"][split],
                revision=data_cfg["revision"],
            )
        except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
            reason = "HF_HUB_OFFLINE=1 and it is not in the local cache" if offline else str(err)
            raise DataSourceError(_offline_message(name, reason)) from err
        parts[split] = [(f"{name}[{data_cfg['split'][split]}]", ds)]
    return parts


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint, so offline machines fail at once, not after retries."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_message(name: str, reason: str) -> str:
    return (
        f"cannot load data.name={name!r}: {reason}. Download the dataset files elsewhere "
        f"(e.g. `huggingface-cli download {name} --repo-type dataset --local-dir DIR`) and run "
        "with data=local data.path=DIR."
    )


# -- local files -------------------------------------------------------------------------------


def _local_parts(data_cfg):
    path = data_cfg["path"]
    if not path:
        raise DataSourceError("data.source=local needs data.path (a file or a directory)")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataSourceError(f"data.path={str(path)!r} does not exist")
    if path.is_file():
        return {"train": [(str(path), _load_file(path))]}  # load_data carves out the test share
    parts = {}
    for split in SPLITS:
        files = _split_files(path, data_cfg["split"][split])
        if not files:
            raise DataSourceError(
                f"data.path={str(path)!r} has no {split} file: expected {data_cfg['split'][split]}*"
                f"{{{','.join(FILE_BUILDERS)}}} in it or below it (data.split.{split} names the prefix)"
            )
        parts[split] = [(str(f), _load_file(f)) for f in files]
    return parts


def _split_files(directory: Path, prefix: str) -> list[Path]:
    return sorted(
        p for p in directory.rglob(f"{prefix}*") if p.is_file() and p.suffix in FILE_BUILDERS
    )


def _load_file(path: Path) -> datasets.Dataset | list[dict[str, Any]]:
    """Load one file with the ``datasets`` builder for its suffix.

    Arrow infers one type per column, so a JSON row with a wrong type (a string severity, say)
    makes the builder fail without saying where. Those files are re-read as plain rows, which
    validation then reports by row number and field.
    """
    builder = FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise DataSourceError(
            f"{path}: unsupported file type; expected one of {sorted(FILE_BUILDERS)}"
        )
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:
        if builder != "json":
            raise DataSourceError(f"{path}: could not be read as {builder}: {err}") from err
        log.info(
            "%s: arrow could not infer one type per column (%s); validating row by row", path, err
        )
        return _read_json_rows(path)


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise schema.RowError(
                    str(path), line_number, "<line>", f"not valid JSON: {err}"
                ) from err
    return rows
