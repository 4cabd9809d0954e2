"""One entry per ``task.name``: a function from the run context to a :class:`TaskResult`."""

from saferlhf.tasks.data_report import data_report
from saferlhf.tasks.evaluate_score import evaluate_score
from saferlhf.tasks.score import score_task

TASKS = {
    "data_report": data_report,
    "reward": score_task,
    "cost": score_task,
    "evaluate_score": evaluate_score,
}
