"""coldfusion-p2p: ColD Fusion (collaborative descent, arXiv 2212.01378) on a hivemind swarm.

Where things live:

- ``config/``         PeerConfig and its sections: schema (every setting, default, help), fields,
                      loading (file, then flags) and validation
- ``data.py``         load_task_data: a dataset file/folder/hub name -> validated splits
- ``model.py``        load any sequence classifier; split_body_head: shared body vs local head
- ``batches.py``      EncodedSplit and the seeded, length-bucketed batch stream
- ``trainer.py``      LocalTrainer: local finetuning, evaluation and the head re-fit, no networking
- ``head_fit.py``     FrozenBody: head-only training on cached body outputs (re-fit, linear probe)
- ``learner.py``      build_learner: one contributor's data, model and trainer from its config
- ``rules.py``        FusionRule: the average -> the next base (mean, outer optimizer, anchor)
- ``aggregation.py``  reducer-side merges of the all-reduce: clipped mean, TIES
- ``fusion.py``       BodyFusion: one all-or-nothing fusion round over hivemind's averager
- ``hivemind_adapter.py``  FusedBodyAverager: every override of hivemind internals (hivemind 1.1.12)
- ``faults.py``       the test-only fault seam, read once at process start
- ``process_safety.py``  forked hivemind children die with their node
- ``records.py``      RunKeys, PeerRecord, RecordBoard: signed, typed DHT records
- ``policy.py``       pure decisions: fusion window, catch-up, weights, the poisoning guard
- ``checkpoints.py``  atomic checkpoints of the fused base, the rule's state and the peer's head
- ``network.py``      start_dht: address checks and clear join errors
- ``auth.py``         Invite, InviteAuthorizer, InviteGate: moderated runs (who may join)
- ``peer.py``         Peer: the daemon composing the pieces
- ``simulate.py``     Simulation: the method in one process (equal to a swarm's fused body)
- ``evaluate.py``     evaluate_bases: the paper's protocol (finetune, linear probe, few-shot)
- ``statistics.py``   paired bootstrap deltas with confidence intervals, verdicts
- ``report.py``       summaries, tables, CSV/JSON and plots of an evaluation
- ``bundled.py``      the bundled contributors (peers/*.toml and peers/data)
- ``console.py``      PeerConsole: progress bars and round summaries
- ``cli.py``          the ``coldfusion-peer`` command

The public API below is imported lazily, so ``coldfusion-peer --help`` stays fast::

    from coldfusion_p2p import Peer, PeerConfig, Simulation, evaluate_bases, load_peer_classifier
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {  # name: module that defines it
    "Peer": "coldfusion_p2p.peer",
    "PeerConfig": "coldfusion_p2p.config",
    "build_config": "coldfusion_p2p.config",
    "LocalTrainer": "coldfusion_p2p.trainer",
    "FusionRule": "coldfusion_p2p.rules",
    "Simulation": "coldfusion_p2p.simulate",
    "evaluate_bases": "coldfusion_p2p.evaluate",
    "load_peer_classifier": "coldfusion_p2p.checkpoints",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'coldfusion_p2p' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
