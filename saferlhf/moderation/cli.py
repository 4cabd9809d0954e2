"""``saferlhf-moderate``: JSONL (prompt, response) lines in, JSONL verdicts out, streamed."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, TextIO, TypeVar

import torch
from transformers.utils import logging as hf_logging

from saferlhf.errors import UserError
from saferlhf.moderation.api import Moderator, Verdict, one_line, unicode_problem

LineT = TypeVar("LineT", bytes, str)

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

DESCRIPTION = """\
Judge (prompt, response) pairs with a moderation model trained by `saferlhf task=moderation`.

Reads JSON Lines from --input (default: stdin), one object per line with string fields
"prompt" and "response" (other fields are ignored), and writes one JSON line per judged
line to --output (default: stdout), in input order:
  {"line": N, "flagged": BOOL, "severity": 0-3, "categories": {NAME: PROBABILITY, ...},
   "truncated": BOOL}
where N is the 1-based input line number, severity 0 safe, 1 minor, 2 moderate, 3 severe,
and categories lists the harm categories over their thresholds, named by the taxonomy the
model was trained on (its config.json). Flagged: severity above --max-severity, or, with
--max-severity 0, also any category over its threshold. A model trained without severity
levels (BeaverTails' taxonomy) writes "severity": null, flags any category over its
threshold and takes only --max-severity 0.

A conversation longer than the model's max_length is "truncated" and judged in several
views, the worst one deciding: the end of the prompt with the response, and the response
alone; a response too long for one view, in overlapping windows. No part of a response, and
no long prompt before it, can hide its harm. stderr ends with how many lines were truncated.

Lines are read, judged and written --batch-size at a time, so memory does not grow with the
input. Blank lines are ignored. A bad line (not UTF-8, not JSON, not an object, a missing or
non-string prompt or response, text that is not valid Unicode such as a lone surrogate, or
any other line the model cannot judge) is reported on stderr with its line number and
skipped; every other line is judged, those in the same batch included.

Exit status: 0 when every line was judged, 1 when some lines were bad (the others are still
judged), 2 for a usage error (bad arguments, a missing input file, a missing or unloadable
model folder: no config.json, a damaged model.safetensors, no tokenizer; a --max-severity
above 0 for a model without a severity head), reported on one line before any input is read;
141 (128 + SIGPIPE, as a shell reports a process killed by it), silently, when the reader of
the output stopped reading, e.g. `| head -1`.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saferlhf-moderate",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="moderation model folder (artifacts/moderation)",
    )
    parser.add_argument(
        "--max-severity",
        type=int,
        choices=range(4),
        default=0,
        metavar="N",
        help="highest severity tolerated, 0-3 (default: 0, flag any harm)",
    )
    parser.add_argument("--input", metavar="FILE", help="JSONL input (default: stdin)")
    parser.add_argument("--output", metavar="FILE", help="JSONL verdicts (default: stdout)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        metavar="B",
        help="lines judged per model call (default: 64)",
    )
    parser.add_argument(
        "--device", help="torch device, e.g. cpu or cuda (default: cuda when available)"
    )
    return parser


def parse_line(line: bytes | str) -> tuple[str, str] | str:
    """``(prompt, response)`` of one JSONL line, or the reason it is bad."""
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
    except UnicodeDecodeError as error:
        return f"not UTF-8 ({error.reason} at byte {error.start})"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg})"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key in ("prompt", "response"):
        if key not in record:
            return f"missing field '{key}'"
        if not isinstance(record[key], str):
            return f"field '{key}' must be a string, got {type(record[key]).__name__}"
        if problem := unicode_problem(record[key]):
            return f"field '{key}' is {problem}"
    return record["prompt"], record["response"]


def batches(lines: Iterable[LineT], size: int) -> Iterator[list[tuple[int, LineT]]]:
    """``size`` (line number, text) pairs at a time, numbered from 1; never the whole input."""
    numbered = enumerate(lines, start=1)
    while batch := list(itertools.islice(numbered, size)):
        yield batch


@dataclass
class StreamCounts:
    judged: int = 0
    bad: int = 0  # reported on stderr and skipped
    truncated: int = 0  # judged, but longer than the model's max_length


def judge_batch(
    moderator: Moderator,
    good: list[tuple[int, str, str]],
    max_severity: int,
    batch_size: int,
) -> list[tuple[int, Verdict | str]]:
    """Each ``(line number, prompt, response)``'s verdict, or why it cannot be judged."""
    prompts, responses = [p for _, p, _ in good], [r for _, _, r in good]
    try:
        verdicts = moderator.moderate(prompts, responses, max_severity, batch_size)
    except Exception:
        # One line can break its whole batch: judged alone, it loses only itself.
        return [(number, judge_line(moderator, p, r, max_severity)) for number, p, r in good]
    return [(number, verdict) for (number, _, _), verdict in zip(good, verdicts, strict=True)]


def judge_line(
    moderator: Moderator, prompt: str, response: str, max_severity: int
) -> Verdict | str:
    """One line's verdict, or why it cannot be judged."""
    try:
        return moderator.moderate([prompt], [response], max_severity)[0]
    except Exception as error:  # the line's text is user input, whatever it breaks
        return f"cannot be judged ({type(error).__name__}: {one_line(error)})"


def moderate_stream(
    moderator: Moderator,
    source: BinaryIO | TextIO,
    sink: IO[str],
    errors: TextIO,
    max_severity: int,
    batch_size: int,
) -> StreamCounts:
    """Judge every good line of ``source`` (bytes or text) into ``sink``, in input order; each
    bad line is reported on ``errors`` with its line number and skipped."""
    counts = StreamCounts()
    for batch in batches(source, batch_size):
        good: list[tuple[int, str, str]] = []
        for number, text in batch:
            if not text.strip():
                continue
            parsed = parse_line(text)
            if isinstance(parsed, str):
                counts.bad += 1
                print(f"line {number}: {parsed}; skipped", file=errors)
            else:
                good.append((number, *parsed))
        if not good:
            continue
        for number, outcome in judge_batch(moderator, good, max_severity, batch_size):
            if isinstance(outcome, str):
                counts.bad += 1
                print(f"line {number}: {outcome}; skipped", file=errors)
                continue
            counts.judged += 1
            counts.truncated += outcome.truncated
            sink.write(json.dumps({"line": number, **outcome.to_dict()}) + "\n")
        sink.flush()
    return counts


def _device_problem(device: str | None) -> str | None:
    """Why ``--device`` cannot be used, or None."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1)"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: CUDA is not available on this machine"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2): report, do not raise
        return int(exit_.code or 0)
    if args.batch_size < 1:
        print(
            f"saferlhf-moderate: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr
        )
        return 2
    if not Path(args.model).is_dir():
        print(f"saferlhf-moderate: --model {args.model}: no such directory", file=sys.stderr)
        return 2
    if args.input and not Path(args.input).is_file():
        print(f"saferlhf-moderate: --input {args.input}: no such file", file=sys.stderr)
        return 2
    if problem := _device_problem(args.device):
        print(f"saferlhf-moderate: {problem}", file=sys.stderr)
        return 2

    # stderr is for bad-line reports and one-line errors
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        moderator = Moderator.from_pretrained(args.model, device=args.device)
    except UserError as error:  # its message names the folder or the file at fault
        print(f"saferlhf-moderate: {error}", file=sys.stderr)
        return 2
    if args.max_severity and not moderator.taxonomy.has_severity:
        print(
            f"saferlhf-moderate: --max-severity {args.max_severity}: {args.model} has no severity "
            f"head (taxonomy {moderator.taxonomy.name}); it flags any category over its "
            "threshold, so only --max-severity 0 applies",
            file=sys.stderr,
        )
        return 2

    try:
        return _moderate(args, moderator)
    except BrokenPipeError:
        # The reader left: stop quietly. Python flushes the standard streams at exit, which
        # would raise again on the closed pipe; /dev/null takes what is left (the Python docs'
        # note on SIGPIPE). Not status 1: here that means bad input lines.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())
        return EXIT_BROKEN_PIPE


def _moderate(args: argparse.Namespace, moderator: Moderator) -> int:
    """Judge the input into the output; the exit status."""
    with contextlib.ExitStack() as stack:
        # Bytes, decoded line by line: an undecodable line is a bad line, not the end of the run.
        if args.input:
            source = stack.enter_context(open(args.input, "rb"))
        else:
            source = getattr(sys.stdin, "buffer", sys.stdin)
        sink = sys.stdout
        if args.output:
            try:
                sink = stack.enter_context(open(args.output, "w", encoding="utf-8"))
            except OSError as error:
                print(f"saferlhf-moderate: --output {args.output}: {error}", file=sys.stderr)
                return 2
        counts = moderate_stream(
            moderator, source, sink, sys.stderr, args.max_severity, args.batch_size
        )
    if counts.truncated:
        print(
            f"saferlhf-moderate: {counts.truncated} of {counts.judged} judged line(s) longer "
            f"than the model's max_length ({moderator.max_length} tokens): judged in several "
            "views, the worst counting",
            file=sys.stderr,
        )
    if counts.bad:
        print(f"saferlhf-moderate: {counts.bad} bad line(s) skipped", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
