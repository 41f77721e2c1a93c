"""Per-round metrics computed from the gathered updates and the aggregate (identical on every rank), and their names.

`METRICS` is the one table of the engine's metric names: their column order in `metrics.csv` and
their W&B panel group (`val/main_acc`, `agg/adversary_weight`, ...). Callback metrics not listed
here follow their prefix (`train_`, `update_`) or land under `client/`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fl_lightning.aggregation import Aggregate
from fl_lightning.types import RoundUpdates

METRICS: dict[str, str] = {
    "round": "", "main_acc": "val", "backdoor_acc": "val", "main_loss": "val",
    "train_loss": "train", "train_loss_benign": "train", "train_loss_adv": "train",
    "update_norm_mean": "update", "update_norm_benign": "update", "update_norm_adv": "update",
    "aggregate_norm": "agg", "adversary_weight": "agg", "adversary_norm_quantile": "agg", "num_adversaries": "agg",
    "rejected_updates": "agg", "detection_tpr": "agg", "detection_fpr": "agg",
    "lr": "train", "train_examples": "train", "seconds": "time", "eval_seconds": "time",
}
"""Metric name -> W&B group, in `metrics.csv` column order (`round` is the W&B step, not a metric)."""
METRIC_COLUMNS = tuple(METRICS)


def wandb_key(metric: str) -> str:
    """W&B panel name of a metric: `val/main_acc`, `train/loss_benign`, `update/norm_adv`, ..."""
    for group in ("train", "update"):  # `train_loss_adv` -> `train/loss_adv`
        if metric.startswith(group + "_"):
            return f"{group}/{metric[len(group) + 1:]}"
    if METRICS.get(metric):
        return f"{METRICS[metric]}/{metric}"
    return f"client/{metric}"


def reject_non_finite(updates: RoundUpdates) -> tuple[RoundUpdates, list[int], Tensor]:
    """Drops updates holding a NaN or an infinity.

    Returns:
        The kept updates, the rejected client ids, and the kept updates' L2 norms `[n_kept]` (CPU)
        for `round_metrics`.
    """
    # One pass over the round's updates serves both: NaN and ±inf propagate into a row's norm, so
    # its norm finds them (an element-wise check would take another pass: 226 ms per EMNIST
    # round); a finite row whose norm overflows float32 (|x| > 1.8e19) is absurd enough to reject too.
    norms = updates.deltas.norm(dim=1).cpu()  # [n]
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return updates, [], norms
    rejected = updates.client_ids[~finite].tolist()
    return updates.select(finite), rejected, norms[finite]


def round_metrics(updates: RoundUpdates, aggregate: Aggregate, num_rejected: int,
                  norms: Tensor | None = None) -> dict[str, float]:
    """Losses, update norms and the weight the aggregator gave to adversaries.

    Benign and adversarial statistics are kept apart (the adversary mask is ground truth known to
    the simulator, used here and nowhere in aggregation). Callback statistics carried in
    `updates.stats` are averaged over the clients that report them. `norms` are the updates' L2
    norms `[n]` when known (`reject_non_finite`'s); None: computed here.
    """
    adv = updates.is_adversary
    if norms is None:
        norms = updates.deltas.norm(dim=1).cpu() if updates.deltas.shape[0] else torch.zeros(0)  # [n]
    metrics: dict[str, float] = {
        "num_adversaries": float(adv.sum()),
        "rejected_updates": float(num_rejected),
        "aggregate_norm": float(aggregate.update.norm()),
        "train_examples": float(updates.num_examples.sum()),  # examples behind the accepted updates
    }
    _mean_into(metrics, "train_loss", updates.losses)
    _mean_into(metrics, "train_loss_benign", updates.losses[~adv])
    _mean_into(metrics, "train_loss_adv", updates.losses[adv])
    _mean_into(metrics, "update_norm_mean", norms)
    _mean_into(metrics, "update_norm_benign", norms[~adv])
    _mean_into(metrics, "update_norm_adv", norms[adv])
    if aggregate.client_weights is not None:
        metrics["adversary_weight"] = float(aggregate.client_weights.cpu()[adv].sum())
    if adv.any() and (~adv).any():
        metrics["adversary_norm_quantile"] = norm_quantile(norms[adv], norms[~adv])
    flagged = aggregate.flagged_mask()
    if flagged is not None:  # detection: the share of attackers' and of honest updates the rule flagged
        _mean_into(metrics, "detection_tpr", flagged[adv].double())
        _mean_into(metrics, "detection_fpr", flagged[~adv].double())
    for key in sorted({k for stats in updates.stats for k in stats}):
        _mean_into(metrics, key, torch.tensor([s[key] for s in updates.stats if key in s], dtype=torch.float64))
    return metrics


def norm_quantile(adversary_norms: Tensor, benign_norms: Tensor) -> float:
    """Where the adversaries' update norms fall among the honest ones: the share of honest norms below each (mean).

    0 means smaller than every honest update, 1 larger than every one; ties count half. Beside
    `adversary_weight` it says whether a norm-based defense could tell the attacker apart.

    Args:
        adversary_norms: `[n_adv]`.
        benign_norms: `[n_benign]`, at least one.
    """
    below = (benign_norms[None, :] < adversary_norms[:, None]).double().mean(dim=1)  # [n_adv]
    ties = (benign_norms[None, :] == adversary_norms[:, None]).double().mean(dim=1)
    return float((below + 0.5 * ties).mean())


def _mean_into(metrics: dict[str, float], key: str, values: Tensor) -> None:
    if values.numel():
        metrics[key] = float(values.double().mean())


def summary_lines(history: list[dict[str, float]]) -> list[str]:
    """A run's before/after in a few lines: the first evaluated round, the last one before the first attacked
    round (when a callback marked rounds `attacked`), and the last evaluated round."""
    evaluated = [row for row in history if row.get("main_acc") is not None]
    if not evaluated:
        return []
    attacked = [int(row["round"]) for row in history if row.get("attacked")]

    def line(row: dict[str, float], what: str) -> str:
        backdoor = f", backdoor {100 * row['backdoor_acc']:.1f} %" if row.get("backdoor_acc") is not None else ""
        return f"round {int(row['round'])} ({what}): main {100 * row['main_acc']:.1f} %{backdoor}"

    lines = [line(evaluated[0], "first measured")]
    if attacked:
        before = [row for row in evaluated if row["round"] < attacked[0]]
        if before and before[-1] is not evaluated[0]:
            lines.append(line(before[-1], "before the first attack"))
        elif before:
            lines[0] = line(before[-1], "before the first attack")
    last = evaluated[-1]
    if last is not evaluated[0]:
        after = sum(r <= last["round"] for r in attacked)
        lines.append(line(last, f"after {after} attacked round{'s' * (after != 1)}" if attacked else "last"))
    return lines
