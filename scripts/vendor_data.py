"""Vendor a small, seeded subset of the team's labeled datasets into peers/data/ (run once, output committed).

    python scripts/vendor_data.py ../shared/data peers/data [--bigbench bigbench-1.0.0.tar.gz]

Each dataset becomes ``<name>/train.csv`` and ``<name>/test.csv``: a seeded shuffle, the test rows
first (never trained on by the demo), texts cut to 600 characters (models read 64 tokens anyway).
The attribution and licence lines of ../shared/data/SOURCES.md are copied alongside.

A few more datasets (PACKAGE_SIZES) are read straight from a file inside a package on PyPI. Pass the
downloaded package file to rebuild them too (without it their committed folders are left alone):

    pip download --no-deps -d /tmp/pkgs bigbench==1.0.0
    python scripts/vendor_data.py ../shared/data peers/data --bigbench /tmp/pkgs/bigbench-1.0.0.tar.gz

Those are also deduplicated after the cut (a text that occurs twice is kept once; one with
conflicting labels is dropped, as is one under 3 characters), since they come straight from the
package and not from shared/.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import pandas as pd

SEED = 0
MAX_CHARS = 600
# name: (train rows, test rows)
SIZES = {
    "trec_question_type": (2000, 400),
    "tweet_sentiment": (2000, 400),
    "rotten_tomatoes_snippets": (2000, 400),
    "sms_spam": (2000, 400),
    "epistemic_reasoning_nli": (1500, 400),
    "bbc_news_topic": (1200, 400),
    "health_tweet_source": (2000, 400),
    "spam_assassin_email": (2000, 400),
}

# Datasets read from the sdist of bigbench 1.0.0 on PyPI (Apache-2.0 packaging; licence of each
# dataset's text in BIGBENCH_TASKS), the source of epistemic_reasoning_nli above too.
PACKAGE_SIZES = {
    "vitaminc_fact_verification": (2000, 400),
    "multiemo_product_reviews": (2000, 400),
    "logical_fallacy_detection": (2000, 400),
}
BIGBENCH_VERSION = "1.0.0"
BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks"
# Task prefixes that BIG-bench put in front of the statements of logical_fallacy_detection.
FALLACY_PREFIXES = (
    "This AI is identifying whether statements contain fallacies. "
    "The AI responds with 'Valid' or 'Invalid' as appropriate. ",
    "Do you think the following argument is 'Valid' or 'Invalid'? ",
)
# Rows appended to SOURCES.md for PACKAGE_SIZES (rows and counts: the whole extraction, deduplicated).
PACKAGE_SOURCES = (
    "| vitaminc_fact_verification | bigbench 1.0.0 (Apache-2.0), "
    "bigbench/benchmark_tasks/vitaminc_fact_verification/task.json; VitaminC (Schuster et al., NAACL 2021; "
    "Wikipedia revisions, CC BY-SA 3.0): text = Wikipedia passage, text_pair = claim "
    "| 54648 | 3: true 27232, false 20167, neither 7249 |\n"
    "| multiemo_product_reviews | bigbench 1.0.0 (Apache-2.0), "
    "bigbench/benchmark_tasks/multiemo/products_sentence_en/task.json; MultiEmo (Kocoń et al., ICCS 2021, "
    "CC BY 4.0), Polish product-review sentences machine-translated to English "
    "| 7419 | 4: negative 3425, positive 1827, ambivalent 1475, neutral 692 |\n"
    "| logical_fallacy_detection | bigbench 1.0.0 (Apache-2.0), "
    "bigbench/benchmark_tasks/logical_fallacy_detection/task.json (task prompt prefixes removed) "
    "| 1400 | 2: invalid 747, valid 653 |\n"
)


def _bigbench_examples(archive: Path, task: str) -> list[dict]:
    """The examples of one BIG-bench JSON task, read from the bigbench sdist without unpacking it."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile(f"{BIGBENCH_TASKS}/{task}/task.json")
        assert member is not None, task
        return json.load(member)["examples"]


def _answer(example: dict) -> str:
    """The single choice with the top score of a multiple-choice BIG-bench example."""
    scores = example["target_scores"]
    best = max(scores.values())
    (answer,) = [choice for choice, score in scores.items() if score == best]
    return answer


def vitaminc_fact_verification(archive: Path) -> pd.DataFrame:
    """Fact verification against evidence: bigbench 1.0.0, benchmark_tasks/vitaminc_fact_verification.

    Each input is ``<Wikipedia passage>\\nClaim: <claim>``; the label says whether the passage makes the
    claim true, false, or neither. VitaminC data: CC BY-SA 3.0 (derived from Wikipedia).
    """
    rows = []
    for example in _bigbench_examples(archive, "vitaminc_fact_verification"):
        passage, claim = example["input"].split("\nClaim: ")
        rows.append((passage.strip(), claim.strip(), _answer(example).lower()))
    return pd.DataFrame(rows, columns=["text", "text_pair", "label"])


def multiemo_product_reviews(archive: Path) -> pd.DataFrame:
    """Review-sentence sentiment: bigbench 1.0.0, benchmark_tasks/multiemo/products_sentence_en.

    Sentences of Polish product reviews (machine-translated to English) labelled positive, negative,
    neutral or ambivalent. MultiEmo data: CC BY 4.0.
    """
    examples = _bigbench_examples(archive, "multiemo/products_sentence_en")
    rows = [(example["input"].strip(), _answer(example)) for example in examples]
    return pd.DataFrame(rows, columns=["text", "label"])


def logical_fallacy_detection(archive: Path) -> pd.DataFrame:
    """Argument validity: bigbench 1.0.0, benchmark_tasks/logical_fallacy_detection (Apache-2.0).

    Short arguments, formal syllogisms and informal fallacies, labelled valid or invalid; every argument
    appears twice in the task under two prompt prefixes, which are removed here (and the copies merged).
    """
    rows = []
    for example in _bigbench_examples(archive, "logical_fallacy_detection"):
        text = example["input"]
        for prefix in FALLACY_PREFIXES:
            text = text.removeprefix(prefix)
        rows.append((text.strip(), _answer(example).lower()))
    return pd.DataFrame(rows, columns=["text", "label"])


EXTRACTORS = {
    "vitaminc_fact_verification": vitaminc_fact_verification,
    "multiemo_product_reviews": multiemo_product_reviews,
    "logical_fallacy_detection": logical_fallacy_detection,
}


def _cut(frame: pd.DataFrame) -> pd.DataFrame:
    for column in ("text", "text_pair"):
        if column in frame:
            frame[column] = frame[column].str.slice(0, MAX_CHARS)
    return frame


def _write_split(frame: pd.DataFrame, folder: Path, train_rows: int, test_rows: int) -> None:
    """Seeded shuffle; the first test_rows rows become test.csv, the next train_rows train.csv."""
    frame = frame.sample(frac=1.0, random_state=SEED).reset_index(drop=True)
    folder.mkdir(parents=True, exist_ok=True)
    frame.iloc[:test_rows].to_csv(folder / "test.csv", index=False)
    frame.iloc[test_rows : test_rows + train_rows].to_csv(folder / "train.csv", index=False)
    print(f"{folder.name}: {min(train_rows, len(frame) - test_rows)} train, {test_rows} test")


def deduplicate(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per text (text and text_pair together); texts seen with two labels are dropped, and so
    are texts under 3 characters (MultiEmo has a few empty or one-letter "sentences")."""
    keys = [column for column in ("text", "text_pair") if column in frame]
    frame = frame[frame["text"].str.strip().str.len() >= 3].drop_duplicates()
    return frame[~frame.duplicated(keys, keep=False)].reset_index(drop=True)


def vendor_packages(bigbench: Path, destination: Path) -> None:
    for name, (train_rows, test_rows) in PACKAGE_SIZES.items():
        frame = deduplicate(_cut(EXTRACTORS[name](bigbench)))
        _write_split(frame, destination / name, train_rows, test_rows)


def vendor(source: Path, destination: Path) -> None:
    for name, (train_rows, test_rows) in SIZES.items():
        frame = pd.read_csv(source / f"{name}.csv", dtype=str, keep_default_na=False)
        _write_split(_cut(frame), destination / name, train_rows, test_rows)
    sources = (source / "SOURCES.md").read_text()
    (destination / "SOURCES.md").write_text(
        "# Sources and licences of the bundled data\n\n"
        "Seeded subsets (scripts/vendor_data.py) of the datasets below; texts cut to "
        f"{MAX_CHARS} characters. Each folder holds train.csv and a disjoint test.csv.\n\n"
        + sources.rstrip("\n")
        + "\n"
        + PACKAGE_SOURCES
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder of the shared CSVs and their SOURCES.md")
    parser.add_argument("destination", type=Path, help="peers/data")
    parser.add_argument("--bigbench", type=Path, help=f"bigbench-{BIGBENCH_VERSION}.tar.gz from PyPI")
    arguments = parser.parse_args()
    vendor(arguments.source, arguments.destination)
    if arguments.bigbench is not None:
        vendor_packages(arguments.bigbench, arguments.destination)
