"""Wall-clock time of the quickstart (``saferlhf``), per stage, as medians over several runs.

    python experiments/time_quickstart.py [--runs 3] [--root DIR] [OVERRIDES ...]

Each run is the whole pipeline from nothing, in its own run dir under ROOT (so no stage is
reused), one after another; nothing else should run meanwhile. The stages' own times come from
each run's ``timeline.json``. Prints, and writes to ``experiments/results/quickstart_timing.json``
(``--out``), the median and range over runs of the whole command's wall time and of every
stage's time. Single runs on a shared machine vary by tens of seconds a stage, hence medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(walls: Sequence[float], timelines: Sequence[list[dict]]) -> dict:
    """The median and range of the wall times and of each stage's time over the runs (stages
    in the order they ran in the first run; a stage reused in a run has no time there)."""
    stages: dict[str, list[float]] = {}
    for timeline in timelines:
        for entry in timeline:
            if not entry.get("reused"):
                stages.setdefault(entry["stage"], []).append(entry["end"] - entry["start"])
    return {
        "runs": len(walls),
        "wall_s": spread(walls),
        "stages_s": {stage: spread(times) for stage, times in stages.items()},
    }


def run_once(command: Sequence[str], run_dir: Path) -> tuple[float, list[dict]]:
    started = time.monotonic()
    result = subprocess.run([*command, f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    wall = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed in {run_dir}:\n{result.stderr[-3000:]}")
    return wall, json.loads((run_dir / "timeline.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--root", type=Path, default=Path("outputs/quickstart_timing"), help="the runs' dirs"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "quickstart_timing.json")
    args, overrides = parser.parse_known_args()
    saferlhf = shutil.which("saferlhf") or sys.exit("the saferlhf command is not installed")
    command = [saferlhf, *overrides]
    walls, timelines = [], []
    for index in range(args.runs):
        run_dir = args.root / f"run{index}"
        if run_dir.exists():
            sys.exit(f"{run_dir} exists: a run there would reuse its stages; pick another --root")
        wall, timeline = run_once(command, run_dir)
        walls.append(wall)
        timelines.append(timeline)
        print(f"run {index}: {wall:.0f} s", flush=True)
    summary = summarize(walls, timelines) | {"command": command[1:]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'':16} {'median':>7} {'min':>6} {'max':>6}  (seconds, {args.runs} runs)")
    rows = [("whole command", summary["wall_s"]), *summary["stages_s"].items()]
    for name, times in rows:
        print(f"{name:16} {times['median']:7.0f} {times['min']:6.0f} {times['max']:6.0f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
