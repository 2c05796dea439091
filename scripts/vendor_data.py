"""Vendor a small, seeded subset of the team's labeled datasets into peers/data/ (run once, output committed).

    python scripts/vendor_data.py ../shared/data peers/data

Each dataset becomes ``<name>/train.csv`` and ``<name>/test.csv``: a seeded shuffle, the test rows
first (never trained on by the demo), texts cut to 600 characters (models read 64 tokens anyway).
The attribution and licence lines of ../shared/data/SOURCES.md are copied alongside.
"""

from __future__ import annotations

import sys
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
}


def vendor(source: Path, destination: Path) -> None:
    for name, (train_rows, test_rows) in SIZES.items():
        frame = pd.read_csv(source / f"{name}.csv", dtype=str, keep_default_na=False)
        frame = frame.sample(frac=1.0, random_state=SEED).reset_index(drop=True)
        for column in ("text", "text_pair"):
            if column in frame:
                frame[column] = frame[column].str.slice(0, MAX_CHARS)
        folder = destination / name
        folder.mkdir(parents=True, exist_ok=True)
        frame.iloc[:test_rows].to_csv(folder / "test.csv", index=False)
        frame.iloc[test_rows : test_rows + train_rows].to_csv(folder / "train.csv", index=False)
        print(f"{name}: {min(train_rows, len(frame) - test_rows)} train, {test_rows} test")
    sources = (source / "SOURCES.md").read_text()
    (destination / "SOURCES.md").write_text(
        "# Sources and licences of the bundled data\n\n"
        "Seeded subsets (scripts/vendor_data.py) of the datasets below; texts cut to "
        f"{MAX_CHARS} characters. Each folder holds train.csv and a disjoint test.csv.\n\n" + sources
    )


if __name__ == "__main__":
    vendor(Path(sys.argv[1]), Path(sys.argv[2]))
