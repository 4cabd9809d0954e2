"""saferlhf: Safe RLHF and PKU-SafeRLHF as a Hydra-configured experiment framework."""

from pathlib import Path

CONF_DIR = Path(__file__).parent / "conf"
