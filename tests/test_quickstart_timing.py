"""The aggregation behind experiments/time_quickstart.py: medians and ranges over runs."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "experiments" / "time_quickstart.py"
spec = importlib.util.spec_from_file_location("time_quickstart", SCRIPT)
timing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(timing)


def test_stage_times_are_medians_over_runs_and_reused_stages_are_left_out():
    timelines = [
        [{"stage": "sft", "start": 0, "end": 100}, {"stage": "ppo", "start": 100, "end": 130}],
        [{"stage": "sft", "start": 0, "end": 90}, {"stage": "ppo", "start": 90, "end": 150}],
        [{"stage": "sft", "reused": True}, {"stage": "ppo", "start": 1, "end": 41}],
    ]
    summary = timing.summarize([140.0, 160.0, 50.0], timelines)
    assert summary["runs"] == 3
    assert summary["wall_s"] == {"median": 140.0, "min": 50.0, "max": 160.0}
    assert summary["stages_s"]["sft"] == {"median": 95.0, "min": 90, "max": 100}
    assert summary["stages_s"]["ppo"] == {"median": 40, "min": 30, "max": 60}
    assert list(summary["stages_s"]) == ["sft", "ppo"]
