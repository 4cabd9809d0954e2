"""Turn ``cfg.data`` into a validated ``datasets.DatasetDict`` with ``train`` and ``test`` splits.

Three sources, one contract: the Hugging Face hub (``datasets.load_dataset``), local files in
the hub schema (jsonl, json, parquet, csv) and the embedded benchmark. Rows follow one of the
hub schemas (PKU-SafeRLHF's dual, single and QA rows, or BeaverTails'), and their category
names are the run's taxonomy's (``cfg.taxonomy``; the benchmark is PKU-SafeRLHF's only). Every
source is read into rows exactly as written, each with the number a user finds it under; every
row is validated against :mod:`saferlhf.data.schema` (types are checked, never converted), and
the valid rows
become a ``datasets.Dataset`` of the row kind's columns with explicit features (other columns
are not kept). Rows that repeat and test prompts that train has too are counted and warned
about, never dropped. A bad row raises an error
naming the file, the row and the field, or with ``on_bad_row=skip`` is dropped and recorded,
as it was read, in ``skipped_rows.jsonl``.

Why JSON and CSV files are not read by the ``datasets`` builders: the json builder turns a
column that mixes types into a JSON column and decodes its strings (a prompt ``"42"`` becomes
the number 42, ``"null"`` becomes None), or with explicit features converts 3 into ``"3"``; the
csv builder lets pandas guess types (a prompt ``"None"`` becomes NaN). Parquet files and hub
datasets keep the builders: their columns are typed as stored.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from saferlhf.data import benchmark, schema
from saferlhf.errors import ConfigError, UserError
from saferlhf.taxonomy import PKU_SAFERLHF, Taxonomy, taxonomy_from_config

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")
ON_BAD_ROW = ("raise", "skip")
EXAMPLES_SHOWN = 3  # example row numbers in the repeated-rows warnings


class DataSourceError(UserError):
    """The configured data cannot be loaded; the message says which file or config key to fix."""


@dataclass
class ReadRow:
    """One row as read, before validation.

    ``number`` is where a user finds it: the line number in JSON Lines and CSV files (the CSV
    header is line 1), the position from 1 in JSON arrays, parquet files and hub splits.
    ``data`` is the row as written (a dict, or the text of a line that is not one);
    ``problem`` is set when the row could not be read as a row at all.
    """

    number: int
    data: Any
    problem: tuple[str, str] | None = None


@dataclass
class Part:
    """The rows of one file or hub split. ``text_cells``: every value is text (CSV), so the
    schema's int, bool and dict fields are read from their text."""

    source: str
    columns: list[str]
    rows: list[ReadRow]
    text_cells: bool = False


@dataclass(frozen=True)
class Origin:
    """Where a row was read: its file or hub split, and its row number there."""

    source: str
    row: int

    def __str__(self) -> str:
        return f"{self.source}, row {self.row}"


@dataclass
class SkippedRow:
    source: str
    row: int
    field: str
    reason: str
    data: Any  # the row as read from the source

    def message(self) -> str:
        return str(schema.RowError(self.source, self.row, self.field, self.reason))


@dataclass
class Repeats:
    """Rows that repeat: within a split (every schema field equal to an earlier row's), and
    test prompts that are also train prompts, with a few ``source, row`` examples of each."""

    duplicate_rows: dict[str, int]
    duplicate_examples: dict[str, list[str]]
    shared_prompts: int  # distinct test prompts also found in train
    shared_prompt_test_rows: int  # test rows whose prompt is also a train prompt
    shared_prompt_examples: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LoadedData:
    """The validated splits, their row kind, every row skipped on the way, and repeated rows."""

    splits: datasets.DatasetDict
    kind: str
    skipped: list[SkippedRow]
    repeats: Repeats

    def write_skipped(self, run_dir: Path) -> Path | None:
        """Write each skipped row, as read, with its reason to ``run_dir/skipped_rows.jsonl``."""
        if not self.skipped:
            return None
        path = Path(run_dir) / "skipped_rows.jsonl"
        with path.open("w") as f:
            for row in self.skipped:
                f.write(json.dumps(row.__dict__, default=str) + "\n")
        return path


def load_data(data_cfg: Mapping[str, Any], taxonomy: Taxonomy | None = None) -> LoadedData:
    """Load, validate and split the data described by ``cfg.data``; category names must be
    ``taxonomy``'s (by default the run config's ``taxonomy``, or PKU-SafeRLHF's outside one)."""
    if data_cfg["on_bad_row"] not in ON_BAD_ROW:
        raise DataSourceError(
            f"data.on_bad_row={data_cfg['on_bad_row']!r}: expected one of {ON_BAD_ROW}"
        )
    taxonomy = taxonomy or _run_taxonomy(data_cfg)
    if data_cfg["source"] == "benchmark" and taxonomy.categories != schema.HARM_CATEGORIES:
        raise ConfigError(
            f"data=benchmark is labelled with PKU-SafeRLHF's categories, not taxonomy="
            f"{taxonomy.name}'s: run it with taxonomy=pku_saferlhf"
        )
    loaders: dict[str, Callable[[Mapping[str, Any]], dict[str, list[Part]]]] = {
        "benchmark": _benchmark_parts,
        "hub": _hub_parts,
        "local": _local_parts,
    }
    if data_cfg["source"] not in loaders:
        raise DataSourceError(
            f"data.source={data_cfg['source']!r}: expected one of {sorted(loaders)}"
        )
    parts = loaders[data_cfg["source"]](data_cfg)
    for part in (part for split_parts in parts.values() for part in split_parts):
        if not part.rows:
            raise DataSourceError(f"{part.source}: empty, no rows to read")
    kind = _resolve_kind(data_cfg, parts)
    if kind == schema.BEAVERTAILS and taxonomy.has_severity:
        raise DataSourceError(
            f"{parts['train'][0].source}: BeaverTails rows have no severity levels, which "
            f"taxonomy={taxonomy.name} expects: run with taxonomy=beavertails (data=beavertails "
            "selects it) or a taxonomy file with severity: false"
        )
    skipped: list[SkippedRow] = []
    rows: dict[str, list[dict[str, Any]]] = {}
    origins: dict[str, list[Origin]] = {}
    for split, split_parts in parts.items():
        rows[split], origins[split] = [], []
        for part in split_parts:
            for number, row in _validate(part, kind, taxonomy, data_cfg["on_bad_row"], skipped):
                rows[split].append(row)
                origins[split].append(Origin(part.source, number))
        if not rows[split]:
            raise DataSourceError(_no_usable_rows(split, split_parts, skipped))
    if "test" not in rows:
        rows, origins = _carve_test(rows["train"], origins["train"], data_cfg)
    if skipped:
        log.warning("skipped %d invalid rows (data.on_bad_row=skip)", len(skipped))
    repeats = find_repeats(rows, origins)
    _warn_repeats(repeats)
    features = _features(kind, taxonomy)
    splits = {split: datasets.Dataset.from_list(rows[split], features=features) for split in SPLITS}
    return LoadedData(datasets.DatasetDict(splits), kind, skipped, repeats)


def _resolve_kind(data_cfg: Mapping[str, Any], parts: dict[str, list[Part]]) -> str:
    kind = data_cfg["kind"]
    if kind == "auto":
        first = parts["train"][0]
        kind = schema.detect_kind(first.columns)
        if kind == schema.SINGLE and _selected_preference(data_cfg) != "single":
            # Without this a dual-preference file that lost one column trains as another kind.
            raise DataSourceError(
                f"{first.source}: no column 'safer_response_id', which dual-preference rows "
                "(preference=dual, the default) need; add it, or run with preference=single "
                "(or data.kind=single) to use these rows as single-preference data"
            )
        log.info("data.kind=auto: %s has %s rows", first.source, kind)
    if kind not in schema.ROW_KINDS:
        raise DataSourceError(f"data.kind={kind!r}: expected auto or one of {schema.ROW_KINDS}")
    return kind


def _run_taxonomy(data_cfg: Mapping[str, Any]) -> Taxonomy:
    """The taxonomy of the run config whose ``data`` node this is (PKU-SafeRLHF's outside one)."""
    if isinstance(data_cfg, DictConfig):
        try:
            taxonomy_cfg = OmegaConf.select(data_cfg, "..taxonomy", default=None)
        except ConfigKeyError:  # a data config on its own, not inside a run config
            taxonomy_cfg = None
        if taxonomy_cfg is not None:
            return taxonomy_from_config(taxonomy_cfg)
    return PKU_SAFERLHF


def _selected_preference(data_cfg: Mapping[str, Any]) -> str | None:
    """``preference.name`` of the run config whose ``data`` node this is (None outside one)."""
    if not isinstance(data_cfg, DictConfig):
        return None
    try:
        return OmegaConf.select(data_cfg, "..preference.name", default=None)
    except ConfigKeyError:  # a data config on its own, not inside a run config
        return None


def _features(kind: str, taxonomy: Taxonomy) -> datasets.Features:
    """The row kind's schema as ``datasets`` features; other columns are not kept."""
    categories = {name: datasets.Value("bool") for name in taxonomy.categories}
    arrow = {
        str: datasets.Value("string"),
        int: datasets.Value("int64"),
        bool: datasets.Value("bool"),
    }
    return datasets.Features(
        {
            name: categories if expected is dict else arrow[expected]
            for name, expected in schema.REQUIRED_FIELDS[kind].items()
        }
    )


def _validate(
    part: Part, kind: str, taxonomy: Taxonomy, on_bad_row: str, skipped: list[SkippedRow]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(number, row)`` for every valid row, holding the schema's fields; raise on the first bad
    row, or (skip) record each bad row as it was read."""
    missing = [f for f in schema.REQUIRED_FIELDS[kind] if f not in part.columns]
    if missing and on_bad_row == "raise":
        # A whole column is absent: report it once, at the first row, not for every row.
        first = part.rows[0].number
        raise schema.RowError(
            part.source, first, missing[0], "missing required field (no such column)"
        )
    for read in part.rows:
        row, problem = None, read.problem
        if problem is None:
            row, problem = _typed(read.data, kind, part.text_cells)
        if problem is None:
            row = _normalise(row, kind)
            problem = schema.row_problem(row, kind, taxonomy)
        if problem is None:
            yield read.number, {name: row[name] for name in schema.REQUIRED_FIELDS[kind]}
        elif on_bad_row == "raise":
            raise schema.RowError(part.source, read.number, *problem)
        else:
            skipped.append(SkippedRow(part.source, read.number, *problem, data=read.data))


_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
_BOOL_TEXT = {"true": True, "false": False}


def _typed(
    data: Any, kind: str, text_cells: bool
) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """The row with its schema fields as Python values, or the problem that prevents it.

    Text cells (CSV) are read strictly: an int field holds an integer's digits, a bool field
    true or false (any case), a dict field a JSON object; an empty cell is a missing value;
    string fields stay exactly as written. Values of typed sources are taken as they are.
    """
    if not isinstance(data, dict):
        return None, ("", f"expected a JSON object, got {type(data).__name__}")
    if not text_cells:
        return data, None
    row = dict(data)
    for name, expected in schema.REQUIRED_FIELDS[kind].items():
        text = data.get(name)
        if expected is str or text is None:
            continue
        if text == "":
            row[name] = None
        elif expected is int and _INTEGER_TEXT.fullmatch(text):
            row[name] = int(text)
        elif expected is bool and text.lower() in _BOOL_TEXT:
            row[name] = _BOOL_TEXT[text.lower()]
        elif expected is dict and (value := _json_object(text)) is not None:
            row[name] = value
        else:
            wanted = {int: "an integer", bool: "true or false", dict: "a JSON object"}[expected]
            return None, (name, f"expected {wanted}, got the text {schema.shown(text)}")
    return row, None


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _normalise(row: dict[str, Any], kind: str) -> dict[str, Any]:
    """A float with no fraction is that integer (JSON has one number type, and pandas writes 2.0
    for 2 in a column with gaps); a harm category without a value (arrow's None for a name
    another row used) is absent."""
    row = dict(row)
    for name, expected in schema.REQUIRED_FIELDS[kind].items():
        value = row.get(name)
        if expected is int and isinstance(value, float) and value.is_integer():
            row[name] = int(value)
        elif expected is dict and isinstance(value, dict):
            row[name] = {k: v for k, v in value.items() if v is not None}
    return row


def _no_usable_rows(split: str, split_parts: list[Part], skipped: list[SkippedRow]) -> str:
    sources = [part.source for part in split_parts]
    first = next(s for s in skipped if s.source in sources)  # every row of the split was skipped
    return (
        f"no usable rows in the {split} split: all {sum(len(p.rows) for p in split_parts)} rows "
        f"of {', '.join(sources)} are invalid (data.on_bad_row=skip skipped them); the first: "
        f"{first.message()}"
    )


def _carve_test(
    train: list[dict[str, Any]], origins: list[Origin], data_cfg: Mapping[str, Any]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[Origin]]]:
    """Split one file's rows into train and test by ``data.test_fraction`` (seeded by datasets),
    keeping where each row came from."""
    positions = datasets.Dataset.from_dict({"position": range(len(train))})
    try:
        halves = positions.train_test_split(test_size=data_cfg["test_fraction"], seed=0)
    except ValueError as err:
        raise DataSourceError(
            f"data.test_fraction={data_cfg['test_fraction']}: cannot split the {len(train)} "
            f"usable rows of {origins[0].source} into train and test ({err})"
        ) from err
    rows, kept = {}, {}
    for split in SPLITS:
        chosen = halves[split]["position"]
        rows[split] = [train[i] for i in chosen]
        kept[split] = [origins[i] for i in chosen]
    return rows, kept


# -- repeated rows and prompts ---------------------------------------------------------------


def find_repeats(
    rows: Mapping[str, list[dict[str, Any]]], origins: Mapping[str, list[Origin]]
) -> Repeats:
    """Rows equal to an earlier row of their split, and test prompts that train has too."""
    duplicates, duplicate_examples = {}, {}
    for split, split_rows in rows.items():
        first_seen: dict[str, int] = {}
        count, examples = 0, []
        for i, row in enumerate(split_rows):
            key = json.dumps(row, sort_keys=True)
            if key not in first_seen:
                first_seen[key] = i
                continue
            count += 1
            if len(examples) < EXAMPLES_SHOWN:
                examples.append(f"{origins[split][i]} repeats {origins[split][first_seen[key]]}")
        duplicates[split], duplicate_examples[split] = count, examples
    train_prompts: dict[str, int] = {}
    for i, row in enumerate(rows["train"]):
        train_prompts.setdefault(row["prompt"], i)
    shared: set[str] = set()
    test_rows, shared_examples = 0, []
    for i, row in enumerate(rows["test"]):
        prompt = row["prompt"]
        if prompt not in train_prompts:
            continue
        test_rows += 1
        if prompt not in shared and len(shared_examples) < EXAMPLES_SHOWN:
            train_origin = origins["train"][train_prompts[prompt]]
            shared_examples.append(f"{origins['test'][i]} has the prompt of {train_origin}")
        shared.add(prompt)
    return Repeats(duplicates, duplicate_examples, len(shared), test_rows, shared_examples)


def _warn_repeats(repeats: Repeats) -> None:
    for split, count in repeats.duplicate_rows.items():
        if count:
            log.warning(
                "%s split: %d rows repeat an earlier row exactly (e.g. %s)",
                split, count, "; ".join(repeats.duplicate_examples[split]),
            )  # fmt: skip
    if repeats.shared_prompts:
        log.warning(
            "%d test prompts are also train prompts (%d test rows; e.g. %s): results on them are "
            "not held out",
            repeats.shared_prompts,
            repeats.shared_prompt_test_rows,
            "; ".join(repeats.shared_prompt_examples),
        )


# -- datasets (hub splits, parquet files) ----------------------------------------------------


def _dataset_part(source: str, ds: datasets.Dataset) -> Part:
    """The rows of a ``datasets.Dataset`` whose columns are typed as stored."""
    schema_fields = {name for fields in schema.REQUIRED_FIELDS.values() for name in fields}
    for name, feature in ds.features.items():
        if name in schema_fields and isinstance(feature, datasets.Json):
            raise DataSourceError(
                f"{source}: column '{name}' mixes JSON types, so the datasets json reader "
                "decoded its strings (a prompt '42' would arrive as the number 42); download "
                "the files and run with data=local data.path=DIR, which checks every row as "
                "written"
            )
    return Part(source, ds.column_names, [ReadRow(i + 1, row) for i, row in enumerate(ds)])


# -- the embedded benchmark ------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def benchmark_rows(
    num_train: int, num_test: int, seed: int, label_noise: float, benign_fraction: float
) -> dict[str, list[dict[str, Any]]]:
    """:func:`~saferlhf.data.benchmark.generate_benchmark`'s rows, made once per process: every
    stage of a pipeline loads the same benchmark, and making it scores each answer with the
    oracle (about 1.2 s for the quickstart's). Readers copy what they keep; none changes them."""
    return benchmark.generate_benchmark(
        num_train=num_train,
        num_test=num_test,
        seed=seed,
        label_noise=label_noise,
        benign_fraction=benign_fraction,
    )


def _benchmark_parts(data_cfg):
    b = data_cfg["benchmark"]
    rows = benchmark_rows(
        b["num_train"], b["num_test"], b["seed"], b["label_noise"], b["benign_fraction"]
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
        columns = list(split_rows[0]) if split_rows else []
        read = [ReadRow(i + 1, row) for i, row in enumerate(split_rows)]
        parts[split] = [Part(f"benchmark[{split}]", columns, read)]
    return parts


def qa_rows_from_preference(rows) -> list[dict[str, Any]]:
    """QA-schema rows (one response each) from preference rows; see views.qa_items."""
    from saferlhf.data.views import qa_items

    return [item.to_row(schema.HARM_CATEGORIES) for item in qa_items(rows)]


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
        except datasets.exceptions.DatasetGenerationError as err:
            raise DataSourceError(
                f"{name}[{data_cfg['split'][split]}]: the datasets library could not read its "
                f"files ({err.__cause__ or err}); download them and run with data=local "
                "data.path=DIR, which names the file and row at fault"
            ) from err
        parts[split] = [_dataset_part(f"{name}[{data_cfg['split'][split]}]", ds)]
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
        return {"train": [read_file(path)]}  # load_data carves out the test share
    parts = {}
    for split in SPLITS:
        files = _split_files(path, data_cfg["split"][split])
        if not files:
            raise DataSourceError(
                f"data.path={str(path)!r} has no {split} file: expected {data_cfg['split'][split]}*"
                f"{{{','.join(FILE_TYPES)}}} in it or below it (data.split.{split} names the prefix)"
            )
        parts[split] = [read_file(f) for f in files]
    return parts


def _split_files(directory: Path, prefix: str) -> list[Path]:
    return sorted(
        p for p in directory.rglob(f"{prefix}*") if p.is_file() and p.suffix in FILE_TYPES
    )


def read_file(path: Path) -> Part:
    """Every row of one local file as written."""
    readers = {
        ".jsonl": _read_json_lines,
        ".json": _read_json,
        ".csv": _read_csv,
        ".parquet": _read_parquet,
    }
    if path.suffix not in readers:
        raise DataSourceError(f"{path}: unsupported file type; expected one of {list(FILE_TYPES)}")
    return readers[path.suffix](path)


def _not_utf8(path: Path, line: int, offset: int, err: UnicodeDecodeError) -> DataSourceError:
    return DataSourceError(
        f"{path}, line {line} (byte {offset}): not UTF-8 text ({err.reason}); data files must "
        "be UTF-8: convert it, e.g. `iconv -f latin1 -t utf-8 FILE > NEW`"
    )


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file (a leading byte-order mark dropped); lines end at
    ``\\n`` only, so a U+2028 inside a JSON string does not split its line."""
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, number, offset + err.start, err) from err
            offset += len(raw)
            yield number, text


def _columns_of(rows: list[ReadRow]) -> list[str]:
    """Every key of the rows that are objects, in first-seen order."""
    columns: dict[str, None] = {}
    for read in rows:
        if isinstance(read.data, dict):
            columns.update(dict.fromkeys(read.data))
    return list(columns)


def _read_json_lines(path: Path) -> Part:
    rows = []
    for number, text in _text_lines(path):
        if not text.strip():
            continue
        try:
            rows.append(ReadRow(number, json.loads(text)))
        except json.JSONDecodeError as err:
            line = text.rstrip("\r\n")
            rows.append(ReadRow(number, line, ("", f"this line is not valid JSON ({err})")))
    return Part(str(path), _columns_of(rows), rows)


def _read_json(path: Path) -> Part:
    """A JSON array of row objects, or (as hub ``.json`` files often are) JSON Lines."""
    if _first_byte(path) != b"[":
        return _read_json_lines(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, raw[: err.start].count(b"\n") + 1, err.start, err) from err
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataSourceError(
            f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})"
        ) from err
    rows = [ReadRow(i + 1, value) for i, value in enumerate(values)]
    return Part(str(path), _columns_of(rows), rows)


def _first_byte(path: Path) -> bytes:
    """The first byte that is not whitespace or a byte-order mark (b"" for none)."""
    with path.open("rb") as f:
        while chunk := f.read(4096):
            if text := chunk.lstrip(b"\xef\xbb\xbf \t\r\n"):
                return text[:1]
    return b""


def _read_csv(path: Path) -> Part:
    """Every cell as the text it is; row numbers are the line a record starts on."""
    lines = (text for _, text in _text_lines(path))
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        if header is None:
            return Part(str(path), [], [])
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise DataSourceError(f"{path}, line 1: the header names {repeated} more than once")
        rows, start = [], reader.line_num + 1
        for cells in reader:
            if cells:
                row = dict(zip(header, cells, strict=False))
                problem = None
                if len(cells) != len(header):
                    problem = ("", f"{len(cells)} cells, but the header has {len(header)} columns")
                    row = cells
                rows.append(ReadRow(start, row, problem))
            start = reader.line_num + 1
    except csv.Error as err:
        raise DataSourceError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from err
    return Part(str(path), header, rows, text_cells=True)


def _read_parquet(path: Path) -> Part:
    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:  # arrow raises many kinds for a file that is not parquet
        raise DataSourceError(f"{path}: could not be read as parquet ({err})") from err
    return _dataset_part(str(path), ds)
