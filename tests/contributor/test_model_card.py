"""Model cards of fused bases: Hugging Face metadata the Hub's parser reads, and the round's facts."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from coldfusion_p2p.contributor.model import bundled_model_path
from coldfusion_p2p.contributor.model_card import (
    BUNDLED_HUB_ID,
    BaseFacts,
    Contributor,
    add_evaluation,
    card_license,
    hub_base_model,
    write_model_card,
)

GROUP = [
    Contributor("sms-spam", 4000, "cc-by-4.0", 0.97, 0.985),
    Contributor("trec", 4800, "cc-by-4.0"),
]


def test_a_card_carries_hub_metadata_and_the_rounds_contributors(tmp_path):
    fusion = {"rule": "outer_lr=1,momentum=0,anchor=0", "compression": "fp16"}
    facts = BaseFacts(3, bundled_model_path(), 2, GROUP, fusion)
    path = write_model_card(tmp_path, facts)
    card = ModelCard.load(path)  # what the Hub and huggingface_hub read
    assert card.data.library_name == "transformers"
    assert card.data.base_model == BUNDLED_HUB_ID and card.data.license == "cc-by-4.0"
    assert {"coldfusion-p2p", "cold-fusion"} <= set(card.data.tags)
    assert "# ColD Fusion base, round 3" in card.text and "fused by a group of 2" in card.text
    assert "| sms-spam | 4000 | cc-by-4.0 | 97.0% | 98.5% |" in card.text
    assert "| trec | 4800 | cc-by-4.0 |  |  |" in card.text  # another member's metrics: not known here
    assert "compression fp16" in card.text


def test_a_downloaded_base_says_its_group_is_not_known_here(tmp_path):
    card = ModelCard.load(write_model_card(tmp_path, BaseFacts(2, "org/some-model", 3, [])))
    assert card.data.base_model == "org/some-model" and card.data.license == "other"
    assert "this node did not see" in card.text


@pytest.mark.parametrize(
    ("licenses", "expected"),
    [
        (["mit", "MIT "], "mit"),
        (["mit", "apache-2.0"], "other"),
        (["mit", None], "other"),  # one contributor declared nothing: nobody can name a licence for all
        ([], "other"),
    ],
)
def test_the_card_names_a_licence_only_when_every_contributor_declared_the_same(licenses, expected):
    assert card_license(licenses) == expected


def test_base_model_metadata_is_a_hub_id_never_a_local_path(tmp_path):
    bundled = bundled_model_path()
    assert hub_base_model(bundled, bundled) == BUNDLED_HUB_ID
    assert hub_base_model(str(tmp_path), bundled) is None
    assert hub_base_model("roberta-base", bundled) == "roberta-base"


def test_an_evaluation_goes_into_the_card_once_and_the_card_still_parses(tmp_path):
    write_model_card(tmp_path, BaseFacts(1, "org/some-model", 2, GROUP))
    add_evaluation(tmp_path, "| dataset | accuracy |\n|---|---|\n| old | 1% |")
    add_evaluation(tmp_path, "| dataset | accuracy |\n|---|---|\n| bbc | 90.0% |")  # a later evaluation replaces it
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "org/some-model" and card.text.count("## Evaluation") == 1
    assert "| bbc | 90.0% |" in card.text and "| old |" not in card.text and "| sms-spam |" in card.text
    assert not list(tmp_path.glob(".*.tmp")), "the temporary card was left behind"
