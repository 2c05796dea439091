"""Tiny models and datasets built on the spot, so tests download nothing.

A tiny encoder (2 layers, hidden 32) of a chosen architecture with a word-level WordPiece
tokenizer over a small vocabulary, saved as a Hugging Face folder; and a learnable sentiment-like
dataset whose label is decided by the words in it.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, BertTokenizerFast

POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "dull", "sad"]
NEUTRAL = ["the", "a", "movie", "film", "plot", "actor", "was", "is", "very", "quite", "and", "story", "it"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

ARCHITECTURES = {
    "bert": dict(model_type="bert"),
    "distilbert": dict(model_type="distilbert", dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "roberta": dict(model_type="roberta", type_vocab_size=1, pad_token_id=0, bos_token_id=2, eos_token_id=3),
    "electra": dict(model_type="electra", embedding_size=32),
    "deberta-v2": dict(model_type="deberta-v2", type_vocab_size=0, pooler_hidden_size=32),
}


def vocabulary() -> list[str]:
    return SPECIAL + sorted(set(POSITIVE + NEGATIVE + NEUTRAL))


def build_tiny_model(folder: Path, architecture: str = "bert", seed: int = 0) -> Path:
    """Save a randomly initialised tiny encoder of ``architecture`` with a tokenizer into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={word: index for index, word in enumerate(vocabulary())}, do_lower_case=True)
    options = dict(ARCHITECTURES[architecture])
    model_type = options.pop("model_type")
    common = dict(
        vocab_size=len(vocabulary()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=72,
    )
    config = AutoConfig.for_model(model_type, **{**common, **options})
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentiment_rows(count: int, seed: int = 0, labels: tuple[str, str] = ("negative", "positive")) -> list[dict]:
    """``count`` short texts whose label follows from their sentiment words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        positive = rng.random() < 0.5
        words = [*rng.sample(NEUTRAL, 4), rng.choice(POSITIVE if positive else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": labels[int(positive)]})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
