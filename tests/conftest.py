"""Offline, single-threaded, hermetic: no test touches the network or the user's caches."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Subprocesses too: two busy torch thread pools on two shared cores slow each other tenfold.
os.environ["OMP_NUM_THREADS"] = "1"
# datasets reads its cache location at import: set it before anything imports datasets.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="saferlhf-tests-datasets-")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from saferlhf import CONF_DIR  # noqa: E402
from saferlhf.config import register_configs  # noqa: E402


@pytest.fixture
def compose_cfg():
    """Compose the real config tree with shell-style overrides."""
    register_configs()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose
