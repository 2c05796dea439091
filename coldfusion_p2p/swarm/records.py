"""The swarm's shared state in the DHT: run keys, and each peer's signed progress record.

Every peer publishes one :class:`PeerRecord` under ``<prefix>_peers`` with its own public key as
the subkey, refreshed every few seconds with a short expiration, so the set of fresh records *is*
the set of live peers. Records are typed by a strict pydantic schema (``SchemaValidator``) and
signed (``RSASignatureValidator``): the subkey type ``BytesWithPublicKey`` makes an unsigned record
invalid rather than merely unprotected, so no peer can write or overwrite another's record.

Round agreement lives here too: a peer ready to fuse round ``r`` writes ``fuse_at`` (the time it
proposes for the round's all-reduce) into its record; every peer fuses at the earliest proposal
for ``r`` (see :mod:`coldfusion_p2p.swarm.policy`).
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from dataclasses import dataclass
from typing import Literal

from hivemind import DHT
from hivemind.dht.schema import BytesWithPublicKey, RSASignatureValidator, SchemaValidator
from hivemind.utils import ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from pydantic.v1 import BaseModel, StrictBool, StrictFloat, StrictStr, confloat, conint, conlist, constr

Status = Literal["starting", "downloading", "training", "ready", "fusing", "idle", "stopped", "archiving"]
# how a round ended for a peer (its RoundReport and its record's last_outcome): fused in a group; kept its own
# body (alone: nobody to fuse with; failed: the all-reduce broke; rejected: its result failed validation);
# missed (the swarm fused without it) or synced (it downloaded the swarm's fused base instead)
Outcome = Literal["fused", "alone", "failed", "rejected", "missed", "synced"]
ARCHIVER = "archiving"  # the status of a bootstrap node's archiver: not a contributor
MAX_ROUND_MEMBERS = 4096  # peer ids one record may list as a round's members (bounded groups)


@dataclass(frozen=True)
class RunKeys:
    """DHT keys and the averager prefix of one run, derived from any printable run id.

    hivemind forbids dots in averager prefixes and parses group keys with a regex, so the run id is
    reduced to ``[A-Za-z0-9_]`` and suffixed with a hash of the full id (distinct ids never collide).

    >>> RunKeys.from_run_id("my.run/1").prefix
    'cf_my_run_1_...'  # doctest: +SKIP
    """

    run_id: str
    prefix: str

    @classmethod
    def from_run_id(cls, run_id: str) -> RunKeys:
        readable = re.sub(r"[^A-Za-z0-9_]+", "_", run_id).strip("_")[:40] or "run"
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:10]
        return cls(run_id=run_id, prefix=f"cf_{readable}_{digest}")

    def averager_prefix(self, model_fingerprint: str) -> str:
        """Averagers of different models never meet: the model's fingerprint is part of the key."""
        return f"{self.prefix}_body_{model_fingerprint}"

    @property
    def records_key(self) -> str:
        return f"{self.prefix}_peers"

    @property
    def verdicts_key(self) -> str:
        return f"{self.prefix}_verdicts"


class PeerRecord(BaseModel):
    """What a peer tells the swarm about itself; never its data or its head."""

    peer_id: StrictStr  # base58 libp2p peer id, to match records with averaging groups
    dataset_name: constr(strict=True, max_length=128)  # public label chosen by the volunteer
    num_examples: conint(ge=0, strict=True)
    status: Status
    round: conint(ge=0, strict=True)  # the round this peer is working on
    fused_round: conint(ge=0, strict=True)  # the last fused base this peer holds (0 = the original model)
    step: conint(ge=0, strict=True)
    total_steps: conint(ge=0, strict=True)
    train_loss: confloat(strict=True) | None = None
    accuracy_before: confloat(ge=0.0, le=1.0, strict=True) | None = None  # validation accuracy before fusion
    accuracy_after: confloat(ge=0.0, le=1.0, strict=True) | None = None  # ... and after the last fusion
    samples_per_second: confloat(ge=0.0, strict=True) = 0.0
    last_group_size: conint(ge=0, strict=True) = 0
    last_fusion_seconds: confloat(ge=0.0, strict=True) = 0.0
    last_outcome: Outcome | Literal[""] = ""  # "" before the first round
    last_reason: constr(strict=True, max_length=200) = ""  # why the last round did not fuse, if it did not
    last_stages: constr(strict=True, max_length=80) = ""  # bounded groups: each stage's group, e.g. "4✓ 3✗"
    fuse_at: StrictFloat | None = None  # proposed DHT time for the all-reduce of ``round``
    attempt: conint(ge=0, le=1, strict=True) = 0  # 1: ready for or fusing ``round`` a second time (see peer.fuse_round)
    # with bounded groups: the peer ids that fuse ``round``, listed by the peer that closed its window
    fuse_members: conlist(StrictStr, max_items=MAX_ROUND_MEMBERS) | None = None
    body_fingerprint: constr(strict=True, max_length=32) = ""  # short hash of the fused body
    model_fingerprint: constr(strict=True, max_length=32) = ""  # architecture, shapes and starting weights
    version: constr(strict=True, max_length=32) = ""
    invite: constr(strict=True, max_length=4096) = ""  # moderated runs: the run owner's invite of this peer id
    reachability: Literal["public", "relayed", "client", ""] = ""  # see swarm.reachability ("": older versions)
    device: constr(strict=True, max_length=32) = ""  # where it trains and in what precision, e.g. "cuda:0 bf16"
    time: StrictFloat  # DHT time of publication


class Verdict(BaseModel):
    """A group member's word on a finished all-reduce: did every part of *its* view succeed?"""

    peer_id: StrictStr
    round: conint(ge=0, strict=True)
    nonce: constr(strict=True, max_length=32)  # this member's random nonce of the attempt, shared in the group
    ok: StrictBool
    time: StrictFloat
    # a refusal because our own transport lost the attempt (not a rejected or mismatched average):
    # we look again once, so the members it rolled back can too (peer.fuse_round)
    retry: StrictBool = False


VERDICT_HISTORY = 16  # a peer's latest verdicts, all published together: a round's stages each add one


class VerdictLog(BaseModel):
    """A peer's latest verdicts, oldest first. One entry per peer would not do: with bounded groups a
    fast member's next stage would overwrite its verdict on the last one before a slower member of
    that group read it, and the slower one would roll back a stage the others applied."""

    attempts: conlist(Verdict, min_items=1, max_items=VERDICT_HISTORY)


class SwarmSchema(BaseModel):
    peers: dict[BytesWithPublicKey, PeerRecord | None]
    verdicts: dict[BytesWithPublicKey, VerdictLog | None]


def swarm_validators(keys: RunKeys, private_key: RSAPrivateKey | None = None) -> list:
    """Validators every node of a run (peer, bootstrap, monitor) installs on its DHT."""
    return [SchemaValidator(SwarmSchema, prefix=keys.prefix), RSASignatureValidator(private_key)]


class RecordBoard:
    """Publishes this node's record and reads everyone's, over one DHT.

    >>> board = RecordBoard(dht, RunKeys.from_run_id("demo"))
    >>> board.publish(record, ttl=6.0)
    >>> board.fetch()   # {subkey: PeerRecord} of the live peers
    """

    def __init__(self, dht: DHT, keys: RunKeys, private_key: RSAPrivateKey | None = None):
        self.dht, self.keys = dht, keys
        self._verdicts: deque[Verdict] = deque(maxlen=VERDICT_HISTORY)  # ours, published as one VerdictLog
        self.signature_validator = RSASignatureValidator(private_key)
        dht.add_validators([SchemaValidator(SwarmSchema, prefix=keys.prefix), self.signature_validator])

    @property
    def subkey(self) -> bytes:
        return self.signature_validator.local_public_key

    def publish(self, record: PeerRecord, ttl: float) -> bool:
        return bool(
            self.dht.store(
                self.keys.records_key,
                subkey=self.subkey,
                value=record.dict(),
                expiration_time=get_dht_time() + ttl,
            )
        )

    def fetch(self, timeout: float | None = 5.0) -> dict[bytes, PeerRecord]:
        """Fresh, well-formed records by subkey; malformed ones are skipped, never fatal."""
        return self._fetch(self.keys.records_key, PeerRecord, timeout)

    def publish_verdict(self, verdict: Verdict, ttl: float = 120.0) -> bool:
        """Add ``verdict`` to this peer's log and publish the log (its latest verdicts, see :class:`VerdictLog`);
        publishing again on the same attempt (a failed store tried again) replaces its entry."""
        if self._verdicts and self._verdicts[-1].nonce == verdict.nonce:
            self._verdicts.pop()
        self._verdicts.append(verdict)
        log = VerdictLog(attempts=list(self._verdicts))
        return bool(
            self.dht.store(
                self.keys.verdicts_key,
                subkey=self.subkey,
                value=log.dict(),
                expiration_time=get_dht_time() + ttl,
            )
        )

    def fetch_verdicts(self, round_number: int, timeout: float | None = 5.0) -> list[Verdict]:
        """Every verdict on ``round_number`` that the peers' logs hold (a peer may have several: stages)."""
        logs = self._fetch(self.keys.verdicts_key, VerdictLog, timeout).values()
        return [verdict for log in logs for verdict in log.attempts if verdict.round == round_number]

    def _fetch(self, key: str, model: type[BaseModel], timeout: float | None) -> dict:
        future = self.dht.get(key, latest=True, return_future=True)
        try:
            found = future.result(timeout=timeout)
        except Exception:  # a slow DHT must not stop training: no news is an empty board
            return {}
        if found is None or not isinstance(found.value, dict):
            return {}
        parsed = {}
        for subkey, entry in found.value.items():
            if not isinstance(entry, ValueWithExpiration) or entry.value is None:
                continue
            try:
                parsed[subkey] = model.parse_obj(entry.value)
            except ValueError:
                continue
        return parsed
