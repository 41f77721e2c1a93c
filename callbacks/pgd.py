"""The math of the paper's attacks, as pure functions: L2-ball projection and model-replacement scaling.

PGD (projected gradient descent on the attacker's objective, keeping its model within an L2 ball
of radius eps around the round's global model, so norm-based defenses let it through) and model
replacement (scaling the update so that FedAvg lands on the attacker's model) are from Wang et al.,
"Attack of the Tails: Yes, You Really Can Backdoor Federated Learning", NeurIPS 2020
(arXiv:2007.05084), §4; model replacement is from Bagdasaryan et al., "How To Backdoor Federated
Learning", AISTATS 2020 (arXiv:1807.00459).
"""

from __future__ import annotations

from torch import Tensor


def project_l2_ball(point: Tensor, center: Tensor, radius: float) -> Tensor:
    """`point` projected onto the L2 ball `{w : ||w - center|| <= radius}` (flat `[n_params]` vectors).

    Points inside the ball are returned unchanged; points outside move along the ray to the center.
    """
    offset = point - center  # [n_params]
    norm = float(offset.norm())
    if norm <= radius:
        return point
    return center + offset * (radius / norm)


def replacement_scale(total_examples: float, adversary_examples: float) -> float:
    """Γ = (examples of all the round's participants) / (examples of all its adversaries).

    Under FedAvg an attacker's weight is `n_adv / total`; scaling every adversary's update by
    `total / (sum of the adversaries' n)` makes their combined contribution the mean of their
    updates, so the global model is replaced by (the mean of) the attackers' models when the
    honest updates are small. With one attacker this is the reference's `1 / p_adv`; with k
    attackers it avoids the reference's k-fold overshoot (docs/reference-deviations.md#q15).
    """
    if adversary_examples <= 0 or total_examples < adversary_examples:
        raise ValueError(f"need 0 < adversary examples ({adversary_examples}) <= total examples ({total_examples})")
    return total_examples / adversary_examples


def should_project(batch_idx: int, num_batches: int, project_every: int) -> bool:
    """The reference's schedule: after batches 0, P, 2P, ... and after the last batch of every epoch."""
    return batch_idx % project_every == 0 or batch_idx == num_batches - 1


def prox_gradient(param: Tensor, anchor: Tensor, coefficient: float) -> Tensor:
    """Gradient of `coefficient * ||param - anchor||^2` (the prox attack's penalty), `[same shape]`."""
    return 2.0 * coefficient * (param - anchor)

