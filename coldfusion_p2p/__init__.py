"""coldfusion-p2p: ColD Fusion (collaborative descent, arXiv 2212.01378) on a hivemind swarm.

Where things live:

- ``config.py``       PeerConfig and its sections: every setting, default and flag
- ``data.py``         load_task_data: a dataset file/folder/hub name -> validated splits
- ``model.py``        load any sequence classifier; split_body_head: shared body vs local head
- ``trainer.py``      LocalTrainer: local finetuning and evaluation, no networking
- ``fusion.py``       BodyFusion: one all-or-nothing fusion round over hivemind's averager
- ``records.py``      RunKeys, PeerRecord, RecordBoard: signed, typed DHT records
- ``policy.py``       pure decisions: fusion window, catch-up, weights
- ``checkpoints.py``  atomic checkpoints of the fused base and the peer's head
- ``network.py``      start_dht: address checks and clear join errors
- ``auth.py``         Invite, InviteAuthorizer, InviteGate: moderated runs (who may join)
- ``peer.py``         Peer: the daemon composing the pieces
- ``console.py``      PeerConsole: progress bars and round summaries
- ``cli.py``          the ``coldfusion-peer`` command
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
