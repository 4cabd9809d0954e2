from saferlhf.data.schema import HARM_CATEGORIES, empty_harm_categories
from saferlhf.data.views import (
    conversations,
    preference_pairs,
    preferred_conversations,
    prompts,
    qa_items,
    qa_key,
    safety_pairs,
)
from tests.beavertails_rows import beavertails_row
from tests.rows import preference_row


def test_preference_pairs_follow_better():
    rows = [preference_row(), preference_row(better_response_id=0)]
    pairs = preference_pairs(rows)
    assert (pairs[0].chosen, pairs[0].rejected) == ("hit them hard .", "i cannot help with that .")
    assert (pairs[1].chosen, pairs[1].rejected) == ("i cannot help with that .", "hit them hard .")


def test_safety_pairs_follow_safer_with_signs():
    (pair,) = safety_pairs([preference_row()])
    assert pair.safer == "i cannot help with that ." and pair.unsafer == "hit them hard ."
    assert (pair.safer_sign, pair.unsafer_sign) == (-1, 1)
    both_unsafe = preference_row(
        is_response_0_safe=False,
        response_0_harm_category={**empty_harm_categories(), "Drugs": True},
        response_0_severity_level=1,
    )
    (pair,) = safety_pairs([both_unsafe])
    assert (pair.safer_sign, pair.unsafer_sign) == (1, 1)
    both_safe = preference_row(
        is_response_1_safe=True,
        response_1_harm_category=empty_harm_categories(),
        response_1_severity_level=0,
        safer_response_id=1,
    )
    (pair,) = safety_pairs([both_safe])
    assert pair.safer == "hit them hard ." and (pair.safer_sign, pair.unsafer_sign) == (-1, -1)


def test_qa_items_are_deduplicated_by_prompt_and_response():
    rows = [preference_row(), preference_row(response_1="another answer .")]
    items = qa_items(rows)
    assert [item.response for item in items] == [
        "i cannot help with that .",
        "hit them hard .",
        "another answer .",
    ]
    assert items[1].categories == ("Violence",) and items[1].severity == 2 and not items[1].is_safe
    assert items[0].is_safe and items[0].categories == ()
    assert qa_key("a", "bc") != qa_key("ab", "c")
    # QA-schema rows round-trip through the same view.
    assert qa_items([item.to_row(HARM_CATEGORIES) for item in items]) == items


def test_prompts_are_distinct_in_order():
    rows = [preference_row(prompt="b"), preference_row(prompt="a"), preference_row(prompt="b")]
    assert prompts(rows) == ["b", "a"]


def test_conversations_come_from_every_row_kind_deduplicated():
    dual = [preference_row(), preference_row(response_1="another answer .")]
    single = [
        {key: row[key] for key in ("prompt", "response_0", "response_1", "better_response_id")}
        for row in dual
    ]  # no safety fields: single-preference rows
    expected = [
        ("how do i hurt someone ?", "i cannot help with that ."),
        ("how do i hurt someone ?", "hit them hard ."),
        ("how do i hurt someone ?", "another answer ."),
    ]
    assert conversations(dual) == conversations(single) == expected
    assert conversations([item.to_row(HARM_CATEGORIES) for item in qa_items(dual)]) == expected


def test_preferred_conversations_keep_the_better_response_where_it_is_safe():
    both_safe = dict(
        is_response_1_safe=True,
        response_1_harm_category=empty_harm_categories(),
        response_1_severity_level=0,
    )
    both_unsafe = dict(
        is_response_0_safe=False,
        response_0_harm_category={**empty_harm_categories(), "Drugs": True},
        response_0_severity_level=1,
    )
    dual = [
        preference_row(),  # the better answer is harmful: none
        preference_row(**both_safe, better_response_id=1),  # both safe: the better one
        preference_row(**both_safe, better_response_id=0),
        preference_row(**both_unsafe, better_response_id=0),
        preference_row(**both_safe, better_response_id=1),  # a repeat counts once
    ]
    assert preferred_conversations(dual) == [
        ("how do i hurt someone ?", "hit them hard ."),
        ("how do i hurt someone ?", "i cannot help with that ."),
    ]
    single = [
        {key: row[key] for key in ("prompt", "response_0", "response_1", "better_response_id")}
        for row in dual[:1]
    ]  # no safety fields: the single label alone decides, unsafe or not
    assert preferred_conversations(single) == [("how do i hurt someone ?", "hit them hard .")]


def test_beavertails_rows_are_qa_items_without_severity():
    rows = [beavertails_row(), beavertails_row(), beavertails_row(response="no .", flagged=())]
    items = qa_items(rows)
    assert len(items) == 2  # the repeated (prompt, response) counts once
    assert items[0].categories == ("controversial_topics,politics", "self_harm")
    assert items[0].severity is None and not items[0].is_safe
    assert items[1].categories == () and items[1].is_safe
    assert conversations(rows) == [
        (rows[0]["prompt"], rows[0]["response"]),
        (rows[2]["prompt"], "no ."),
    ]
