import csv
import json

import datasets
import pytest

from saferlhf.data.schema import BEAVERTAILS, PREFERENCE, RowError, empty_harm_categories
from saferlhf.data.sources import DataSourceError, load_data
from saferlhf.errors import ConfigError
from saferlhf.taxonomy import BEAVERTAILS as BEAVERTAILS_TAXONOMY
from tests.beavertails_rows import beavertails_row
from tests.rows import preference_row


def _rows(n, offset=0):
    return [preference_row(prompt=f"question {offset + i} ?") for i in range(n)]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _local(compose_cfg, path, *overrides):
    return compose_cfg("data=local", f"data.path={path}", *overrides).data


def test_local_jsonl_directory_in_hub_schema(compose_cfg, tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", _rows(12))
    _write_jsonl(tmp_path / "test.jsonl", _rows(4, offset=100))
    loaded = load_data(_local(compose_cfg, tmp_path))
    assert loaded.kind == PREFERENCE
    assert (len(loaded.splits["train"]), len(loaded.splits["test"])) == (12, 4)
    assert loaded.splits["test"][0]["prompt"] == "question 100 ?"
    assert loaded.splits["train"][0]["response_1_harm_category"]["Violence"] is True
    assert loaded.skipped == []


def test_local_parquet_shards_like_the_hub(compose_cfg, tmp_path):
    # The hub stores parquet shards as data/<split>-00000-of-00001.parquet.
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_list(_rows(6)).to_parquet(
        str(tmp_path / "data" / "train-00000-of-00002.parquet")
    )
    datasets.Dataset.from_list(_rows(5, 50)).to_parquet(
        str(tmp_path / "data" / "train-00001-of-00002.parquet")
    )
    datasets.Dataset.from_list(_rows(3, 100)).to_parquet(
        str(tmp_path / "data" / "test-00000-of-00001.parquet")
    )
    loaded = load_data(_local(compose_cfg, tmp_path))
    assert (len(loaded.splits["train"]), len(loaded.splits["test"])) == (11, 3)


def test_local_csv_with_json_encoded_categories(compose_cfg, tmp_path):
    rows = _rows(10)
    for row in rows:
        for i in (0, 1):
            row[f"response_{i}_harm_category"] = json.dumps(row[f"response_{i}_harm_category"])
    path = tmp_path / "pairs.csv"
    datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    loaded = load_data(_local(compose_cfg, path, "data.test_fraction=0.2"))
    assert (len(loaded.splits["train"]), len(loaded.splits["test"])) == (8, 2)
    assert loaded.splits["train"][0]["response_1_harm_category"]["Violence"] is True


def test_wrong_type_in_jsonl_names_file_row_and_field(compose_cfg, tmp_path):
    rows = _rows(5)
    rows[2]["response_1_severity_level"] = "severe"  # arrow cannot type this column any more
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    with pytest.raises(RowError) as info:
        load_data(_local(compose_cfg, tmp_path))
    assert str(tmp_path / "train.jsonl") in str(info.value)
    assert (info.value.row, info.value.field) == (3, "response_1_severity_level")


def test_skip_reports_every_bad_row_by_number(compose_cfg, tmp_path):
    rows = _rows(8)
    rows[1]["response_1_severity_level"] = 7
    rows[4]["safer_response_id"] = 1  # points at the unsafe response
    rows[6]["response_0_harm_category"] = {**empty_harm_categories(), "Arson": True}
    del rows[7]["prompt"]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    loaded = load_data(_local(compose_cfg, tmp_path, "data.on_bad_row=skip"))
    assert len(loaded.splits["train"]) == 4
    assert [(s.row, s.field) for s in loaded.skipped] == [
        (2, "response_1_severity_level"),
        (5, "safer_response_id"),
        (7, "response_0_harm_category"),
        (8, "prompt"),
    ]
    written = [json.loads(line) for line in loaded.write_skipped(tmp_path).read_text().splitlines()]
    assert [w["row"] for w in written] == [2, 5, 7, 8]
    assert all(w["source"].endswith("train.jsonl") and w["reason"] for w in written)


def test_raise_is_the_default(compose_cfg, tmp_path):
    rows = _rows(3)
    rows[1]["better_response_id"] = 3
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    with pytest.raises(RowError, match=r"row 2, field 'better_response_id'"):
        load_data(_local(compose_cfg, tmp_path))


def test_missing_split_file_and_path_are_named(compose_cfg, tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", _rows(3))
    with pytest.raises(DataSourceError, match="no test file"):
        load_data(_local(compose_cfg, tmp_path))
    with pytest.raises(DataSourceError, match="data.path"):
        load_data(_local(compose_cfg, tmp_path / "nowhere"))


def test_hub_id_offline_fails_at_once_pointing_at_data_path(compose_cfg):
    with pytest.raises(DataSourceError, match="data.path") as info:
        load_data(compose_cfg("data=pku_saferlhf").data)
    assert "PKU-Alignment/PKU-SafeRLHF" in str(info.value)


def test_embedded_benchmark_gives_the_configured_kind(compose_cfg):
    small = ["data.benchmark.num_train=40", "data.benchmark.num_test=10"]
    dual = load_data(compose_cfg(*small).data)
    assert (
        dual.kind == PREFERENCE
        and len(dual.splits["train"]) == 40
        and len(dual.splits["test"]) == 10
    )
    single = load_data(compose_cfg("preference=single", *small).data)
    assert (
        single.kind == "single" and "safer_response_id" not in single.splits["train"].column_names
    )
    qa = load_data(compose_cfg("data.kind=qa", *small).data)
    assert qa.kind == "qa" and 40 < len(qa.splits["train"]) <= 80


# -- rows are read as written ------------------------------------------------------------------

LOOKS_LIKE_JSON = ["42", "null", '"quoted"', "true", "[1, 2]", "{}", "2.5", "line\u2028separator"]


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_strings_that_look_like_json_stay_the_strings_they_were(compose_cfg, tmp_path):
    rows = [preference_row(prompt=text) for text in LOOKS_LIKE_JSON]
    rows.append(preference_row(prompt=7))  # a number in the prompt column mixes its types
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    loaded = load_data(_local(compose_cfg, tmp_path, "data.on_bad_row=skip"))
    assert loaded.splits["train"]["prompt"] == LOOKS_LIKE_JSON
    assert [(s.row, s.field) for s in loaded.skipped] == [(9, "prompt")]
    assert "expected str, got int 7" in loaded.skipped[0].reason
    written = _lines(loaded.write_skipped(tmp_path))
    assert written[0]["data"] == _lines(tmp_path / "train.jsonl")[8]  # the row as it was read


@pytest.mark.parametrize(
    "field, text",
    [
        ("response_1_severity_level", "2"),
        ("is_response_0_safe", "false"),
        ("better_response_id", "1"),
        ("response_0_harm_category", "{}"),
    ],
)
def test_a_string_where_a_number_or_boolean_belongs_is_a_type_error(
    compose_cfg, tmp_path, field, text
):
    rows = _rows(4)
    rows[2][field] = text
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    with pytest.raises(RowError, match=rf"row 3, field '{field}': expected \w+, got str") as info:
        load_data(_local(compose_cfg, tmp_path))
    assert str(tmp_path / "train.jsonl") in str(info.value)
    skipped = load_data(_local(compose_cfg, tmp_path, "data.on_bad_row=skip")).skipped
    assert [(s.row, s.field, s.data) for s in skipped] == [(3, field, rows[2])]


def test_integral_floats_are_integers_and_fractions_are_not(compose_cfg, tmp_path):
    rows = _rows(3)
    rows[0]["response_1_severity_level"] = 2.0  # JSON has one number type
    rows[1]["response_1_severity_level"] = 2.5
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    loaded = load_data(_local(compose_cfg, tmp_path, "data.on_bad_row=skip"))
    assert loaded.splits["train"]["response_1_severity_level"] == [2, 2]
    assert [(s.row, s.reason) for s in loaded.skipped] == [(2, "expected int, got float 2.5")]


def test_json_lines_are_numbered_by_line_and_bad_lines_are_rows(compose_cfg, tmp_path):
    good = json.dumps(preference_row()) + "\n"
    (tmp_path / "train.jsonl").write_text(good + "\n" + '{"prompt": "cut off\n' + "[1]\n" + good)
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    with pytest.raises(RowError, match=r"train.jsonl, row 3: this line is not valid JSON"):
        load_data(_local(compose_cfg, tmp_path))
    loaded = load_data(_local(compose_cfg, tmp_path, "data.on_bad_row=skip"))
    assert len(loaded.splits["train"]) == 2
    assert [(s.row, s.field, s.data) for s in loaded.skipped] == [
        (3, "", '{"prompt": "cut off'),
        (4, "", [1]),
    ]
    assert loaded.skipped[1].reason == "expected a JSON object, got list"


def test_json_array_files_are_read_as_written(compose_cfg, tmp_path):
    rows = [preference_row(prompt=text) for text in ("42", "null")] + ["not a row"]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    loaded = load_data(_local(compose_cfg, tmp_path / "pairs.json", "data.on_bad_row=skip"))
    prompts = list(loaded.splits["train"]["prompt"]) + list(loaded.splits["test"]["prompt"])
    assert sorted(prompts) == ["42", "null"]
    assert [(s.row, s.data) for s in loaded.skipped] == [(3, "not a row")]
    (tmp_path / "broken.json").write_text('[{"prompt": "a"},\n {"prompt": }]')
    with pytest.raises(DataSourceError, match=r"broken.json, line 2, column 13: not valid JSON"):
        load_data(_local(compose_cfg, tmp_path / "broken.json"))


def _csv_row(row):
    """A preference row as CSV cells: categories as JSON, booleans as pandas writes them."""
    cells = {k: json.dumps(v) if isinstance(v, dict) else str(v) for k, v in row.items()}
    return [cells[k] for k in row]


def test_csv_cells_stay_text_where_the_schema_wants_text(compose_cfg, tmp_path):
    prompts = ["None", "NA", "42", "nan", "", "True"]  # pandas would read NaN, 42 and True
    rows = [preference_row(prompt=p) for p in prompts]
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(rows[0]))
        writer.writerows(_csv_row(row) for row in rows)
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    loaded = load_data(_local(compose_cfg, tmp_path))
    train = loaded.splits["train"]
    assert train["prompt"] == prompts
    assert (
        train["is_response_0_safe"] == [True] * 6 and train["response_1_severity_level"] == [2] * 6
    )


@pytest.mark.parametrize(
    "field, text, expected",
    [
        ("response_1_severity_level", "2.0", "an integer"),
        ("response_1_severity_level", "two", "an integer"),
        ("is_response_0_safe", "1", "true or false"),
        ("is_response_0_safe", "yes", "true or false"),
        ("response_1_harm_category", "Violence", "a JSON object"),
    ],
)
def test_csv_text_that_is_not_its_fields_type_is_named(
    compose_cfg, tmp_path, field, text, expected
):
    rows = _rows(3)
    header = list(rows[0])
    cells = [_csv_row(row) for row in rows]
    cells[1][header.index(field)] = text
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *cells])
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    with pytest.raises(RowError) as info:
        load_data(_local(compose_cfg, tmp_path))
    # Line 1 is the header: the second data row is on line 3, as a spreadsheet numbers it.
    assert str(info.value) == (
        f"{path}, row 3, field '{field}': expected {expected}, got the text {text!r}"
    )


def test_csv_records_with_a_wrong_number_of_cells_are_bad_rows(compose_cfg, tmp_path):
    rows = _rows(3)
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(rows[0]))
        writer.writerows([_csv_row(rows[0]), _csv_row(rows[1])[:5], _csv_row(rows[2])])
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    loaded = load_data(_local(compose_cfg, tmp_path, "data.on_bad_row=skip"))
    assert len(loaded.splits["train"]) == 2
    assert [(s.row, s.data) for s in loaded.skipped] == [(3, _csv_row(rows[1])[:5])]
    assert "5 cells, but the header has 16 columns" in loaded.skipped[0].reason


def test_parquet_columns_keep_their_stored_types(compose_cfg, tmp_path):
    rows = _rows(3)
    for row in rows:
        row["response_1_severity_level"] = str(row["response_1_severity_level"])
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    with pytest.raises(RowError, match=r"row 1, field 'response_1_severity_level': expected int"):
        load_data(_local(compose_cfg, tmp_path))


def test_a_hub_column_the_json_reader_decoded_is_refused(compose_cfg, tmp_path, monkeypatch):
    rows = [preference_row(prompt="42"), preference_row(prompt=7)]
    _write_jsonl(tmp_path / "mixed.jsonl", rows)
    decoded = datasets.load_dataset("json", data_files=str(tmp_path / "mixed.jsonl"), split="train")
    assert decoded[0]["prompt"] == 42  # what the datasets json reader makes of "42"
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: decoded)
    with pytest.raises(DataSourceError, match=r"column 'prompt' mixes JSON types.*data=local"):
        load_data(compose_cfg("data=pku_saferlhf").data)


# -- bad files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("on_bad_row", ["raise", "skip"])
@pytest.mark.parametrize("name", ["train.jsonl", "train.csv", "train.json"])
def test_a_file_that_is_not_utf8_is_named_with_line_and_byte(
    compose_cfg, tmp_path, name, on_bad_row
):
    lines = [json.dumps(row) for row in _rows(3)]
    if name.endswith(".csv"):
        lines = ["prompt,response_0", "a,b", "c,d"]
    data = ("\n".join(lines[:2]) + "\n").encode()
    (tmp_path / name).write_bytes(data + "caf\xe9\n".encode("latin-1") + b"\n")
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    with pytest.raises(DataSourceError) as info:
        load_data(_local(compose_cfg, tmp_path, f"data.on_bad_row={on_bad_row}"))
    assert str(info.value).startswith(
        f"{tmp_path / name}, line 3 (byte {len(data) + 3}): not UTF-8"
    )


@pytest.mark.parametrize("on_bad_row", ["raise", "skip"])
@pytest.mark.parametrize(
    "name, text",
    [("train.jsonl", ""), ("train.jsonl", "\n \n"), ("train.csv", "prompt,response\n")],
)
def test_an_empty_file_is_called_empty(compose_cfg, tmp_path, name, text, on_bad_row):
    (tmp_path / name).write_text(text)
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    with pytest.raises(DataSourceError, match=rf"^{tmp_path / name}: empty, no rows to read$"):
        load_data(_local(compose_cfg, tmp_path, f"data.on_bad_row={on_bad_row}"))


def test_skip_stops_when_no_row_is_usable(compose_cfg, tmp_path):
    rows = _rows(3)
    for row in rows:
        row["better_response_id"] = 2
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    with pytest.raises(DataSourceError) as info:
        load_data(_local(compose_cfg, tmp_path, "data.on_bad_row=skip"))
    assert str(info.value) == (
        f"no usable rows in the train split: all 3 rows of {tmp_path / 'train.jsonl'} are "
        "invalid (data.on_bad_row=skip skipped them); the first: "
        f"{tmp_path / 'train.jsonl'}, row 1, field 'better_response_id': response id must be "
        "0 or 1, got 2"
    )


def test_too_few_rows_to_carve_a_test_split_name_test_fraction(compose_cfg, tmp_path):
    _write_jsonl(tmp_path / "pairs.jsonl", _rows(1))
    with pytest.raises(DataSourceError, match=r"data.test_fraction=0.1: cannot split the 1 usable"):
        load_data(_local(compose_cfg, tmp_path / "pairs.jsonl"))


# -- single or dual preference -----------------------------------------------------------------


def _without_safer(rows):
    return [{k: v for k, v in row.items() if k != "safer_response_id"} for row in rows]


def test_rows_without_safer_response_id_are_not_taken_for_single_preference(compose_cfg, tmp_path):
    path = tmp_path / "pairs.csv"
    datasets.Dataset.from_list(_without_safer(_rows(10))).to_csv(str(path), index=False)
    with pytest.raises(DataSourceError) as info:
        load_data(_local(compose_cfg, path))
    assert str(info.value).startswith(f"{path}: no column 'safer_response_id'")
    assert "preference=single" in str(info.value)
    for chosen in ("preference=single", "data.kind=single"):
        loaded = load_data(_local(compose_cfg, path, chosen))
        assert loaded.kind == "single" and len(loaded.splits["train"]) == 9


def test_dual_rows_with_preference_single_stay_dual(compose_cfg, tmp_path):
    _write_jsonl(tmp_path / "pairs.jsonl", _rows(10))
    assert (
        load_data(_local(compose_cfg, tmp_path / "pairs.jsonl", "preference=single")).kind
        == PREFERENCE
    )


# -- repeated rows and prompts -----------------------------------------------------------------


def test_repeated_rows_and_shared_prompts_are_counted_and_warned(compose_cfg, tmp_path, caplog):
    train = _rows(6)
    train[4] = dict(train[1])  # an exact repeat
    train[5] = dict(train[1], prompt_source="elsewhere")  # other columns do not count
    test = [
        preference_row(prompt="question 2 ?"),
        preference_row(prompt="question 2 ?", response_0="no ."),
    ]
    test += _rows(2, offset=50)
    _write_jsonl(tmp_path / "train.jsonl", train)
    _write_jsonl(tmp_path / "test.jsonl", test)
    with caplog.at_level("WARNING"):
        loaded = load_data(_local(compose_cfg, tmp_path))
    repeats = loaded.repeats
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    assert repeats.duplicate_rows == {"train": 2, "test": 0}
    assert repeats.duplicate_examples["train"] == [
        f"{train_file}, row 5 repeats {train_file}, row 2",
        f"{train_file}, row 6 repeats {train_file}, row 2",
    ]
    assert (repeats.shared_prompts, repeats.shared_prompt_test_rows) == (1, 2)
    assert repeats.shared_prompt_examples == [
        f"{test_file}, row 1 has the prompt of {train_file}, row 3"
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("train split: 2 rows repeat an earlier row" in w for w in warnings)
    assert any(w.startswith("1 test prompts are also train prompts (2 test rows") for w in warnings)
    assert len(loaded.splits["train"]) == 6  # reported, not dropped


def test_benchmark_has_no_repeats(compose_cfg):
    loaded = load_data(
        compose_cfg("data.benchmark.num_train=200", "data.benchmark.num_test=50").data
    )
    assert loaded.repeats.duplicate_rows == {"train": 0, "test": 0}
    assert loaded.repeats.shared_prompts == 0


def test_a_hub_split_the_datasets_library_cannot_read_is_named(compose_cfg, monkeypatch):
    def unreadable(*args, **kwargs):
        raise datasets.exceptions.DatasetGenerationError("An error occurred") from ValueError(
            "column types differ between files"
        )

    monkeypatch.setattr(datasets, "load_dataset", unreadable)
    with pytest.raises(DataSourceError) as info:
        load_data(compose_cfg("data=pku_saferlhf").data)
    assert str(info.value).startswith(
        "PKU-Alignment/PKU-SafeRLHF[train]: the datasets library could not read its files "
        "(column types differ between files); download them and run with data=local"
    )


# -- BeaverTails rows ----------------------------------------------------------------------------


def _beavertails_rows(n, offset=0):
    flags = [(), ("animal_abuse",), ("self_harm", "violence,aiding_and_abetting,incitement")]
    return [
        beavertails_row(prompt=f"question {offset + i} ?", flagged=flags[i % 3]) for i in range(n)
    ]


def _write_beavertails(directory):
    _write_jsonl(directory / "train.jsonl", _beavertails_rows(9))
    _write_jsonl(directory / "test.jsonl", _beavertails_rows(3, offset=100))


@pytest.mark.parametrize(
    "overrides", [("data=beavertails",), ("data=local", "taxonomy=beavertails")]
)
def test_beavertails_rows_load_with_either_config(compose_cfg, tmp_path, overrides):
    _write_beavertails(tmp_path)
    cfg = compose_cfg(*overrides, f"data.path={tmp_path}")
    assert cfg.taxonomy.name == "beavertails"
    loaded = load_data(cfg.data)
    assert loaded.kind == BEAVERTAILS
    train = loaded.splits["train"]
    assert (len(train), len(loaded.splits["test"])) == (9, 3)
    assert list(train.features["category"]) == list(BEAVERTAILS_TAXONOMY.categories)
    assert train[2]["category"]["violence,aiding_and_abetting,incitement"] is True
    assert [row["is_safe"] for row in train][:3] == [True, False, False]


def test_beavertails_rows_under_pku_taxonomy_point_at_taxonomy_beavertails(compose_cfg, tmp_path):
    _write_beavertails(tmp_path)
    with pytest.raises(
        DataSourceError, match=r"train.jsonl: BeaverTails rows have no severity"
    ) as info:
        load_data(_local(compose_cfg, tmp_path))
    assert "run with taxonomy=beavertails" in str(info.value)


def test_pku_rows_under_beavertails_taxonomy_name_the_category_field(compose_cfg, tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", _rows(4))
    _write_jsonl(tmp_path / "test.jsonl", _rows(2))
    with pytest.raises(RowError, match=r"row 1, field 'response_0_harm_category': unknown harm"):
        load_data(_local(compose_cfg, tmp_path, "taxonomy=beavertails"))


def test_bad_beavertails_rows_are_named_or_skipped_as_read(compose_cfg, tmp_path):
    rows = _beavertails_rows(9)
    rows[3]["category"] = {**rows[3]["category"], "arson": True}
    rows[5]["is_safe"] = "no"
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", _beavertails_rows(3, offset=100))
    cfg = compose_cfg("data=beavertails", f"data.path={tmp_path}")
    with pytest.raises(
        RowError, match=r"train.jsonl, row 4, field 'category': unknown harm categories \['arson'\]"
    ):
        load_data(cfg.data)
    cfg = compose_cfg("data=beavertails", f"data.path={tmp_path}", "data.on_bad_row=skip")
    loaded = load_data(cfg.data)
    assert len(loaded.splits["train"]) == 7
    assert [(s.row, s.field) for s in loaded.skipped] == [(4, "category"), (6, "is_safe")]
    written = _lines(loaded.write_skipped(tmp_path))
    assert [line["data"] for line in written] == [rows[3], rows[5]]


def test_beavertails_csv_and_parquet_like_the_hub(compose_cfg, tmp_path):
    rows = _beavertails_rows(10)
    csv_rows = [{**row, "category": json.dumps(row["category"])} for row in rows]
    datasets.Dataset.from_list(csv_rows).to_csv(str(tmp_path / "rows.csv"), index=False)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    for name in ("rows.csv", "rows.parquet"):
        cfg = compose_cfg("data=beavertails", f"data.path={tmp_path / name}")
        loaded = load_data(cfg.data)
        assert len(loaded.splits["train"]) + len(loaded.splits["test"]) == 10, name
        assert loaded.splits["train"].features["category"]["self_harm"].dtype == "bool"


def test_benchmark_refuses_another_taxonomy(compose_cfg):
    with pytest.raises(ConfigError, match=r"^data=benchmark is labelled with PKU-SafeRLHF's"):
        load_data(compose_cfg("taxonomy=beavertails").data)


def test_the_benchmark_is_made_once_per_process_and_loads_the_same(compose_cfg):
    from saferlhf.data.benchmark import generate_benchmark
    from saferlhf.data.sources import benchmark_rows, load_data

    data = compose_cfg("data.benchmark.num_train=40", "data.benchmark.num_test=10").data
    b = data.benchmark
    benchmark_rows.cache_clear()  # other tests in this process may have made these rows
    first, second = load_data(data), load_data(data)
    assert benchmark_rows.cache_info().misses == 1  # the second load reused the rows
    assert first.splits["train"].to_list() == second.splits["train"].to_list()
    fresh = generate_benchmark(b.num_train, b.num_test, b.seed, b.label_noise, b.benign_fraction)
    assert [r["prompt"] for r in first.splits["train"]] == [r["prompt"] for r in fresh["train"]]
