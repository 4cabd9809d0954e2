"""One entry per ``task.name``: a function from the run context to a :class:`TaskResult`."""

from saferlhf.tasks.data_report import data_report

TASKS = {"data_report": data_report}
