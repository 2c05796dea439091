"""A pure simulator of one fusion round in a large swarm: one group, or bounded groups over stages.

No network and no training: a random vector stands in for each peer's body, and what each peer
holds is tracked as counts over the contributions it has absorbed, so that the fraction of
contributions a peer reached and its distance to the global mean are both exact. Groups come from
:mod:`coldfusion_p2p.swarm.grid` (what the real swarm is to form its groups with; not wired in yet), and each group
is all-or-nothing as in :class:`~coldfusion_p2p.swarm.fusion.BodyFusion`: if one member fails,
every member keeps its stage input.

Failures: each peer fails a round with probability ``failure_probability``, at a stage drawn
uniformly; it breaks its group at that stage and sits out the rest of the round (a crash, or a
link lost). Time and bytes follow the butterfly all-reduce on a shared link model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coldfusion_p2p.swarm.grid import grid_positions, stage_groups, stages_needed


@dataclass(frozen=True)
class LinkModel:
    """Every peer's link: the all-reduce is bound by it (a home uplink, not the core)."""

    bandwidth_mbit: float = 20.0
    latency_ms: float = 50.0
    matchmaking_seconds: float = 1.5  # the leader's wait before a group that is not full starts
    failure_timeout_seconds: float = 20.0  # how long a broken group waits before it rolls back


@dataclass(frozen=True)
class Scenario:
    peers: int
    group_size: int | None  # None: one group of everyone (today's swarm)
    failure_probability: float
    payload_mb: float = 90.9  # all-MiniLM-L6-v2's body in fp32
    link: LinkModel = LinkModel()
    dimensions: int = 32  # of the stand-in bodies: distances do not depend on it beyond noise

    @property
    def stages(self) -> int:
        return 1 if self.group_size is None else stages_needed(self.peers, self.group_size)


@dataclass(frozen=True)
class StageResult:
    stage: int
    groups: int
    failed_groups: int
    distance: float  # mean over live peers of |held - global mean| / RMS |body - global mean|
    reached: float  # mean fraction of all contributions in what a live peer holds
    fused: float  # fraction of live peers holding more than their own contribution
    exact: float  # fraction of live peers that hold the global mean
    seconds: float  # the slowest group of the stage
    megabytes_per_peer: float  # sent this stage (butterfly: 2 (g - 1) / g of the payload), averaged over all peers


def butterfly_seconds(group: int, scenario: Scenario) -> float:
    """A group's all-reduce: ``2 (g - 1) / g * S / rate`` plus a few round trips and the matchmaking."""
    link = scenario.link
    transfer = 2 * (group - 1) / group * scenario.payload_mb * 8 / link.bandwidth_mbit
    return transfer + 4 * link.latency_ms / 1000 + link.matchmaking_seconds


def simulate_round(scenario: Scenario, rng: np.random.Generator, round_number: int = 1) -> list[StageResult]:
    """One round: the results after each stage (see the module's docstring)."""
    n, stages = scenario.peers, scenario.stages
    ids = [f"peer{index:05d}" for index in range(n)]
    index_of = {peer_id: index for index, peer_id in enumerate(ids)}
    bodies = rng.standard_normal((n, scenario.dimensions))
    global_mean = bodies.mean(0)
    spread = float(np.sqrt(((bodies - global_mean) ** 2).sum(1).mean()))
    counts = np.eye(n)  # row i: how much of each contribution peer i holds
    fails = rng.random(n) < scenario.failure_probability
    failing_stage = np.where(fails, rng.integers(0, stages, n), stages)
    positions = {} if scenario.group_size is None else grid_positions(ids, round_number)
    results = []
    for stage in range(stages):
        groups = [ids] if scenario.group_size is None else stage_groups(positions, scenario.group_size, stages, stage)
        live = failing_stage >= stage
        failed_groups, slowest, sent = 0, 0.0, 0.0
        for group in groups:
            members = np.array([index_of[peer_id] for peer_id in group if live[index_of[peer_id]]])
            if len(members) < 2:
                continue
            seconds = butterfly_seconds(len(members), scenario)
            sent += 2 * (len(members) - 1) * scenario.payload_mb  # sent before any rollback: a failed group pays too
            if (failing_stage[members] == stage).any():
                failed_groups += 1
                slowest = max(slowest, seconds + scenario.link.failure_timeout_seconds)
                continue  # all or nothing: every member keeps its stage input
            counts[members] = counts[members].sum(0)
            slowest = max(slowest, seconds)
        alive = failing_stage > stage
        held = counts @ bodies / counts.sum(1, keepdims=True)
        distance = np.sqrt(((held - global_mean) ** 2).sum(1)) / spread
        results.append(
            StageResult(
                stage=stage,
                groups=len(groups),
                failed_groups=failed_groups,
                distance=float(distance[alive].mean()) if alive.any() else float("nan"),
                reached=float((counts[alive] > 0).mean()) if alive.any() else float("nan"),
                fused=float(((counts[alive] > 0).sum(1) > 1).mean()) if alive.any() else float("nan"),
                exact=float((distance[alive] < 1e-9).mean()) if alive.any() else float("nan"),
                seconds=slowest,
                megabytes_per_peer=sent / n,
            )
        )
    return results


@dataclass(frozen=True)
class ScenarioSummary:
    scenario: Scenario
    trials: int
    fused: float  # probability that a peer's round fused (it holds more than its own contribution)
    exact: float  # probability that a peer ends holding the exact global mean
    reached: float  # mean fraction of contributions reached
    distance: float  # mean distance to the global mean at the end
    distance_by_stage: list[float]
    seconds: float  # mean round time
    megabytes_per_peer: float


def summarize(scenario: Scenario, trials: int, seed: int = 0) -> ScenarioSummary:
    """``trials`` independent rounds of ``scenario``, averaged."""
    rng = np.random.default_rng(seed)
    rounds = [simulate_round(scenario, rng, round_number=trial + 1) for trial in range(trials)]
    last = [stages[-1] for stages in rounds]
    return ScenarioSummary(
        scenario=scenario,
        trials=trials,
        fused=float(np.mean([stage.fused for stage in last])),
        exact=float(np.mean([stage.exact for stage in last])),
        reached=float(np.mean([stage.reached for stage in last])),
        distance=float(np.mean([stage.distance for stage in last])),
        distance_by_stage=[float(np.mean([stages[s].distance for stages in rounds])) for s in range(scenario.stages)],
        seconds=float(np.mean([sum(stage.seconds for stage in stages) for stages in rounds])),
        megabytes_per_peer=float(np.mean([sum(stage.megabytes_per_peer for stage in stages) for stages in rounds])),
    )
