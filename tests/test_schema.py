import pytest

from saferlhf.data.schema import (
    BEAVERTAILS,
    HARM_CATEGORIES,
    PREFERENCE,
    QA,
    SINGLE,
    RowError,
    detect_kind,
    empty_harm_categories,
    row_problem,
    validate_row,
)
from saferlhf.taxonomy import BEAVERTAILS as BEAVERTAILS_TAXONOMY
from saferlhf.taxonomy import PKU_SAFERLHF
from tests.beavertails_rows import beavertails_row
from tests.rows import preference_row


def test_benchmark_categories_are_pku_saferlhfs():
    assert HARM_CATEGORIES == PKU_SAFERLHF.categories


def test_good_rows_pass():
    assert row_problem(preference_row(), PREFERENCE) is None
    single = {
        k: v
        for k, v in preference_row().items()
        if "safe" not in k and "harm" not in k and "severity" not in k
    }
    assert row_problem(single, SINGLE) is None
    qa = {
        "prompt": "p",
        "response": "r",
        "is_safe": True,
        "harm_category": empty_harm_categories(),
        "severity_level": 0,
    }
    assert row_problem(qa, QA) is None


def _without(field):
    row = preference_row()
    del row[field]
    return row


@pytest.mark.parametrize(
    "row, field, words",
    [
        (_without("prompt"), "prompt", "missing"),
        (_without("safer_response_id"), "safer_response_id", "missing"),
        (
            preference_row(response_0_severity_level="high"),
            "response_0_severity_level",
            "expected int",
        ),
        (preference_row(is_response_0_safe="yes"), "is_response_0_safe", "expected bool"),
        (preference_row(better_response_id=True), "better_response_id", "expected int"),
        (preference_row(response_1_severity_level=4), "response_1_severity_level", "0..3"),
        (preference_row(response_0_severity_level=-1), "response_0_severity_level", "0..3"),
        (preference_row(better_response_id=2), "better_response_id", "0 or 1"),
        (preference_row(safer_response_id=-1), "safer_response_id", "0 or 1"),
        (
            preference_row(response_1_harm_category={**empty_harm_categories(), "Arson": True}),
            "response_1_harm_category",
            "Arson",
        ),
        (preference_row(safer_response_id=1), "safer_response_id", "unsafe"),
    ],
)
def test_each_bad_kind_names_row_and_field(row, field, words):
    with pytest.raises(RowError) as info:
        validate_row(row, PREFERENCE, "data/train.jsonl", 7)
    message = str(info.value)
    assert info.value.field == field
    assert "data/train.jsonl" in message and "row 7" in message and f"'{field}'" in message
    assert words in message


def test_safer_may_point_at_the_less_severe_of_two_unsafe_responses():
    harmful = {**empty_harm_categories(), "Drugs": True}
    row = preference_row(
        is_response_0_safe=False, response_0_harm_category=harmful, response_0_severity_level=1
    )
    assert row_problem(row, PREFERENCE) is None


def test_kind_is_detected_from_columns():
    assert detect_kind(preference_row().keys()) == PREFERENCE
    assert detect_kind(["prompt", "response_0", "response_1", "better_response_id"]) == SINGLE
    assert detect_kind(["prompt", "response", "is_safe"]) == QA
    assert detect_kind(["prompt", "response", "category", "is_safe"]) == BEAVERTAILS


def test_type_errors_show_the_value_cut_short():
    assert row_problem(preference_row(is_response_0_safe="false"), PREFERENCE) == (
        "is_response_0_safe",
        "expected bool, got str 'false'",
    )
    field, reason = row_problem(preference_row(prompt=["x" * 500]), PREFERENCE)
    assert field == "prompt" and reason.startswith("expected str, got list ['xxx")
    assert reason.endswith("...") and len(reason) < 100


def test_a_row_error_without_a_field_names_the_row():
    assert str(RowError("data/train.jsonl", 3, "", "this line is not valid JSON")) == (
        "data/train.jsonl, row 3: this line is not valid JSON"
    )


def test_beavertails_rows_are_checked_against_the_taxonomy():
    assert row_problem(beavertails_row(), BEAVERTAILS, BEAVERTAILS_TAXONOMY) is None
    pku_names = {**beavertails_row(), "category": {"Violence": True}}
    field, reason = row_problem(pku_names, BEAVERTAILS, BEAVERTAILS_TAXONOMY)
    assert field == "category" and "unknown harm categories ['Violence']" in reason
    assert "taxonomy=beavertails has ['animal_abuse'" in reason
    # PKU-SafeRLHF's names are refused the other way round too.
    field, reason = row_problem(beavertails_row(), BEAVERTAILS, PKU_SAFERLHF)
    assert field == "category" and "taxonomy=pku_saferlhf" in reason


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("response", None, "missing required field"),
        ("is_safe", "False", "expected bool, got str 'False'"),
        ("category", "self_harm", "expected dict, got str"),
        ("category", {"self_harm": 1}, "must be booleans, not for ['self_harm']"),
    ],
)
def test_bad_beavertails_row_names_row_and_field(field, value, words):
    row = {**beavertails_row(), field: value}
    with pytest.raises(RowError) as info:
        validate_row(row, BEAVERTAILS, "bt/train.jsonl", 4, BEAVERTAILS_TAXONOMY)
    assert str(info.value).startswith(f"bt/train.jsonl, row 4, field '{field}': ")
    assert words in str(info.value)
