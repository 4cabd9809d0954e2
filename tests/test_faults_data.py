"""Faults in data files, replayed from the shell: the real ``saferlhf`` command runs
``task=data_report`` on crafted files, as a user would.

For every fault: a refused run exits non-zero with one line naming the file, row (or line) and
field, and no traceback; a run that goes on loses no good row and keeps every skipped row in
``skipped_rows.jsonl`` exactly as it was read. The runs start together in a few processes at
once (each spends most of its time importing torch), then each test reads its own result.
"""

import csv
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from saferlhf.run import read_summary
from tests.rows import preference_row

pytestmark = pytest.mark.slow  # ten runs of the command: about 90 s of CPU in all

SAFERLHF = Path(sys.executable).parent / "saferlhf"
PARALLEL_RUNS = 4
LOOKS_LIKE_JSON = ["42", "null", '"quoted"', "true", "[1, 2]", "2.5", "line\u2028separator"]
CSV_TEXTS = ["None", "NA", "42", "", "nan"]  # pandas would have read NaN, 42, NaN, NaN


@dataclass
class Replay:
    returncode: int
    stdout: str
    stderr: str
    data: Path
    run_dir: Path

    def refused_with(self, message: str) -> None:
        assert self.returncode != 0, self.stdout
        assert f"saferlhf: error: {message}" in self.stderr.splitlines(), self.stderr
        assert "Traceback" not in self.stderr
        assert not (self.run_dir / "summary.json").exists()

    def report(self) -> dict:
        assert self.returncode == 0, self.stderr
        return json.loads((self.run_dir / "data_report.json").read_text())

    def skipped(self) -> list[dict]:
        lines = (self.run_dir / "skipped_rows.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]


def _rows(n, offset=0):
    return [preference_row(prompt=f"question {offset + i} ?") for i in range(n)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _csv(path, rows):
    """Rows as CSV cells: categories as JSON objects, booleans as True/False (pandas' way)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(rows[0]))
        for row in rows:
            writer.writerow(
                [json.dumps(v) if isinstance(v, dict) else str(v) for v in row.values()]
            )


def _with_test_split(data):
    _jsonl(data / "test.jsonl", _rows(2, offset=100))


def _json_lookalikes(data):
    rows = [preference_row(prompt=text) for text in LOOKS_LIKE_JSON]
    rows += [
        preference_row(prompt=7),  # makes the prompt column mix types
        preference_row(response_1_severity_level="2"),
        preference_row(is_response_0_safe="false"),
    ]
    _jsonl(data / "train.jsonl", rows)
    _with_test_split(data)


def _string_severity(data):
    rows = _rows(4)
    rows[2]["response_1_severity_level"] = "2"
    _jsonl(data / "train.jsonl", rows)
    _with_test_split(data)


def _bad_json_line(data):
    good = json.dumps(preference_row()) + "\n"
    (data / "train.jsonl").write_text(good + '{"prompt": "cut off\n' + good)
    _with_test_split(data)


def _csv_text(data):
    rows = [preference_row(prompt=text) for text in CSV_TEXTS]
    rows.append(preference_row(is_response_0_safe="yes"))
    _csv(data / "train.csv", rows)
    _with_test_split(data)


def _not_utf8(data):
    first = json.dumps(preference_row()) + "\n"
    (data / "train.jsonl").write_bytes(first.encode() + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    _with_test_split(data)


def _empty_train(data):
    (data / "train.jsonl").write_text("")
    _with_test_split(data)


def _no_usable_rows(data):
    rows = _rows(3)
    for row in rows:
        row["better_response_id"] = 2
    _jsonl(data / "train.jsonl", rows)
    _with_test_split(data)


def _without_safer(data):
    rows = [{k: v for k, v in row.items() if k != "safer_response_id"} for row in _rows(4)]
    _csv(data / "train.csv", rows)
    _csv(data / "test.csv", rows[:2])


def _repeats(data):
    train = _rows(6)
    train += [train[1], train[1]]
    _jsonl(data / "train.jsonl", train)
    _jsonl(data / "test.jsonl", [preference_row(prompt="question 4 ?"), *_rows(2, offset=100)])


SCENARIOS = {  # name: (write the data dir, overrides)
    "json_lookalikes": (_json_lookalikes, ["data.on_bad_row=skip"]),
    "string_severity": (_string_severity, []),
    "bad_json_line": (_bad_json_line, []),
    "csv_text": (_csv_text, ["data.on_bad_row=skip"]),
    "not_utf8": (_not_utf8, ["data.on_bad_row=skip"]),
    "empty_train": (_empty_train, ["data.on_bad_row=skip"]),
    "no_usable_rows": (_no_usable_rows, ["data.on_bad_row=skip"]),
    "without_safer": (_without_safer, []),
    "without_safer_single": (_without_safer, ["preference=single"]),
    "repeats": (_repeats, []),
}


@pytest.fixture(scope="module")
def replays(tmp_path_factory) -> dict[str, Replay]:
    root = tmp_path_factory.mktemp("faults")

    def replay(name: str) -> Replay:
        write, overrides = SCENARIOS[name]
        data, run_dir = root / name / "data", root / name / "run"
        data.mkdir(parents=True)
        write(data)
        command = [
            str(SAFERLHF), "task=data_report", "data=local", f"data.path={data}", "logger=none",
            "task.plot=false", "num_threads=1", f"hydra.run.dir={run_dir}", *overrides,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=300)
        return Replay(done.returncode, done.stdout, done.stderr, data, run_dir)

    with ThreadPoolExecutor(PARALLEL_RUNS) as pool:
        return dict(zip(SCENARIOS, pool.map(replay, SCENARIOS), strict=True))


def _original_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_strings_that_look_like_json_are_kept_and_wrong_types_skipped_as_read(replays):
    replay = replays["json_lookalikes"]
    report = replay.report()
    assert report["splits"]["train"]["rows"] == len(LOOKS_LIKE_JSON)  # no good row lost
    skipped = replay.skipped()
    original = _original_lines(replay.data / "train.jsonl")
    assert [(s["row"], s["field"]) for s in skipped] == [
        (8, "prompt"),
        (9, "response_1_severity_level"),
        (10, "is_response_0_safe"),
    ]
    assert [s["data"] for s in skipped] == original[7:]  # each skipped row as it was written
    assert "expected bool, got str 'false'" in skipped[2]["reason"]
    assert read_summary(replay.run_dir)["metrics"]["data/skipped_rows"] == 3


def test_a_string_where_an_int_belongs_stops_the_run(replays):
    replay = replays["string_severity"]
    replay.refused_with(
        f"{replay.data / 'train.jsonl'}, row 3, field 'response_1_severity_level': "
        "expected int, got str '2'"
    )


def test_a_line_that_is_not_json_is_named(replays):
    replay = replays["bad_json_line"]
    message = replay.stderr.splitlines()
    prefix = f"saferlhf: error: {replay.data / 'train.jsonl'}, row 2: this line is not valid JSON"
    assert replay.returncode != 0 and any(line.startswith(prefix) for line in message)
    assert "Traceback" not in replay.stderr


def test_csv_text_stays_text_and_a_bad_boolean_is_skipped_as_read(replays):
    replay = replays["csv_text"]
    assert replay.report()["splits"]["train"]["rows"] == len(CSV_TEXTS)
    (skipped,) = replay.skipped()
    with (replay.data / "train.csv").open(newline="") as f:
        original = list(csv.DictReader(f))[-1]
    assert (skipped["row"], skipped["field"], skipped["data"]) == (
        len(CSV_TEXTS) + 2,  # the header is line 1
        "is_response_0_safe",
        original,
    )
    assert skipped["reason"] == "expected true or false, got the text 'yes'"


def test_a_file_that_is_not_utf8_stops_even_when_skipping(replays):
    replay = replays["not_utf8"]
    first_line = len(json.dumps(preference_row())) + 1
    replay.refused_with(
        f"{replay.data / 'train.jsonl'}, line 2 (byte {first_line + 15}): not UTF-8 text "
        "(invalid continuation byte); data files must be UTF-8: convert it, e.g. "
        "`iconv -f latin1 -t utf-8 FILE > NEW`"
    )


def test_an_empty_train_file_is_called_empty(replays):
    replay = replays["empty_train"]
    replay.refused_with(f"{replay.data / 'train.jsonl'}: empty, no rows to read")


def test_skipping_every_row_stops_the_run(replays):
    replay = replays["no_usable_rows"]
    train = replay.data / "train.jsonl"
    replay.refused_with(
        f"no usable rows in the train split: all 3 rows of {train} are invalid "
        f"(data.on_bad_row=skip skipped them); the first: {train}, row 1, field "
        "'better_response_id': response id must be 0 or 1, got 2"
    )


def test_a_csv_without_safer_response_id_is_not_taken_for_single_preference(replays):
    replay = replays["without_safer"]
    replay.refused_with(
        f"{replay.data / 'train.csv'}: no column 'safer_response_id', which dual-preference "
        "rows (preference=dual, the default) need; add it, or run with preference=single (or "
        "data.kind=single) to use these rows as single-preference data"
    )
    chosen = replays["without_safer_single"].report()
    assert chosen["kind"] == "single" and chosen["splits"]["train"]["rows"] == 4


def test_repeated_rows_and_shared_prompts_are_reported(replays):
    replay = replays["repeats"]
    repeats = replay.report()["repeats"]
    assert repeats["duplicate_rows"] == {"train": 2, "test": 0}
    assert (repeats["shared_prompts"], repeats["shared_prompt_test_rows"]) == (1, 1)
    metrics = read_summary(replay.run_dir)["metrics"]
    assert metrics["data/train/duplicate_rows"] == 2 and metrics["data/shared_prompts"] == 1
    train, test = replay.data / "train.jsonl", replay.data / "test.jsonl"
    warning = f"train split: 2 rows repeat an earlier row exactly (e.g. {train}, row 7 repeats"
    assert f"{warning} {train}, row 2" in replay.stdout
    assert f"{test}, row 1 has the prompt of {train}, row 5" in replay.stdout
