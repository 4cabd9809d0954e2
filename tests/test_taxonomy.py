"""Harm taxonomies: the shipped ones, a user's own from a file, and metric keys."""

import json

import pytest

from saferlhf.errors import ConfigError
from saferlhf.taxonomy import (
    BEAVERTAILS,
    PKU_SAFERLHF,
    Taxonomy,
    category_key,
    load_taxonomy,
    taxonomy_from_config,
)

BEAVERTAILS_NAMES = [
    "animal_abuse",
    "child_abuse",
    "controversial_topics,politics",
    "discrimination,stereotype,injustice",
    "drug_abuse,weapons,banned_substance",
    "financial_crime,property_crime,theft",
    "hate_speech,offensive_language",
    "misinformation_regarding_ethics,laws_and_safety",
    "non_violent_unethical_behavior",
    "privacy_violation",
    "self_harm",
    "sexually_explicit,adult_content",
    "terrorism,organized_crime",
    "violence,aiding_and_abetting,incitement",
]


def test_shipped_taxonomies():
    assert PKU_SAFERLHF.num_categories == 19 and PKU_SAFERLHF.has_severity
    assert PKU_SAFERLHF.categories[0] == "Endangering National Security"
    assert PKU_SAFERLHF.categories[-1] == "Animal Abuse"
    assert PKU_SAFERLHF.num_labels == 19 + 4
    assert list(BEAVERTAILS.categories) == BEAVERTAILS_NAMES
    assert not BEAVERTAILS.has_severity and BEAVERTAILS.num_labels == 14


def test_category_key_is_one_spelling_for_every_metric():
    assert category_key("White-Collar Crime") == "White_Collar_Crime"
    assert category_key("controversial_topics,politics") == "controversial_topics_politics"
    assert category_key(" Drugs ") == "Drugs"
    for taxonomy in (PKU_SAFERLHF, BEAVERTAILS):
        keys = taxonomy.metric_keys()
        assert list(keys.values()) == list(taxonomy.categories)  # distinct, in order
        assert all(key.replace("_", "").isalnum() for key in keys)


@pytest.mark.parametrize("name", ["pku_saferlhf", "beavertails"])
def test_config_group_selects_a_shipped_taxonomy(compose_cfg, name):
    cfg = compose_cfg(f"taxonomy={name}")
    expected = {"pku_saferlhf": PKU_SAFERLHF, "beavertails": BEAVERTAILS}[name]
    assert taxonomy_from_config(cfg.taxonomy) == expected


def test_default_taxonomy_is_pku_saferlhf(compose_cfg):
    assert taxonomy_from_config(compose_cfg().taxonomy) == PKU_SAFERLHF


def test_own_taxonomy_from_a_file(compose_cfg, tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_text("name: lab\nseverity: false\ncategories: [fraud, self-harm, spam]\n")
    cfg = compose_cfg("taxonomy=file", f"taxonomy.path={path}")
    assert taxonomy_from_config(cfg.taxonomy) == Taxonomy(
        "lab", ("fraud", "self-harm", "spam"), False
    )
    path.write_text("severity: true\ncategories: [fraud]\n")  # no name: the file's stem
    assert load_taxonomy(path).name == "lab"


def test_taxonomy_file_without_path_names_the_key(compose_cfg):
    with pytest.raises(ConfigError, match=r"taxonomy=file needs taxonomy.path"):
        taxonomy_from_config(compose_cfg("taxonomy=file").taxonomy)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "severity: false\ncategories: [a, b, a]\n",
            r"lab.yaml: categories \['a'\] are listed more",
        ),
        (
            "severity: false\ncategories: [a-b, a b]\n",
            r"'a-b' and 'a b' share the metric name 'a_b'",
        ),
        ("severity: false\ncategories: []\n", r"lab.yaml: taxonomy 'lab': no categories"),
        ("severity: maybe\ncategories: [a]\n", r"lab.yaml: 'severity' must be true or false"),
        ("severity: true\ncategories: fraud\n", r"lab.yaml: 'categories' must be a list"),
        ("severity: true\ncategories: [--]\n", r"must hold a letter or digit, got \['--'\]"),
        ("categories: [a\n", r"lab.yaml: not a readable YAML file"),
        ("- a\n- b\n", r"lab.yaml: expected a mapping"),
    ],
)
def test_bad_taxonomy_file_is_named(tmp_path, text, message):
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_taxonomy(path)


def test_missing_taxonomy_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"taxonomy.path='.*nowhere.yaml': no such file"):
        load_taxonomy(tmp_path / "nowhere.yaml")


def test_data_report_counts_beavertails_categories(compose_cfg, tmp_path):
    from saferlhf.cli import run
    from tests.beavertails_rows import beavertails_row

    rows = [beavertails_row(prompt=f"q{i} ?", flagged=("self_harm",) * (i % 2)) for i in range(8)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = compose_cfg(
        "task=data_report",
        "logger=none",
        "data=beavertails",
        f"data.path={tmp_path / 'rows.jsonl'}",
    )
    run(cfg, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    harm = [report["splits"][split]["harm"] for split in ("train", "test")]
    assert sum(h["responses"] for h in harm) == 8 and sum(h["unsafe"] for h in harm) == 4
    assert list(harm[0]["category"]) == list(BEAVERTAILS.categories)  # no severity: by category
    assert sum(h["category"]["self_harm"] for h in harm) == 4 and "severity" not in harm[0]
    assert (tmp_path / "run" / "data_report.png").read_bytes()[:4] == b"\x89PNG"
