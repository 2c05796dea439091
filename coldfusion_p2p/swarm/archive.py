"""The archive of the swarm's fused bases, kept by a bootstrap node.

The archiver watches the peers' records; when the swarm's fused round moves forward it downloads
that round's fused body from a peer (hivemind state sharing, which serves the last *fused*
snapshot, never a half-trained body), checks the round and shapes, and writes ``round_NNNNN/``:
a Hugging Face model folder plus ``metadata.json`` (contributors, their public dataset names and
metrics, the fusion rule) and, with an outer momentum, the rule's state that goes with the base
(``fusion_state.safetensors``, as in a peer's checkpoint). Writes are atomic and ``latest`` points
at the newest complete round. Optionally each round is pushed to the Hugging Face Hub; a failed
push is a warning, never a crash.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivemind import DHT
from hivemind.utils import get_dht_time
from safetensors.torch import save_file

from coldfusion_p2p import __version__
from coldfusion_p2p.config import FusionConfig
from coldfusion_p2p.contributor.checkpoints import (
    FUSION_STATE_FILE,
    atomic_folder,
    ensure_writable_dir,
    point_latest,
    prune_rounds,
    round_dir_name,
    save_body_folder,
)
from coldfusion_p2p.contributor.model import (
    body_fingerprint,
    body_parameters,
    body_state_names,
    copy_into,
    keep_local,
    load_classifier,
    load_tokenizer,
    model_fingerprint,
    resolve_model_name,
)
from coldfusion_p2p.contributor.model_card import CARD_FILE, BaseFacts, Contributor, write_model_card
from coldfusion_p2p.swarm import policy
from coldfusion_p2p.swarm.auth import Moderation
from coldfusion_p2p.swarm.fusion import download_fused
from coldfusion_p2p.swarm.hivemind_adapter import FusedBodyAverager
from coldfusion_p2p.swarm.policy import PLAIN_MEAN_RULE
from coldfusion_p2p.swarm.records import ARCHIVER, PeerRecord, RecordBoard, RunKeys

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
RECORD_TTL = 10.0  # seconds an archiver record outlives its last refresh


@dataclass(frozen=True)
class ArchivedRound:
    round: int
    path: Path
    metadata: dict[str, Any]


class RoundArchiver:
    """Follows a run and archives each new fused base.

    >>> archiver = RoundArchiver(dht, keys, archive_dir="archive/", model_name=None)
    >>> archiver.poll()     # archives the swarm's newest fused round if it is new; returns it or None
    """

    def __init__(
        self,
        dht: DHT,
        keys: RunKeys,
        *,
        archive_dir: str | Path,
        model_name: str | None,
        local_modules: list[str] | tuple[str, ...] = (),
        keep: int | None = None,
        push_to_hub: str | None = None,
        download_timeout: float = 120.0,
        board: RecordBoard | None = None,
        moderation: Moderation | None = None,
    ):
        self.archive_dir = Path(archive_dir)
        self.invite = moderation.invite.encode() if moderation is not None else ""  # peers check it before serving
        ensure_writable_dir(self.archive_dir, "--archive-dir")
        self.keys, self.keep, self.push_to_hub = keys, keep, push_to_hub
        self.download_timeout = download_timeout
        self.board = board or RecordBoard(dht, keys)
        self.model_name = resolve_model_name(model_name)
        self.tokenizer = load_tokenizer(self.model_name)
        self.model = load_classifier(self.model_name, ["0", "1"], seed=0)  # the head is never archived
        if local_modules:
            keep_local(self.model, local_modules)
        self.body = body_parameters(self.model)
        self.model_fingerprint = model_fingerprint(self.model)
        # client mode: downloads state, never joins a group or serves a body of its own
        self.averager = FusedBodyAverager(
            self.body,
            dht,
            prefix=keys.averager_prefix(self.model_fingerprint),
            config=FusionConfig(next_chunk_timeout=min(30.0, download_timeout)),
            client_mode=True,
        )
        self.last_round = self._archived_round()
        self._warned = False
        self.publish_progress()

    def publish_progress(self) -> None:
        """Tell the swarm which round the archive holds, so leaving peers can wait for it."""
        record = PeerRecord(
            peer_id=self.averager.peer_id.to_base58(),
            dataset_name="archive",
            num_examples=0,
            status=ARCHIVER,
            round=0,
            fused_round=self.last_round,
            step=0,
            total_steps=0,
            version=__version__,
            invite=self.invite,
            time=get_dht_time(),
        )
        try:
            self.board.publish(record, ttl=RECORD_TTL)
        except Exception as error:  # the next poll publishes again
            logger.debug("publishing the archiver record failed: %r", error)

    def _archived_round(self) -> int:
        rounds = sorted(self.archive_dir.glob("round_[0-9]*"))
        return int(rounds[-1].name.split("_")[1]) if rounds else 0

    def poll(self) -> ArchivedRound | None:
        """Archive the swarm's newest fused round if it is newer than the archive's; None otherwise."""
        self.publish_progress()
        records = [record for record in self.board.fetch().values() if record.status != ARCHIVER]
        if policy.incompatible_swarm(records, self.model_fingerprint) is not None and not self._warned:
            self._warned = True
            logger.warning(
                "the swarm fuses another model than --base-model %s: nothing can be archived", self.model_name
            )
        target = max((record.fused_round for record in records), default=0)
        if target <= self.last_round:
            return None
        state = download_fused(self.averager, target, self.body, self.download_timeout)
        if state is None:
            return None
        archived = self._store(state.round, state.tensors, state.source, records, state.state)
        self.publish_progress()
        return archived

    def _store(
        self, round_number: int, tensors: list, source: dict, records: list[PeerRecord], state: list = ()
    ) -> ArchivedRound:
        copy_into(self.body, tensors)
        metadata = archive_metadata(round_number, source, records, body_fingerprint(self.body))
        final = self.archive_dir / round_dir_name(round_number)
        with atomic_folder(final) as folder:
            save_body_folder(self.model, self.tokenizer, folder)
            if state:
                names = body_state_names(self.model)
                save_file(
                    {name: tensor.contiguous() for name, tensor in zip(names, state, strict=True)},
                    folder / FUSION_STATE_FILE,
                )
            (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
            write_model_card(folder, archive_card(metadata, self.model_name, source))
        point_latest(self.archive_dir, final)
        prune_rounds(self.archive_dir, self.keep, protect=final)
        self.last_round = round_number
        if self.push_to_hub:
            self._push(final, round_number)
        return ArchivedRound(round_number, final, metadata)

    def _push(self, folder: Path, round_number: int) -> None:
        try:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(self.push_to_hub, exist_ok=True)
            api.upload_folder(
                repo_id=self.push_to_hub,
                folder_path=str(folder),
                path_in_repo=folder.name,
                commit_message=f"ColD Fusion round {round_number}",
            )
            api.upload_file(  # the repo's own card is the newest round's: what the Hub shows
                path_or_fileobj=str(folder / CARD_FILE),
                path_in_repo=CARD_FILE,
                repo_id=self.push_to_hub,
                commit_message=f"Model card of round {round_number}",
            )
        except Exception as error:  # offline, no token, no such repo...: the local archive is what matters
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            logger.warning(
                "could not push round %d to the Hub repo %s (%s); the local archive is unaffected",
                round_number,
                self.push_to_hub,
                reason[:200],
            )

    def shutdown(self) -> None:
        if self.averager.is_alive():
            self.averager.shutdown()


def archive_card(metadata: dict[str, Any], model_name: str, source: dict) -> BaseFacts:
    """The model card's facts for an archived round, from its metadata and the group's gathered info."""
    contributors = [
        Contributor(
            dataset=str(row.get("dataset_name") or "unnamed"),
            examples=row.get("num_examples"),
            license=row.get("license"),
            accuracy_before=row.get("accuracy_before"),
            accuracy_after=row.get("accuracy_after"),
        )
        for row in metadata["contributors"]
    ]
    members = list((source.get("members") or {}).values())
    fusion = {"rule": metadata["fusion_rule"]}
    if members:
        fusion["aggregation"] = members[0].get("aggregation", "mean")
    return BaseFacts(metadata["round"], model_name, int(metadata["group_size"] or 1), contributors, fusion)


def archive_metadata(round_number: int, source: dict, records: list[PeerRecord], fingerprint: str) -> dict[str, Any]:
    """Who contributed to a round: the group from the fused snapshot, their public labels and metrics."""
    by_peer = {record.peer_id: record for record in records}
    members = source.get("members") or {}
    peer_ids = list(source.get("peer_ids") or members)
    contributors = []
    for peer_id in peer_ids:
        record = by_peer.get(peer_id)
        gathered = members.get(peer_id, {})
        contributors.append(
            {
                "peer_id": peer_id,
                "dataset_name": gathered.get("dataset") or (record.dataset_name if record else None),
                "num_examples": gathered.get("examples") or (record.num_examples if record else None),
                "license": gathered.get("license"),
                "accuracy_before": record.accuracy_before if record else None,
                "accuracy_after": record.accuracy_after if record else None,
            }
        )
    return {
        "round": round_number,
        "group_size": source.get("group_size", len(peer_ids)),
        "contributors": contributors,
        "fingerprint": fingerprint,
        "fusion_rule": source.get("fusion_rule", PLAIN_MEAN_RULE),
        "archived_at": time.time(),
    }
