"""Hand-built hub-schema rows for the data-layer tests."""

import hashlib

from saferlhf.data.schema import empty_harm_categories


def preference_row(**overrides):
    """A valid dual-preference row: response_1 is unsafe (Violence, moderate) and more helpful."""
    harmful = empty_harm_categories()
    harmful["Violence"] = True
    row = {
        "prompt": "how do i hurt someone ?",
        "response_0": "i cannot help with that .",
        "response_1": "hit them hard .",
        "prompt_source": "test",
        "response_0_source": "test",
        "response_1_source": "test",
        "is_response_0_safe": True,
        "is_response_1_safe": False,
        "response_0_harm_category": empty_harm_categories(),
        "response_1_harm_category": harmful,
        "response_0_severity_level": 0,
        "response_1_severity_level": 2,
        "better_response_id": 1,
        "safer_response_id": 0,
    }
    row.update(overrides)
    for i in (0, 1):
        row.setdefault(
            f"response_{i}_sha256", hashlib.sha256(row[f"response_{i}"].encode()).hexdigest()
        )
    return row
