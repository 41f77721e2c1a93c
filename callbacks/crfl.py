"""CRFL: clipping and noising the global model in training, parameter smoothing and a certified radius at test time.

Paper: Xie, Chen, Chen and Li, "CRFL: Certifiably Robust Federated Learning against Backdoor Attacks",
ICML 2021 (arXiv:2106.08283). Reference code: github.com/AI-secure/CRFL (`main.py`, `certify_*.py`).

Training, each round t (Algorithm 1), after the inner aggregation (FedAvg in the paper) gave the step `u`:

1. The new global model `w' = w_t + u`, `[n_params]`.
2. Clipping of the whole model: `w' <- w' / max(1, |w'| / ρ_t)`, with the bound growing over the rounds
   `ρ_t = min(ρ_max, b + a t)` (the reference's `dynamic_thres` capped by `param_clip_thres`).
3. Noise: `w_{t+1} = w' + ε_t`, `ε_t ~ N(0, σ_t^2 I)`.

Through `Aggregate`: `update = clip(w_t + u) - w_t` and `noise = σ ε` (a draw of the round's CPU generator,
so every rank and device draws the same), which the orchestrator adds after the step.

Test time (Algorithm 2, "parameter smoothing"): the smoothed classifier predicts for an input x the class
most of the M models `w_T + ε_m`, `ε_m ~ N(0, σ_T^2 I)`, predict (`smoothed_vote`). `p_A` is a lower
confidence bound on the probability of that class, `p_B = 1 - p_A` an upper bound on any other's
(`certify`). The paper's certification (its main theorem, Section 4) chains three steps: the smoothed
prediction cannot change while `KL(P_T || P'_T) < -ln(1 - (√p_A - √p_B)^2)` (the Hellinger / KL
condition); every later clip-and-noise round multiplies the KL of the models by at most
`2 Φ(ρ_t / σ_t) - 1`; and at the attack round t_adv the R attackers (aggregation weights p_i, scale γ_i,
τ_i local steps of learning rate η_i, a share q_Bi / n_Bi of poisoned examples per batch, a loss whose
input gradient is L_Z-Lipschitz) move the model by at most `sqrt(R Σ_i (p_i γ_i τ_i η_i L_Z q_Bi / n_Bi)^2)`
times the backdoor pattern's magnitude `|δ|`. The prediction of x is certified for every `|δ|` below

    RAD = sqrt( -ln(1 - (√p_A - √p_B)^2) σ_{t_adv}^2
                / ( 2 R Σ_i (p_i γ_i τ_i η_i L_Z q_Bi / n_Bi)^2
                    Π_{t=t_adv+1}^{T-1} (2 Φ(ρ_t / σ_t) - 1) (2 Φ(ρ_T / σ_T) - 1) ) )

(`certified_radius`; the reference's `cal_prob_bound` evaluates the same expression, with equal γ, τ, η
and q / n for all attackers, as here).

Defaults, from the reference configs (`configs/*_params.yaml`, `main.py`, `configs/*_smooth_params.yaml`):
the MNIST ones, ρ_t = min(15, 2 + 0.1 t) (EMNIST: min(100, 4 + 0.25 t); LOAN: min(5, 2 + 0.025 t)),
σ_t = 0.01 on every dataset; at test time σ_T = 0.01, M = 1000 and α = 0.001. The paper's experiments
attack with R = 1 or 2, γ = 10 (EMNIST, LOAN) or 100 (MNIST), 5 poisoned examples in a batch of 100.

Deviations:
    - Clipping acts on the trainable parameters (the flat vector every rule sees); the reference clips
      `named_parameters()` as well, and adds its noise to the whole `state_dict` (batch-norm statistics too).
    - Any aggregator can run inside (`inner`); the reference offers FedAvg and RFA. The clip needs the
      new model to be `w_t + update`, so runs must keep `--fl.server_lr 1.0` (the paper has no server step).
    - p_A is the one-sided Clopper-Pearson lower bound at confidence 1 - α (Cohen et al., ICML 2019); the
      reference uses Hoeffding's `p̂_A - sqrt(ln(1/α) / 2M)` and `p̂_B + sqrt(...)`. As in the reference, the
      top class and its bound come from the same M draws (Cohen et al. select with a separate batch).
    - The saved model carries round T's training noise (the reference saves each round's model after the
      clip, before the noise); the smoothing noise comes on top, and the product's last factor uses
      (ρ_T, σ_T) as the reference's does (more noise only contracts more).
    - The clip divides by `|w'| / ρ_t` exactly (norms summed in float64, `clipping.clip_factors`); the
      reference scales by `ρ_t / (|w'| + 1e-6)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator, RoundContext, Wrapper
from fl_lightning.callbacks.clipping import clip_factors
from fl_lightning.config import (
    ConfigError,
    FLArgs,
    check_argument,
    check_finite,
    check_int,
    check_non_negative,
    check_positive,
)
from fl_lightning.distributed import all_reduce_sum
from fl_lightning.params import load_flat_params_

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from fl_lightning.task import FederatedData, Task


class CRFL(Wrapper):
    """CRFL training: `inner` aggregates, the new global model is clipped to ρ_t, then N(0, stddev^2) noise is added.

    Args:
        norm_bound: ρ_max, the cap of the model-norm bound (the reference: 15 on MNIST, 100 on EMNIST, 5 on LOAN).
        bound_start: b in `ρ_t = min(ρ_max, b + a t)` (the reference: 2 on MNIST and LOAN, 4 on EMNIST).
        bound_growth: a, the bound's growth per round (the reference: 0.1 on MNIST, 0.25 on EMNIST, 0.025 on LOAN).
        stddev: σ, the noise's standard deviation per coordinate (the reference: 0.01).
        inner: The aggregator of the updates; None means FedAvg (the paper).
    """

    def __init__(self, norm_bound: float = 15.0, bound_start: float = 2.0, bound_growth: float = 0.1,
                 stddev: float = 0.01, inner: Aggregator | None = None) -> None:
        check_argument(self, "norm_bound", check_finite, norm_bound, positive=True)
        check_argument(self, "bound_start", check_finite, bound_start, positive=True)
        check_argument(self, "bound_growth", check_finite, bound_growth, positive=False)
        check_argument(self, "stddev", check_finite, stddev, positive=False)
        super().__init__(inner)
        self.norm_bound, self.bound_start, self.bound_growth = norm_bound, bound_start, bound_growth
        self.stddev = stddev
        self._context: RoundContext | None = None

    def bound(self, round_idx: int) -> float:
        """ρ_t = min(ρ_max, b + a t), the largest norm the global model keeps after round t (rounds count from 1)."""
        return min(self.norm_bound, self.bound_start + self.bound_growth * round_idx)

    def check_run(self, fl: FLArgs) -> None:
        if fl.server_lr != 1.0:
            raise ConfigError(f"--fl.server_lr={fl.server_lr}: CRFL clips the new global model w + update, which "
                              f"needs a server step of 1.0 (the paper has none)")
        super().check_run(fl)

    def begin_round(self, context: RoundContext) -> None:
        self._context = context
        super().begin_round(context)

    def aggregate(self, deltas: Tensor, weights: Tensor, generator: torch.Generator) -> Aggregate:
        if self._context is None:
            raise RuntimeError("CRFL clips the global model: call begin_round with the round's context first")
        result = self.inner(deltas, weights, generator)
        model = self._context.global_params.to(result.update.device, result.update.dtype)  # w_t, [n_params]
        new_model = model + result.update  # w', [n_params]
        factor = clip_factors(new_model[None], self.bound(self._context.round_idx))[0]  # max(1, |w'| / ρ_t)
        if float(factor) > 1.0:  # within the bound the step is the inner one, bitwise
            result = replace(result, update=new_model.div_(factor).sub_(model))  # clip(w') - w_t, in place
        if self.stddev == 0:
            return result
        # Drawn on the CPU from the round's generator, so it is the same on every rank and device.
        noise = torch.randn(result.update.shape, generator=generator, dtype=result.update.dtype).mul_(self.stddev)
        noise = noise.to(result.update.device)  # [n_params]
        if result.noise is not None:  # an inner rule's own noise (weak DP) lands on the model too
            noise += result.noise
        return replace(result, noise=noise)


# ----- test time: parameter smoothing and the certified radius -----

def smoothed_vote(predict: Callable[[Tensor], Tensor], params: Tensor, sigma: float, samples: int,
                  generator: torch.Generator) -> Tensor:
    """Votes of `samples` noisy models: `counts[i, c] = #{m : predict(params + σ ε_m)[i] = c}`, `ε_m ~ N(0, I)`.

    The draws come one after another from `generator` (CPU), so the M models do not depend on the device.

    Args:
        predict: Model parameters `[n_params]` -> the predicted class of every example, int `[n]`.
        params: w_T, `[n_params]`.
        sigma: σ_T, the smoothing noise's standard deviation per coordinate.
        samples: M, the number of noisy models.
        generator: A seeded CPU generator.

    Returns:
        The vote counts, int64 `[n, n_classes]` (classes up to the largest predicted one), on the predictions' device.
    """
    counts: Tensor | None = None
    for _ in range(samples):
        noise = torch.randn(params.shape, generator=generator, dtype=params.dtype).to(params.device)  # [n_params]
        labels = predict(params + sigma * noise)  # [n]
        if counts is None:
            counts = torch.zeros(labels.shape[0], 0, dtype=torch.int64, device=labels.device)
        width = int(labels.max()) + 1 if labels.numel() else 0
        if width > counts.shape[1]:  # a class none of the earlier models predicted
            counts = torch.nn.functional.pad(counts, (0, width - counts.shape[1]))
        counts.scatter_add_(1, labels[:, None].long(), torch.ones_like(labels[:, None], dtype=torch.int64))
    return counts if counts is not None else torch.zeros(0, 0, dtype=torch.int64)


def clopper_pearson_lower(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound at confidence `1 - alpha` on k successes in n trials, `[...]`.

    The `alpha` quantile of Beta(k, n - k + 1); 0 where k = 0.
    """
    successes = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        from scipy.stats import beta  # imported here: only certification needs scipy

        bound = beta.ppf(alpha, successes, trials - successes + 1)
    return np.where(successes > 0, bound, 0.0)


def certify(counts: Tensor, alpha: float) -> tuple[Tensor, np.ndarray]:
    """The smoothed prediction and the lower bound p_A on its probability, from the vote counts.

    Args:
        counts: Votes of M noisy models, `[n, n_classes]` (`smoothed_vote`).
        alpha: The bound holds with probability at least `1 - alpha`.

    Returns:
        The top class of every example (ties: the lowest class), int64 `[n]` on the CPU, and p_A, float64 `[n]`
        (p_B = 1 - p_A; the prediction is certified, not abstained, where p_A > 1/2).
    """
    counts = counts.cpu()
    samples = int(counts[0].sum()) if counts.shape[0] else 0
    top = counts.argmax(dim=1) if counts.shape[1] else torch.zeros(counts.shape[0], dtype=torch.int64)  # [n]
    top_votes = counts.gather(1, top[:, None])[:, 0].numpy() if counts.shape[1] else np.zeros(counts.shape[0])
    return top, clopper_pearson_lower(top_votes, samples, alpha)


def contraction(bounds: Sequence[float], sigma: float, smoothing_sigma: float) -> float:
    """`Π_{t=t_adv+1}^{T-1} (2 Φ(ρ_t / σ) - 1) · (2 Φ(ρ_T / σ_T) - 1)` for `bounds` = ρ_{t_adv+1}, ..., ρ_T.

    `2 Φ(x) - 1 = erf(x / √2)`; a zero σ gives a factor of 1 (no noise contracts nothing).
    """
    def factor(rho: float, std: float) -> float:
        return 1.0 if std == 0 else math.erf(rho / std / math.sqrt(2.0))

    return math.prod(factor(rho, sigma) for rho in bounds[:-1]) * factor(bounds[-1], smoothing_sigma)


def certified_radius(p_a: np.ndarray | float, p_b: np.ndarray | float, *, sigma: float, smoothing_sigma: float,
                     bounds: Sequence[float], attacker_weights: Sequence[float], scale: float, local_steps: float,
                     lr: float, lipschitz: float, poison_fraction: float) -> np.ndarray:
    """CRFL's certified radius: the largest backdoor magnitude |δ| that cannot change the smoothed prediction.

    `RAD = sqrt(-ln(1 - (√p_A - √p_B)^2) σ^2 / (2 R Σ_i (p_i γ τ η L_Z q)^2 · contraction))`, 0 where
    p_A <= p_B (abstained); see the module docstring.

    Args:
        p_a: Lower bound on the top class's probability, `[n]` or a number.
        p_b: Upper bound on the runner-up's (`1 - p_a` will do), same shape.
        sigma: σ_{t_adv} (= σ_t of every training round): the training noise.
        smoothing_sigma: σ_T, the smoothing noise.
        bounds: ρ_{t_adv+1}, ..., ρ_T: the clipping bounds of the rounds after the attack, the last at round T.
        attacker_weights: p_i, the aggregation weight of each of the R attackers.
        scale: γ, the attackers' scale factor (model replacement's boost; 1: none).
        local_steps: τ, the attackers' local iterations in the attack round.
        lr: η, their local learning rate.
        lipschitz: L_Z, the Lipschitz constant of the loss gradient in the input.
        poison_fraction: q_B / n_B, the share of backdoored examples in a local batch.

    Returns:
        The radius, float64 `[n]` (0-d for numbers); inf where p_B = 0 and p_A = 1.
    """
    p_a, p_b = np.asarray(p_a, dtype=np.float64), np.asarray(p_b, dtype=np.float64)
    if not bounds:
        raise ValueError("bounds must hold ρ_T at least (the attack round must come before T)")
    gap = (np.sqrt(p_a) - np.sqrt(np.clip(p_b, 0.0, None))) ** 2  # (√p_A - √p_B)^2
    with np.errstate(divide="ignore"):
        budget = -np.log1p(-np.minimum(gap, 1.0))  # -ln(1 - (√p_A - √p_B)^2), the KL the prediction survives
    per_attacker = scale * local_steps * lr * lipschitz * poison_fraction  # γ τ η L_Z q_B / n_B
    drift = len(attacker_weights) * sum((p * per_attacker) ** 2 for p in attacker_weights)  # R Σ_i (p_i ...)^2
    denominator = 2.0 * drift * contraction(bounds, sigma, smoothing_sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        radius = np.sqrt(budget * sigma ** 2 / denominator)
    return np.where(p_a > p_b, np.nan_to_num(radius, nan=0.0, posinf=np.inf), 0.0)


def default_lipschitz(rho: float) -> float:
    """The reference's L_Z = sqrt(2 + 2ρ + ρ^2) for a model of norm ρ (`certify_*.py`, at ρ = ρ_{t_adv})."""
    return math.sqrt(2.0 + 2.0 * rho + rho ** 2)


def smoothing_problems(samples: Any, sigma: Any, alpha: Any, attack_round: Any, attackers: Any, weight: Any,
                       scale: Any, poison_fraction: Any, local_steps: Any, lr: Any, lipschitz: Any) -> list[str | None]:
    """What is wrong with `validate`'s smoothing options, one line each in the CLI's words (None: fine)."""
    def in_unit(option: str, value: Any, closed: bool) -> str | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value and (
            value <= 1 if closed else value < 1)
        return None if ok else f"{option} must be in (0, 1{']' if closed else ')'}, got {value!r}"

    return [check_int("--smoothing_samples", samples, 0, hint="0: off"),
            check_non_negative("--smoothing_sigma", sigma) or (None if sigma is not None else
                                                               "--smoothing_sigma must be >= 0, got None"),
            in_unit("--smoothing_alpha", alpha, closed=False),
            check_int("--certify_attack_round", attack_round, 1),
            check_int("--certify_attackers", attackers, 1),
            None if weight is None else in_unit("--certify_weight", weight, closed=True),
            check_positive("--certify_scale", scale),
            in_unit("--certify_poison_fraction", poison_fraction, closed=True),
            check_positive("--certify_local_steps", local_steps),
            check_positive("--certify_lr", lr),
            check_positive("--certify_lipschitz", lipschitz)]


def run_radius(config: dict[str, Any], round_idx: int, data: FederatedData, smoothing_sigma: float, *,
               attack_round: int | None, attackers: int, weight: float | None, scale: float, poison_fraction: float,
               local_steps: float | None, lr: float | None, lipschitz: float | None
               ) -> Callable[[np.ndarray], np.ndarray] | None:
    """The certified radius of a run's model as a function of p_A, with the threat model resolved from the run.

    None where the run did not train with CRFL (no clipping and noise to contract the attack: radius 0), and
    for a model of round 1 without `attack_round` (no earlier round to attack: none is certified).
    Unset options come from the run: t_adv = T - 1 (the latest attack, the smallest radius), p_i = 1 /
    clients per round, τ = local epochs × ⌈mean client examples / batch size⌉, η = the round-1 lr (it only
    decays), L_Z = `default_lipschitz(ρ_{t_adv})`.
    """
    aggregator = config.get("aggregator") or {}
    if str(aggregator.get("class_path", "")).rsplit(".", 1)[-1] != "CRFL":
        return None
    rule = CRFL(**{k: v for k, v in (aggregator.get("init_args") or {}).items() if k != "inner"})
    if attack_round is None and round_idx < 2:
        return None
    attack_round = round_idx - 1 if attack_round is None else attack_round
    if not 1 <= attack_round < round_idx:
        raise ConfigError(f"--certify_attack_round={attack_round}: must be in 1..{round_idx - 1}, before the "
                          f"checkpoint's round {round_idx} (a certificate needs one round after the attack)")
    fl, client = config["fl"], config["client"]
    if local_steps is None:
        mean_size = float(data.partition.sizes().double().mean())
        local_steps = client["local_epochs"] * math.ceil(mean_size / client["batch_size"])
    settings = dict(sigma=rule.stddev, smoothing_sigma=smoothing_sigma,
                    bounds=[rule.bound(t) for t in range(attack_round + 1, round_idx + 1)],
                    attacker_weights=[weight or 1.0 / fl["clients_per_round"]] * attackers, scale=scale,
                    local_steps=local_steps, lr=lr or client["lr"], poison_fraction=poison_fraction,
                    lipschitz=lipschitz or default_lipschitz(rule.bound(attack_round)))
    return lambda p_a: certified_radius(p_a, 1.0 - p_a, **settings)


@torch.no_grad()
def predicted_labels(fabric: Fabric, task: Task, inputs: Tensor, batch_size: int) -> Tensor:
    """The task's model's class for every row of `inputs`, int64 `[n]`: the argmax of `[n, C]` logits, or
    `logit > 0` for a single logit (binary tasks); sequence outputs are refused."""
    task.eval()
    labels = []
    for start in range(0, inputs.shape[0], batch_size):
        with fabric.autocast():
            logits = task(inputs[start:start + batch_size])
        if logits.ndim not in (1, 2):
            raise ConfigError(f"--smoothing_samples: task {task.name!r} predicts {logits.ndim}-d outputs per batch; "
                              f"parameter smoothing votes on one class per example")
        labels.append((logits > 0).long() if logits.ndim == 1 else logits.argmax(dim=1))
    return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=inputs.device)


def smoothing_metrics(fabric: Fabric, task: Task, sets: dict[str, tuple[Tensor, Tensor]], params: Tensor, *,
                      samples: int, sigma: float, alpha: float, seed: int, batch_size: int,
                      radius: Callable[[np.ndarray], np.ndarray] | None) -> dict[str, float]:
    """Parameter smoothing of `params` over this rank's share of the evaluation sets, summed over ranks.

    Every rank draws the same M models (a CPU generator seeded by `seed`) and votes on its own examples.

    Returns:
        `smoothed_main_acc` (the vote's accuracy), `certified_main_acc` (correct and certified: p_A > 1/2),
        `certified_radius_mean` (the average certified radius, 0 for wrong or abstained examples; 0 everywhere
        without `radius`) and, with a backdoor set, `smoothed_backdoor_acc` (the vote is the attacker's label).
    """
    inputs = {name: rows for name, (rows, _) in sets.items()}
    sizes = [rows.shape[0] for rows in inputs.values()]

    def predict(noisy: Tensor) -> Tensor:  # every set's examples, one after another, [sum(sizes)]
        load_flat_params_(task, noisy)
        return torch.cat([predicted_labels(fabric, task, rows, batch_size) for rows in inputs.values()])

    generator = torch.Generator().manual_seed(seed)
    top, p_a = certify(smoothed_vote(predict, params, sigma, samples, generator), alpha)  # [n], [n]
    load_flat_params_(task, params)
    sums: dict[str, Tensor] = {}
    for (name, (_, targets)), part, lower in zip(sets.items(), top.split(sizes), np.split(p_a, np.cumsum(sizes)[:-1])):
        correct = part == targets.cpu()  # [n_set]
        sums[f"{name}_total"] = torch.tensor(float(part.shape[0]))
        sums[f"{name}_smoothed"] = correct.double().sum()
        if name == "main":
            certified = correct & torch.from_numpy(lower > 0.5)
            radii = radius(lower) if radius is not None and lower.size else np.zeros_like(lower)
            sums["main_certified"] = certified.double().sum()
            sums["main_radius"] = torch.tensor(float(np.where(certified.numpy(), radii, 0.0).sum()))
    totals = all_reduce_sum(fabric, {key: value.to(fabric.device) for key, value in sums.items()})
    metrics = {"smoothed_main_acc": totals["main_smoothed"] / max(totals["main_total"], 1.0),
               "certified_main_acc": totals["main_certified"] / max(totals["main_total"], 1.0),
               "certified_radius_mean": totals["main_radius"] / max(totals["main_total"], 1.0)}
    if "backdoor" in sets:
        metrics["smoothed_backdoor_acc"] = totals["backdoor_smoothed"] / max(totals["backdoor_total"], 1.0)
    return metrics

