"""What ``benchmarks/compression_accuracy.py``'s runs mean: deltas against fp32, the noise floor, body distances.

Pure functions of the runs' records, except ``body_distances`` and ``peer_spread``, which read the
peers' last checkpoints from their folders.
"""

from __future__ import annotations

import statistics

N_PEERS = 3  # every run is a 3-peer swarm
GOAL_POINTS = 0.5  # int8 may cost at most this many points of accuracy
NAMES = {"none": "fp32", "fp16": "fp16", "int8": "int8"}  # --compression to run label
ACCURACY_KEYS = ("accuracy_before", "accuracy_after_old_head", "accuracy_after")  # compared per round


def accuracy(run: dict, contributor: str, round_number: int, key: str) -> float | None:
    """One contributor's ``key`` in one round of ``run``; None unless that round fused."""
    for peer in run["peers"]:
        if peer["contributor"] == contributor:
            for row in peer["rounds"]:
                if row["round"] == round_number and row["outcome"] == "fused":
                    return row[key]
    return None


def compare(runs: list[dict], rounds: int) -> dict:
    """Deltas (points) of every run against the first fp32 run, per contributor and round."""
    reference = runs[0]
    contributors = [peer["contributor"] for peer in reference["peers"]]
    table = []
    for contributor in contributors:
        for round_number in range(1, rounds + 1):
            row = {"contributor": contributor, "round": round_number}
            for run in runs:
                for key in ACCURACY_KEYS:
                    value = accuracy(run, contributor, round_number, key)
                    base = accuracy(reference, contributor, round_number, key)
                    row[f"{run['label']}.{key}"] = value
                    row[f"{run['label']}.{key}.delta_points"] = (
                        None if value is None or base is None else 100 * (value - base)
                    )
            table.append(row)
    last = {}
    for run in runs[1:]:
        for key in ("accuracy_after", "accuracy_after_old_head"):
            deltas = [
                row[f"{run['label']}.{key}.delta_points"]
                for row in table
                if row["round"] == rounds and row[f"{run['label']}.{key}.delta_points"] is not None
            ]
            last[f"{run['label']}.{key}"] = {
                "mean_delta_points": statistics.mean(deltas) if len(deltas) == len(contributors) else None,
                "worst_delta_points": min(deltas) if deltas else None,
                "deltas_points": deltas,
            }
    return {"reference": reference["label"], "contributors": contributors, "table": table, "last_round": last}


def noise_floor(runs: list[dict], rounds: int) -> dict:
    """Do the two fp32 runs agree exactly: accuracies in every round, and the last fused body?"""
    fp32 = [run for run in runs if run["compression"] == "none"]
    if len(fp32) < 2:
        return {"identical_accuracies": None, "max_abs_difference_points": float("nan"), "identical_fingerprints": None}
    first, second = fp32[:2]
    differences = []
    for peer in first["peers"]:
        for round_number in range(1, rounds + 1):
            for key in ACCURACY_KEYS:
                a = accuracy(first, peer["contributor"], round_number, key)
                b = accuracy(second, peer["contributor"], round_number, key)
                if a is not None and b is not None:
                    differences.append(abs(100 * (a - b)))
    fingerprints = [
        (peer["last_fingerprint"], other["last_fingerprint"])
        for peer in first["peers"]
        for other in second["peers"]
        if peer["contributor"] == other["contributor"]
    ]
    return {
        "runs": [first["label"], second["label"]],
        "identical_accuracies": bool(differences) and max(differences) == 0.0,
        "max_abs_difference_points": max(differences) if differences else float("nan"),
        "identical_fingerprints": bool(fingerprints) and all(a == b and a is not None for a, b in fingerprints),
        "fingerprints": fingerprints,
    }


def body_distances(runs: list[dict], original: dict) -> list[dict]:
    """How far each run's last fused body lies from the first fp32 run's, per contributor.

    The all-reduce is not bit-reproducible even in fp32 (which peer reduces which part follows the
    random peer ids, so float sums round differently), so fp32 against fp32 is the floor here too.
    ``relative_to_update``: the distance over the fp32 run's own distance from the pretrained body."""
    import torch

    from coldfusion_p2p.contributor.checkpoints import latest_checkpoint, load_body_state

    def body(folder: str) -> dict | None:
        checkpoint = latest_checkpoint(folder)
        return None if checkpoint is None else load_body_state(checkpoint.path)

    reference = {peer["contributor"]: body(peer["folder"]) for peer in runs[0]["peers"]}
    rows = []
    for run in runs[1:]:
        for peer in run["peers"]:
            mine, theirs = body(peer["folder"]), reference.get(peer["contributor"])
            if mine is None or theirs is None:
                continue
            names = [name for name in theirs if name in mine and name in original and theirs[name].is_floating_point()]
            differences = {n: mine[n].float() - theirs[n].float() for n in names}
            difference = torch.cat([d.flatten() for d in differences.values()])
            worst = sorted(names, key=lambda n: -float(differences[n].abs().max()))[:3]
            update = torch.cat([(theirs[n].float() - original[n].float()).flatten() for n in names])
            reference_norm = torch.cat([theirs[n].float().flatten() for n in names]).norm()
            rows.append(
                {
                    "run": run["label"],
                    "contributor": peer["contributor"],
                    "max_abs": float(difference.abs().max()),
                    "relative_l2": float(difference.norm() / reference_norm),
                    "relative_to_update": float(difference.norm() / update.norm()),
                    "worst_tensors": [  # where the bodies differ most, beside the reference tensor's own scale
                        {
                            "name": n,
                            "max_abs": float(differences[n].abs().max()),
                            "reference_abs_max": float(theirs[n].float().abs().max()),
                            "reference_std": float(theirs[n].float().std()),
                        }
                        for n in worst
                    ],
                }
            )
    return rows


def peer_spread(runs: list[dict]) -> list[dict]:
    """Do the peers of one run hold the same fused base? Largest pairwise distances between their last bodies.

    In fp32 they agree to rounding. With a lossy compression each peer adds its own decoded delta to its
    own part, so they can end a fused round on different bodies."""
    import itertools

    import torch

    from coldfusion_p2p.contributor.checkpoints import latest_checkpoint, load_body_state

    rows = []
    for run in runs:
        bodies = []
        for peer in run["peers"]:
            checkpoint = latest_checkpoint(peer["folder"])
            if checkpoint is not None:
                bodies.append(load_body_state(checkpoint.path))
        pairs = []
        for first, second in itertools.combinations(bodies, 2):
            names = [n for n in first if n in second and first[n].is_floating_point()]
            difference = torch.cat([(first[n].float() - second[n].float()).flatten() for n in names])
            pairs.append((float(difference.abs().max()), float(difference.norm())))
        rows.append(
            {
                "run": run["label"],
                "pairs": len(pairs),
                "max_abs": max((pair[0] for pair in pairs), default=None),
                "max_l2": max((pair[1] for pair in pairs), default=None),
            }
        )
    return rows
