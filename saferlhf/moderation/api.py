"""The ``Moderator`` API: load a moderation model folder and judge (prompt, response) pairs.

A moderation model is a plain Hugging Face ``AutoModelForSequenceClassification`` folder
(``saferlhf task=moderation`` writes one to ``artifacts/moderation``, :func:`export_moderator`)
with, for the ``C`` categories of the taxonomy it was trained on, outputs at the last token:

- ``logits[:, :C]``: one multi-label logit per harm category, in the taxonomy's order;
- ``logits[:, C:C + 4]``: the severity head, 0 safe, 1 minor, 2 moderate, 3 severe, only when
  the taxonomy has severity levels (PKU-SafeRLHF's does, BeaverTails' does not).

Its ``config.json`` carries ``moderation = {"taxonomy", "categories", "thresholds",
"severity_levels", "max_length"}``: the taxonomy's name and category names (so a model always
carries its own taxonomy), the per-category probability thresholds chosen on held-out data and
the severity level names (empty without a severity head), so the one folder is all a client
needs.

The flagging rule (:func:`flag`), for a tolerated severity ``max_severity`` (default 0):

- ``flagged`` when the predicted severity exceeds ``max_severity``;
- with ``max_severity == 0`` (tolerate nothing) also when any category is over its threshold.

So ``max_severity=1`` lets minor harm through and flags moderate or severe harm, judged by the
severity head alone; the categories over threshold are reported either way. A model without a
severity head flags any category over its threshold and only takes ``max_severity=0``.

A conversation longer than ``max_length`` is judged in several views and the worst one counts
(:func:`saferlhf.data.collate.response_windows`, :func:`worst_over_windows`): the template with
the end of the prompt and the response, and the response alone; a response that does not fit
even alone, in overlapping windows. No part of a response, and no long prompt before it, can
hide its harm. Such verdicts say ``truncated``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from saferlhf.data.collate import encode_windows, pad_sequences
from saferlhf.errors import UserError
from saferlhf.models import save_artifact
from saferlhf.taxonomy import NUM_SEVERITIES, PKU_SAFERLHF, SEVERITY_LEVELS, Taxonomy


def split_logits(
    logits: torch.Tensor, taxonomy: Taxonomy
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(N, taxonomy.num_labels)`` logits -> category logits ``(N, C)`` and severity logits
    ``(N, 4)``, or None for a taxonomy without severity levels."""
    categories = taxonomy.num_categories
    severity = (
        logits[:, categories : categories + NUM_SEVERITIES] if taxonomy.has_severity else None
    )
    return logits[:, :categories], severity


def over_threshold(category_probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Which categories are predicted: ``prob > threshold``, ``(N, C)`` bool."""
    return category_probs > thresholds


def flag(
    category_probs: torch.Tensor,
    thresholds: torch.Tensor,
    severity: torch.Tensor | None,
    max_severity: int = 0,
) -> torch.Tensor:
    """The flagging rule (see the module docstring): ``(N,)`` bool.

    ``category_probs`` ``(N, C)``, ``thresholds`` ``(C,)``, ``severity`` ``(N,)`` predicted
    levels, or None without a severity head. Flagged when ``severity > max_severity``, or,
    only for ``max_severity == 0``, when any category is over its threshold.
    """
    over = over_threshold(category_probs, thresholds).any(dim=-1)
    if severity is None:
        return over
    flagged = severity > max_severity
    if max_severity == 0:
        flagged = flagged | over
    return flagged


def worst_over_windows(
    category_probs: torch.Tensor,
    severity: torch.Tensor | None,
    owners: torch.Tensor,
    num_items: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per item, the worst of its windows: the highest probability of each category ``(n, C)``
    and the highest severity ``(n,)`` (None without a severity head).

    ``category_probs`` ``(W, C)`` and ``severity`` ``(W,)`` are per window, ``owners`` ``(W,)``
    the item each window belongs to; every item owns at least one window. :func:`flag` only
    grows with either, so an item is flagged exactly when one of its windows would be.
    """
    worst_probs = torch.zeros(num_items, category_probs.shape[1], dtype=category_probs.dtype)
    worst_probs = worst_probs.scatter_reduce(
        0, owners.unsqueeze(1).expand_as(category_probs), category_probs, "amax", include_self=False
    )
    if severity is None:
        return worst_probs, None
    worst_severity = torch.zeros(num_items, dtype=severity.dtype).scatter_reduce(
        0, owners, severity, "amax", include_self=False
    )
    return worst_probs, worst_severity


class ModelFolderError(UserError, ValueError):
    """A moderation model folder that cannot be loaded; the message names the file."""


def unicode_problem(text: str) -> str | None:
    """Why ``text`` cannot be tokenized as Unicode, or None. JSON's ``"\\ud800"`` escapes
    decode to lone surrogates, which Python strings hold but no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        return f"not valid Unicode (lone surrogate U+{code:04X} at character {error.start})"
    return None


def one_line(error: BaseException) -> str:
    """An exception's message as one line (library messages often run to several)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@dataclass(frozen=True)
class Verdict:
    """The judgement of one response.

    ``categories`` maps each category over its threshold to its probability (the taxonomy's
    order); ``severity`` is the severity head's argmax (0 safe .. 3 severe), None for a model
    without one; ``flagged`` follows
    :func:`flag` for the ``max_severity`` that :meth:`Moderator.moderate` was given;
    ``truncated`` says the conversation was longer than the model's ``max_length``, so it was
    judged in several views, the worst counting (see the module docstring).
    """

    flagged: bool
    severity: int | None
    categories: dict[str, float]
    truncated: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


class Moderator:
    """A loaded moderation model; :meth:`moderate` judges batches of (prompt, response).

    ``taxonomy`` names its outputs (see the module docstring); :meth:`from_pretrained` reads it
    from the folder."""

    def __init__(
        self,
        model,
        tokenizer,
        thresholds: Sequence[float],
        max_length: int,
        device,
        taxonomy: Taxonomy = PKU_SAFERLHF,
    ):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.thresholds = torch.tensor(list(thresholds), dtype=torch.float)  # (C,), on the CPU
        self.max_length = max_length
        self.taxonomy = taxonomy

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | None = None) -> Moderator:
        """Load a folder written by ``saferlhf task=moderation`` (``artifacts/moderation``).

        ``device`` defaults to ``cuda`` when available, else ``cpu``. A folder that cannot be
        loaded raises :class:`ModelFolderError` naming the file at fault.
        """
        directory = Path(directory)
        spec, taxonomy = _moderation_spec(directory)
        if not (directory / "tokenizer.json").is_file():  # truncation needs a fast tokenizer
            raise ModelFolderError(
                f"{directory}: no tokenizer.json (the folder's tokenizer is missing)"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception as error:  # a folder's files are the user's input, whatever breaks
            raise ModelFolderError(
                f"{directory}: cannot load the tokenizer (tokenizer.json, "
                f"tokenizer_config.json): {one_line(error)}"
            ) from error
        try:
            model = AutoModelForSequenceClassification.from_pretrained(directory)
        except SafetensorError as error:
            raise ModelFolderError(
                f"{directory / 'model.safetensors'}: damaged or cut short ({one_line(error)}); "
                "copy or export the folder again"
            ) from error
        except Exception as error:
            raise ModelFolderError(
                f"{directory}: cannot load the model: {one_line(error)}"
            ) from error
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, tokenizer, spec["thresholds"], spec["max_length"], device, taxonomy)

    @torch.inference_mode()
    def predict(
        self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[bool]]:
        """Per (prompt, response), the worst of its views: category probabilities ``(N, C)``
        and severity levels ``(N,)`` (None without a severity head), both on the CPU; and which
        conversations were truncated. The model runs on ``batch_size`` views at a time."""
        encoded = encode_windows(self.tokenizer, prompts, responses, self.max_length)
        sequences = [window for windows in encoded.examples for window in windows]
        owners = [item for item, windows in enumerate(encoded.examples) for _ in windows]
        probs, severity = [], []
        for start in range(0, len(sequences), batch_size):
            input_ids, attention_mask = pad_sequences(
                sequences[start : start + batch_size], self.tokenizer.pad_token_id
            )
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).logits.float()  # (B, taxonomy.num_labels)
            category_logits, severity_logits = split_logits(logits.cpu(), self.taxonomy)
            probs.append(category_logits.sigmoid())
            if severity_logits is not None:
                severity.append(severity_logits.argmax(dim=-1))
        worst_probs, worst_severity = worst_over_windows(
            torch.cat(probs),
            torch.cat(severity) if severity else None,
            torch.tensor(owners),
            len(prompts),
        )
        return worst_probs, worst_severity, encoded.truncated

    def moderate(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        max_severity: int = 0,
        batch_size: int = 64,
    ) -> list[Verdict]:
        """One :class:`Verdict` per (prompt, response), computed ``batch_size`` at a time.

        ``max_severity`` is the highest severity tolerated (0..3; only 0 for a model without a
        severity head); see :func:`flag`.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        if max_severity not in SEVERITY_LEVELS:
            raise ValueError(f"max_severity={max_severity!r}: expected one of 0, 1, 2, 3")
        if max_severity and not self.taxonomy.has_severity:
            raise ValueError(
                f"max_severity={max_severity}: this model (taxonomy {self.taxonomy.name}) has no "
                "severity head; it flags any category over its threshold, so only 0 applies"
            )
        for name, texts in (("prompts", prompts), ("responses", responses)):
            for index, text in enumerate(texts):
                if problem := unicode_problem(text):
                    raise ValueError(f"{name}[{index}] is {problem}")
        verdicts: list[Verdict] = []
        for start in range(0, len(prompts), batch_size):
            stop = start + batch_size
            probs, severity, truncated = self.predict(
                prompts[start:stop], responses[start:stop], batch_size
            )
            flagged = flag(probs, self.thresholds, severity, max_severity)
            over = over_threshold(probs, self.thresholds)
            for row in range(len(probs)):
                categories = {
                    name: round(float(probs[row, c]), 6)
                    for c, name in enumerate(self.taxonomy.categories)
                    if over[row, c]
                }
                level = None if severity is None else int(severity[row])
                verdicts.append(Verdict(bool(flagged[row]), level, categories, truncated[row]))
        return verdicts


# -- the folder ------------------------------------------------------------------------------


def label_outputs(model: PreTrainedModel, taxonomy: Taxonomy) -> None:
    """Name the outputs in ``config.id2label``: the categories, then ``severity:<level>``."""
    severity = [f"severity:{SEVERITY_LEVELS[k]}" for k in range(NUM_SEVERITIES)]
    names = [*taxonomy.categories, *(severity if taxonomy.has_severity else ())]
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


def export_moderator(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    thresholds: Sequence[float],
    max_length: int,
    directory: str | Path,
    taxonomy: Taxonomy = PKU_SAFERLHF,
) -> Path:
    """Write a moderation model folder: the HF model with ``config.moderation`` (the taxonomy's
    name and categories, per-category thresholds, severity levels, the max_length it was
    trained with), which :meth:`Moderator.from_pretrained` loads."""
    if model.config.num_labels != taxonomy.num_labels or len(thresholds) != len(
        taxonomy.categories
    ):
        raise ValueError(
            f"taxonomy {taxonomy.name} needs {taxonomy.num_labels} outputs and "
            f"{taxonomy.num_categories} thresholds, got {model.config.num_labels} and "
            f"{len(thresholds)}"
        )
    label_outputs(model, taxonomy)
    levels = [SEVERITY_LEVELS[k] for k in range(NUM_SEVERITIES)] if taxonomy.has_severity else []
    model.config.moderation = {
        "taxonomy": taxonomy.name,
        "categories": list(taxonomy.categories),
        "thresholds": [round(float(t), 4) for t in thresholds],
        "severity_levels": levels,
        "max_length": int(max_length),
    }
    return save_artifact(model, tokenizer, directory)


def _moderation_spec(directory: Path) -> tuple[dict, Taxonomy]:
    """``config.json``'s ``moderation`` entry and the taxonomy it names, checked before any
    weights are read."""
    path = directory / "config.json"
    if not path.is_file():
        raise ModelFolderError(
            f"{directory}: no config.json (expected a moderation model folder, "
            "written by `saferlhf task=moderation`)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"{path}: not valid JSON ({one_line(error)})") from error
    spec = config.get("moderation") if isinstance(config, dict) else None
    if not isinstance(spec, dict) or not spec.get("categories"):
        raise ModelFolderError(
            f"{path} has no 'moderation' entry with its categories: "
            "not a moderation model (train one with `saferlhf task=moderation`)"
        )
    taxonomy = _saved_taxonomy(spec, path)
    outputs = config.get("num_labels", len(config.get("id2label", ())))
    if outputs != taxonomy.num_labels:
        raise ModelFolderError(
            f"{path}: {outputs} outputs, but its {taxonomy.num_categories} categories"
            f"{' and 4 severity levels' if taxonomy.has_severity else ''} need "
            f"{taxonomy.num_labels}"
        )
    thresholds, max_length = spec.get("thresholds"), spec.get("max_length")
    if not (
        isinstance(thresholds, list)
        and len(thresholds) == taxonomy.num_categories
        and all(isinstance(t, int | float) and 0.0 <= t <= 1.0 for t in thresholds)
    ):
        raise ModelFolderError(
            f"{path}: moderation.thresholds must be {taxonomy.num_categories} probabilities "
            "in [0, 1], one per category"
        )
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ModelFolderError(
            f"{path}: moderation.max_length must be a positive integer, got {max_length!r}"
        )
    return spec, taxonomy


def _saved_taxonomy(spec: dict, path: Path) -> Taxonomy:
    """The taxonomy a folder was trained on: its category names, and severity levels when
    ``severity_levels`` lists the four (empty for none)."""
    categories, levels = spec["categories"], spec.get("severity_levels")
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise ModelFolderError(f"{path}: moderation.categories must be a list of names")
    if levels not in ([], [SEVERITY_LEVELS[k] for k in range(NUM_SEVERITIES)]):
        raise ModelFolderError(
            f"{path}: moderation.severity_levels must be {list(SEVERITY_LEVELS.values())} or "
            f"[] (no severity head), got {levels!r}"
        )
    try:
        return Taxonomy(str(spec.get("taxonomy", "saved")), tuple(categories), bool(levels))
    except UserError as error:
        raise ModelFolderError(f"{path}: moderation.categories: {error}") from None
