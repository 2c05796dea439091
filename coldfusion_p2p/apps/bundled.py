"""The bundled contributors: ready peer configs ``peers/<name>.toml`` with their data in ``peers/data``.

The demo, the simulator and the quality benchmark pick their contributors and unseen datasets
from here, by name or by a peer config file of the user's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coldfusion_p2p.errors import UserError

BUNDLED_PEERS = Path(__file__).resolve().parents[2] / "peers"
CONTRIBUTORS = ("trec_question_type", "tweet_sentiment", "rotten_tomatoes_snippets", "sms_spam")
UNSEEN = ("bbc_news_topic", "health_tweet_source")


@dataclass
class Contributor:
    name: str  # folder of bundled data (e.g. trec_question_type), or the stem of a user's peer config
    config_path: Path
    data_dir: Path  # holds train.csv and test.csv (bundled contributors)


def bundled_names() -> list[str]:
    return sorted(path.stem for path in BUNDLED_PEERS.glob("*.toml"))


def resolve_contributors(names: list[str] | tuple[str, ...], minimum: int = 2) -> list[Contributor]:
    """Each name is a bundled peer (``trec_question_type``) or a path to a peer ``.toml``."""
    contributors = []
    for name in names or CONTRIBUTORS:
        path = Path(name).expanduser()
        if path.suffix == ".toml":
            if not path.is_file():
                raise UserError(f"peer config {path} does not exist", "check the path")
            contributors.append(Contributor(path.stem, path, path.parent))
            continue
        config_path = BUNDLED_PEERS / f"{name}.toml"
        if not config_path.is_file():
            raise UserError(f"no bundled peer named {name!r}", f"use one of: {', '.join(bundled_names())}")
        contributors.append(Contributor(name, config_path, BUNDLED_PEERS / "data" / name))
    if len(contributors) < minimum:
        raise UserError("a swarm needs at least two contributors", "pass --contributors with two or more names")
    return contributors
