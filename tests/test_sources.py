import json

import datasets
import pytest

from saferlhf.data.schema import PREFERENCE, RowError, empty_harm_categories
from saferlhf.data.sources import DataSourceError, load_data
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
