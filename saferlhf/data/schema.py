"""The hub row schemas (PKU-SafeRLHF's three datasets and BeaverTails) and row validation.

Pure Python (no torch): every loader and the embedded benchmark validate rows here, so a
bad row is reported the same way whatever its source. Category names are checked against a
:class:`saferlhf.taxonomy.Taxonomy` (PKU-SafeRLHF's unless the run chose another).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from saferlhf.errors import UserError
from saferlhf.taxonomy import PKU_SAFERLHF, SEVERITY_LEVELS, Taxonomy

# The embedded benchmark's categories; rows are checked against the run's taxonomy.
HARM_CATEGORIES: tuple[str, ...] = PKU_SAFERLHF.categories

# Row kinds: which hub dataset a row follows.
PREFERENCE = "preference"  # PKU-Alignment/PKU-SafeRLHF (dual preference)
SINGLE = "single"  # PKU-Alignment/PKU-SafeRLHF-single-dimension
QA = "qa"  # PKU-Alignment/PKU-SafeRLHF-QA
BEAVERTAILS = "beavertails"  # PKU-Alignment/BeaverTails: QA rows with flags, no severity
ROW_KINDS = (PREFERENCE, SINGLE, QA, BEAVERTAILS)

_RESPONSE_FIELDS = {"prompt": str, "response_0": str, "response_1": str}
_SAFETY_FIELDS = {
    "is_response_0_safe": bool,
    "is_response_1_safe": bool,
    "response_0_harm_category": dict,
    "response_1_harm_category": dict,
    "response_0_severity_level": int,
    "response_1_severity_level": int,
    "safer_response_id": int,
}
REQUIRED_FIELDS: dict[str, dict[str, type]] = {
    PREFERENCE: {**_RESPONSE_FIELDS, **_SAFETY_FIELDS, "better_response_id": int},
    SINGLE: {**_RESPONSE_FIELDS, "better_response_id": int},
    QA: {
        "prompt": str,
        "response": str,
        "is_safe": bool,
        "harm_category": dict,
        "severity_level": int,
    },
    BEAVERTAILS: {"prompt": str, "response": str, "category": dict, "is_safe": bool},
}


@dataclass(frozen=True)
class RowError(UserError, ValueError):
    """A row that breaks the schema: where it is and which field is wrong."""

    source: str
    row: int
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}, row {self.row}"
        if self.field:  # empty when the row as a whole is unreadable (not JSON, not an object)
            where += f", field '{self.field}'"
        return f"{where}: {self.reason}"


def empty_harm_categories() -> dict[str, bool]:
    return {name: False for name in HARM_CATEGORIES}


SHOWN_CHARS = 60  # of a bad value in an error message


def shown(value: Any) -> str:
    """``repr(value)``, cut short enough for a one-line message."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def _check_type(row: Mapping[str, Any], field: str, expected: type) -> str | None:
    if field not in row or row[field] is None:
        return "missing required field"
    value = row[field]
    # bool is an int subclass: an int field must not accept True/False, and vice versa.
    if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
        return f"expected {expected.__name__}, got {type(value).__name__} {shown(value)}"
    return None


def _check_harm_categories(value: Mapping[str, Any], taxonomy: Taxonomy) -> str | None:
    unknown = sorted(set(value) - set(taxonomy.categories))
    if unknown:
        return (
            f"unknown harm categories {unknown}; taxonomy={taxonomy.name} has "
            f"{list(taxonomy.categories)}"
        )
    bad = [name for name, flag in value.items() if not isinstance(flag, bool) and flag is not None]
    if bad:
        return f"harm category values must be booleans, not for {bad}"
    return None


def row_problem(
    row: Mapping[str, Any], kind: str, taxonomy: Taxonomy = PKU_SAFERLHF
) -> tuple[str, str] | None:
    """Return ``(field, reason)`` for the first schema violation of ``row``, or None if valid;
    category names must be ``taxonomy``'s."""
    if kind not in REQUIRED_FIELDS:
        raise ValueError(f"unknown row kind {kind!r}; expected one of {ROW_KINDS}")
    for field, expected in REQUIRED_FIELDS[kind].items():
        reason = _check_type(row, field, expected)
        if reason:
            return field, reason
    if kind == BEAVERTAILS:
        problem = _check_harm_categories(row["category"], taxonomy)
        return ("category", problem) if problem else None
    if kind == QA:
        return _check_response(row, "harm_category", "severity_level", taxonomy)
    for field in ("better_response_id", "safer_response_id"):
        if field in REQUIRED_FIELDS[kind] and row[field] not in (0, 1):
            return field, f"response id must be 0 or 1, got {row[field]!r}"
    if kind == SINGLE:
        return None
    for i in (0, 1):
        problem = _check_response(
            row, f"response_{i}_harm_category", f"response_{i}_severity_level", taxonomy
        )
        if problem:
            return problem
    safer = row["safer_response_id"]
    if not row[f"is_response_{safer}_safe"] and row[f"is_response_{1 - safer}_safe"]:
        return (
            "safer_response_id",
            f"points at response_{safer}, which is unsafe, while response_{1 - safer} is safe",
        )
    return None


def _check_response(
    row: Mapping[str, Any], category_field: str, severity_field: str, taxonomy: Taxonomy
) -> tuple[str, str] | None:
    problem = _check_harm_categories(row[category_field], taxonomy)
    if problem:
        return category_field, problem
    severity = row[severity_field]
    if severity not in SEVERITY_LEVELS:
        return severity_field, f"severity must be in 0..3, got {severity!r}"
    return None


def validate_row(
    row: Mapping[str, Any], kind: str, source: str, index: int, taxonomy: Taxonomy = PKU_SAFERLHF
) -> None:
    """Raise :class:`RowError` naming ``source``, row ``index`` and the field if ``row`` is invalid."""
    problem = row_problem(row, kind, taxonomy)
    if problem:
        raise RowError(source, index, *problem)


def detect_kind(columns: set[str] | list[str]) -> str:
    """Guess the row kind from a dataset's column names (the hub datasets differ in columns)."""
    columns = set(columns)
    if "response" in columns and "response_0" not in columns:
        return BEAVERTAILS if "category" in columns and "harm_category" not in columns else QA
    if "safer_response_id" in columns:
        return PREFERENCE
    return SINGLE
