"""Harm taxonomies: the categories rows are labelled with and a moderation model predicts.

A run's taxonomy is its ``taxonomy`` config group (``conf/taxonomy/``): ``pku_saferlhf``
(PKU-SafeRLHF's 19 categories with severity levels 0..3, the default), ``beavertails``
(BeaverTails' 14, no severity) or ``file`` (a user's own YAML). Rows are validated against
it, moderation models are trained on it and save it in their ``config.json``, and every metric
name of a category is :func:`category_key` of it. The shipped taxonomies are read from their
YAML files, which are the one place their names are written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from saferlhf import CONF_DIR
from saferlhf.errors import ConfigError

SEVERITY_LEVELS: dict[int, str] = {0: "safe", 1: "minor", 2: "moderate", 3: "severe"}
NUM_SEVERITIES = len(SEVERITY_LEVELS)


def category_key(name: str) -> str:
    """A category name as a metric-name segment: every run of characters other than ASCII
    letters and digits becomes ``_`` (``White-Collar Crime`` -> ``White_Collar_Crime``,
    ``controversial_topics,politics`` -> ``controversial_topics_politics``)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")


@dataclass(frozen=True)
class Taxonomy:
    """Category names in model-output order, and whether rows carry severity levels 0..3."""

    name: str
    categories: tuple[str, ...]
    has_severity: bool

    def __post_init__(self) -> None:
        where = f"taxonomy {self.name!r}"
        if not self.categories:
            raise ConfigError(f"{where}: no categories")
        bad = [c for c in self.categories if not isinstance(c, str) or not category_key(c)]
        if bad:
            raise ConfigError(f"{where}: category names must hold a letter or digit, got {bad}")
        keys: dict[str, str] = {}
        for name in self.categories:
            if category_key(name) in keys:
                raise ConfigError(
                    f"{where}: categories {keys[category_key(name)]!r} and {name!r} share the "
                    f"metric name {category_key(name)!r}; rename one"
                )
            keys[category_key(name)] = name

    @property
    def num_categories(self) -> int:
        return len(self.categories)

    @property
    def num_labels(self) -> int:
        """A moderation model's outputs: one per category, then the severity head if any."""
        return self.num_categories + (NUM_SEVERITIES if self.has_severity else 0)

    def metric_keys(self) -> dict[str, str]:
        """:func:`category_key` -> category name, in category order (shown in reports)."""
        return {category_key(name): name for name in self.categories}


def taxonomy_from_mapping(node: Mapping[str, Any], where: str) -> Taxonomy:
    """A taxonomy from ``name``, ``categories`` and ``severity`` (``where`` names the source)."""
    categories, severity = node.get("categories"), node.get("severity")
    if not isinstance(categories, list | tuple):
        raise ConfigError(f"{where}: 'categories' must be a list of names, got {categories!r}")
    if not isinstance(severity, bool):
        raise ConfigError(f"{where}: 'severity' must be true or false, got {severity!r}")
    name = node.get("name") or Path(where).stem
    repeated = sorted({c for c in categories if list(categories).count(c) > 1})
    if repeated:
        raise ConfigError(f"{where}: categories {repeated} are listed more than once")
    try:
        return Taxonomy(str(name), tuple(categories), severity)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def load_taxonomy(path: str | Path) -> Taxonomy:
    """A taxonomy from a YAML file with ``categories`` and ``severity`` (and optionally
    ``name``, else the file's stem); the shipped ones are ``conf/taxonomy/*.yaml``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"taxonomy.path={str(path)!r}: no such file")
    try:
        node = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise ConfigError(f"{path}: not a readable YAML file ({first_line})") from None
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: expected a mapping with 'categories' and 'severity'")
    return taxonomy_from_mapping(node, str(path))


def taxonomy_from_config(taxonomy_cfg: Mapping[str, Any]) -> Taxonomy:
    """The run's taxonomy from ``cfg.taxonomy``: its ``categories``, or the file at ``path``."""
    if isinstance(taxonomy_cfg, DictConfig):
        taxonomy_cfg = OmegaConf.to_container(taxonomy_cfg, resolve=True)
    path, categories = taxonomy_cfg.get("path"), taxonomy_cfg.get("categories")
    if path and categories is not None:
        raise ConfigError("taxonomy.path and taxonomy.categories are both set: keep one")
    if path:
        return load_taxonomy(path)
    if categories is None:
        raise ConfigError(
            f"taxonomy={taxonomy_cfg.get('name')} needs taxonomy.path: a YAML file with "
            "categories and severity (see conf/taxonomy/file.yaml)"
        )
    return taxonomy_from_mapping(taxonomy_cfg, f"taxonomy={taxonomy_cfg.get('name')}")


PKU_SAFERLHF = load_taxonomy(CONF_DIR / "taxonomy" / "pku_saferlhf.yaml")
BEAVERTAILS = load_taxonomy(CONF_DIR / "taxonomy" / "beavertails.yaml")
