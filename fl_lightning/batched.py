"""Batched local training (`--client.batching vmap`): a rank's honest clients trained together with `torch.func`.

The idea is the model-ensembling recipe of `torch.func` (functorch; Horace He and Richard Zou,
https://pytorch.org/docs/stable/func.html and its "Model ensembling" tutorial): keep the m models'
parameters stacked, `[m, *shape]` per parameter, run the task's `training_step` through
`torch.func.functional_call` and map it over the clients with `torch.func.vmap(grad_and_value(...))`.
One call then computes every client's gradient on its own mini-batch, and SGD is a few broadcasting
tensor ops on the stacks instead of m optimizers: m small steps become one larger one, which is
what keeps a GPU busy when each client's batches are small. (On CPUs a client's own batch may keep
the cores busy already, and vmap runs convolutions as grouped convolutions, so measure:
`benchmarks/bench_batching.py`.)

It does the same math as `client.train_client` for each client:

* the same start (`client.start_client`: `torch.manual_seed(ctx.seed)`, the global model loaded,
  `on_client_start`, which may change the context), and the client starts from the model the hook
  left (normally the global one);
* the same mini-batches: each client's batch order is drawn up front from its own `ctx.generator`,
  one `randperm` per epoch, exactly as `iterate_batches` would (honouring `task.drop_last`); the last
  partial batch is kept, padded to the group's batch size, and the padding masked out of the loss,
  so the gradient is the mean over the real rows. The per-row losses come from `training_step`
  applied to one-row batches (a second `vmap`, over rows), so a task's `training_step` must be the
  mean of per-row losses, which every vmap-capable task's is;
* `torch.optim.SGD` exactly: weight decay added to the gradient, the momentum buffer initialised to
  the first step's gradient, no dampening, no Nesterov; each client's own lr, momentum, weight
  decay, epochs and batch size; gradient-norm clipping with `clip_grad_norm_`'s semantics (one
  norm over all parameters, coefficient `max_norm / (norm + 1e-6)` clamped at 1);
* the same `ClientUpdate` (delta, example count, mean loss over the steps), and `on_client_end` with
  the task's model holding that client's trained parameters.

Clients train for different numbers of steps (data sizes, epochs). They are sorted by step count,
longest first, so the clients still training at step s are always a prefix `[:active]` of the
stacks: each step reads and updates views `params[:active]` in place, with no gather or scatter.

What differs from sequential training:

* Attackers (`ctx.is_adversary`) and clients whose `on_client_start` hook set `ctx.optimizer` are
  trained on the sequential path, client by client, so every attack (PGD projection after steps,
  prox, model replacement) works unchanged. `on_after_optimizer_step` fires only for those
  clients: batched clients take their steps together and no per-step hook runs for them.
* Hooks run in another order: every batched client's `on_client_start` runs before any of them
  trains, and their `on_client_end` calls come after all of them trained.
* Randomness inside the model or `training_step` (dropout, the CIFAR-10 random crops) is drawn
  with `vmap(randomness="different")` from torch's global generator, seeded once per rank and
  round by the first batched client's seed. The draws have the same distribution as on the
  sequential path but are different numbers, and they depend on which clients share the rank: a
  vmap run is reproducible for a given seed and device count, but not bitwise equal to a sequential
  run, nor to a vmap run on another number of devices, when the model has dropout or random
  augmentation. Without such randomness the two paths agree to float rounding (the reductions are
  ordered differently).
* `training_step` gets `batch_idx=-1`: batched clients are at different batch indices at a step.

Models with BatchNorm (running statistics are buffers updated in place, which `vmap` cannot do per
client) and tasks whose code cannot be vmapped (data-dependent shapes, as in the LSTM text tasks,
or batches read from disk) are refused with a `ConfigError` before training starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from fl_lightning.client import finish_client, num_batches, start_client, train_client
from fl_lightning.config import ConfigError
from fl_lightning.params import flat_params, load_flat_params_
from fl_lightning.types import ClientUpdate, LocalTraining

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from fl_lightning.task import Task


def check_vmap_support(task: type[Task] | Task) -> None:
    """Raises `ConfigError` when a task (class or built instance) cannot be trained with vmap.

    A class is checked by its `supports_vmap` attribute; a built task also for BatchNorm layers
    with running statistics.
    """
    hint = "use --client.batching sequential"
    if not getattr(task, "supports_vmap", True):
        raise ConfigError(f"task {task.name!r} does not support --client.batching vmap (its model cannot be "
                          f"vmapped over clients); {hint}")
    if isinstance(task, nn.Module):
        for name, module in task.named_modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
                raise ConfigError(f"task {task.name!r} has BatchNorm layer {name!r}, whose running statistics "
                                  f"--client.batching vmap cannot keep per client; {hint}")


class _TrainingStep(nn.Module):
    """The task's `training_step` as a module's `forward`, so `functional_call` can swap its parameters."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.task = task

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return self.task.training_step((inputs, targets), -1)


@dataclass
class Schedule:
    """Every batched client's mini-batches, as rows of the clients' concatenated data.

    Attributes:
        rows: `[S, m, B]` int64 row indices into the concatenated data, for step s and client i
            (padding repeats a real row of the client and is masked out).
        mask: `[S, m, B]` float, 1 for a real row, 0 for padding.
        counts: `[S, m]` float, real rows per batch (the mean's denominator; 1 where inactive).
        steps: Steps per client, in the (descending) order of the stacks.
        active: `[S]`: how many clients (a prefix) are still training at each step.
    """

    rows: Tensor
    mask: Tensor
    counts: Tensor
    steps: list[int]
    active: list[int]


def batch_schedule(contexts: Sequence[LocalTraining], drop_last: bool) -> Schedule:
    """Draws each client's mini-batches from its own generator, in `iterate_batches`' order.

    Args:
        contexts: The clients, already sorted by step count, longest first.
        drop_last: Whether the last partial batch of an epoch is skipped (the task's `drop_last`).
    """
    sizes = [int(ctx.inputs.shape[0]) for ctx in contexts]
    steps = [ctx.epochs * num_batches(n, ctx.batch_size, drop_last) for ctx, n in zip(contexts, sizes)]
    num_steps, width = max(steps, default=0), max((min(c.batch_size, n) for c, n in zip(contexts, sizes)), default=1)
    rows = torch.zeros(num_steps, len(contexts), width, dtype=torch.int64)
    mask = torch.zeros(num_steps, len(contexts), width)
    offset = 0
    for i, (ctx, n) in enumerate(zip(contexts, sizes)):
        rows[:, i, :] = offset  # padding points at the client's first row: finite, and masked out
        step = 0
        for _ in range(ctx.epochs):
            # One randperm per epoch on the client's CPU generator, as `iterate_batches` draws it.
            perm = torch.randperm(n, generator=ctx.generator)
            stop = n - n % ctx.batch_size if drop_last else n
            for start in range(0, stop, ctx.batch_size):
                batch = perm[start:start + ctx.batch_size]
                rows[step, i, :batch.numel()] = batch + offset
                mask[step, i, :batch.numel()] = 1.0
                step += 1
        offset += n
    active = [sum(s > step for s in steps) for step in range(num_steps)]
    return Schedule(rows, mask, mask.sum(dim=2).clamp(min=1.0), steps, active)


class BatchedTrainer:
    """Trains a rank's honest clients of a round together; attackers go the sequential way.

    Args:
        fabric: The run's Fabric (hooks, `autocast`); stacks live on the device of the global model.
        task: The task, whose model is the rank's one model (the template for the stacked copies).
    """

    def __init__(self, fabric: Fabric, task: Task) -> None:
        check_vmap_support(task)
        self.fabric, self.task = fabric, task
        self.names = [name for name, p in task.named_parameters() if p.requires_grad]
        self.step_module = _TrainingStep(task)
        # Outer vmap over clients (parameters, batch, mask, count), each with its own dropout draws.
        self.grad_and_loss = vmap(grad_and_value(self.client_loss), randomness="different")

    def row_loss(self, params: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> Tensor:
        """`training_step` of the one-row batch `(inputs[None], targets[None])`: that row's loss, a scalar."""
        return functional_call(self.step_module, params, (inputs.unsqueeze(0), targets.unsqueeze(0)))

    def client_loss(self, params: dict[str, Tensor], inputs: Tensor, targets: Tensor, mask: Tensor,
                    count: Tensor) -> Tensor:
        """One client's mean loss over the real rows of its padded batch.

        Args:
            params: The client's parameters, `{name: [*shape]}` (one row of the stacks).
            inputs: Its padded batch, `[B, ...]`.
            targets: `[B, ...]`.
            mask: `[B]`, 1 for real rows.
            count: Scalar, the number of real rows.
        """
        # Per-row losses through a second vmap, over rows: padding can then be masked exactly,
        # whatever `training_step` computes, as long as it is a mean over rows.
        losses = vmap(self.row_loss, in_dims=(None, 0, 0), randomness="different")(params, inputs, targets)  # [B]
        return (losses.float() * mask).sum() / count

    def probe(self, inputs: Tensor, targets: Tensor) -> None:
        """One batched gradient of two clients on a small batch (`[b, ...]`), so that a model vmap
        cannot handle fails before the first round.

        The global random state is restored afterwards, so the probe changes no run's numbers.
        """
        params = {f"task.{name}": p.detach().unsqueeze(0).expand(2, *p.shape)
                  for name, p in self.task.named_parameters() if p.requires_grad}
        x, y = inputs.unsqueeze(0).expand(2, *inputs.shape), targets.unsqueeze(0).expand(2, *targets.shape)
        mask = torch.ones(2, inputs.shape[0], device=inputs.device)
        count = torch.full((2,), float(inputs.shape[0]), device=inputs.device)
        devices = [inputs.device] if inputs.device.type == "cuda" else []
        self.task.train()
        try:
            with torch.random.fork_rng(devices=devices), self.fabric.autocast():
                self.grad_and_loss(params, x, y, mask, count)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            raise ConfigError(f"task {self.task.name!r} cannot be trained with --client.batching vmap: "
                              f"{str(err).splitlines()[0]}; use --client.batching sequential") from err

    def train(self, contexts: Sequence[LocalTraining]) -> list[ClientUpdate]:
        """Trains the clients of `contexts`; returns their updates in slot order.

        Args:
            contexts: This rank's clients of the round, in slot order.
        """
        updates: dict[int, ClientUpdate] = {}
        batched: list[LocalTraining] = []
        starts: list[Tensor] = []  # each batched client's starting model, flat [n_params]
        for ctx in contexts:
            if ctx.is_adversary:
                updates[ctx.slot] = train_client(self.fabric, self.task, ctx)
                continue
            start_client(self.fabric, self.task, ctx)
            if ctx.optimizer is not None:  # a hook chose its own optimizer: only the sequential path runs it
                updates[ctx.slot] = finish_client(self.fabric, self.task, ctx)
                continue
            batched.append(ctx)
            starts.append(flat_params(self.task))
        if batched:
            for update in self.train_together(batched, starts):
                updates[update.slot] = update
        return [updates[slot] for slot in sorted(updates)]

    def train_together(self, contexts: list[LocalTraining], starts: list[Tensor]) -> list[ClientUpdate]:
        """The batched local epochs of `contexts` (after `on_client_start`), then `on_client_end` per client."""
        task, fabric = self.task, self.fabric
        device = contexts[0].global_params.device
        # Longest first (stable), so the clients still training at any step are a prefix of the stacks.
        sizes = [c.epochs * num_batches(int(c.inputs.shape[0]), c.batch_size, task.drop_last) for c in contexts]
        order = sorted(range(len(contexts)), key=lambda i: -sizes[i])
        ctxs = [contexts[i] for i in order]
        m = len(ctxs)
        schedule = batch_schedule(ctxs, task.drop_last)
        rows, mask, counts = (t.to(device) for t in (schedule.rows, schedule.mask, schedule.counts))
        inputs = torch.cat([c.inputs for c in ctxs])    # [sum n_i, ...]: client after client, in stack order
        targets = torch.cat([c.targets for c in ctxs])  # [sum n_i, ...]

        # Stacked parameters, one contiguous [m, *shape] tensor per parameter, and SGD's momentum buffers.
        flat = torch.stack([starts[i] for i in order])  # [m, n_params]
        shapes = [p.shape for p in task.parameters() if p.requires_grad]
        params = [chunk.reshape(m, *shape).contiguous()
                  for chunk, shape in zip(torch.split(flat, [s.numel() for s in shapes], dim=1), shapes)]
        del flat
        buffers = [torch.zeros_like(p) for p in params]

        def per_client(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)  # [m]

        lr, momentum = per_client([c.lr for c in ctxs]), per_client([c.momentum for c in ctxs])
        weight_decay, clip = per_client([c.weight_decay for c in ctxs]), per_client([c.grad_clip_norm for c in ctxs])
        any_clip = any(c.grad_clip_norm > 0 for c in ctxs)
        loss_sums = torch.zeros(m, device=device)

        # Dropout and augmentation draws of the whole group come from one seed (see the module docstring).
        torch.manual_seed(contexts[0].seed)
        task.train()
        for step, active in enumerate(schedule.active):
            batch_rows = rows[step, :active]                            # [a, B]
            stacked = {f"task.{n}": p[:active] for n, p in zip(self.names, params)}
            with fabric.autocast():
                grads, losses = self.grad_and_loss(stacked, inputs[batch_rows], targets[batch_rows],
                                                   mask[step, :active], counts[step, :active])
            grads = [grads[f"task.{n}"] for n in self.names]            # each [a, *shape]
            if any_clip:
                clip_grad_norms_(grads, clip[:active])
            sgd_step_(params, grads, buffers, lr[:active], momentum[:active], weight_decay[:active],
                      first=step == 0)
            loss_sums[:active] += losses.detach().float()

        final = torch.cat([p.reshape(m, -1) for p in params], dim=1)  # [m, n_params]
        del params, buffers
        updates = []
        for row, ctx in sorted(enumerate(ctxs), key=lambda item: item[1].slot):
            update = ClientUpdate(
                slot=ctx.slot, client_id=ctx.client_id,
                delta=torch.sub(final[row], ctx.global_params, out=ctx.delta_out),
                num_examples=ctx.num_examples if ctx.num_examples is not None else int(ctx.inputs.shape[0]),
                loss=float(loss_sums[row]) / max(schedule.steps[row], 1), is_adversary=ctx.is_adversary)
            # Hooks see the rank's model holding this client's trained parameters, as after sequential training.
            load_flat_params_(task, final[row])
            fabric.call("on_client_end", ctx=ctx, update=update)
            updates.append(update)
        return updates


@torch.no_grad()
def clip_grad_norms_(grads: list[Tensor], max_norms: Tensor) -> None:
    """Per-client `clip_grad_norm_`, in place: each client's gradients scaled to at most its max norm.

    Args:
        grads: Per parameter, the active clients' gradients `[a, *shape]`.
        max_norms: `[a]`; 0 leaves that client's gradients unchanged.
    """
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], dim=1)  # [a, n_tensors]
    total = torch.linalg.vector_norm(norms, dim=1)                                               # [a]
    coef = torch.where(max_norms > 0, (max_norms / (total + 1e-6)).clamp(max=1.0), 1.0)       # [a]
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))


@torch.no_grad()
def sgd_step_(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], lr: Tensor, momentum: Tensor,
              weight_decay: Tensor, first: bool) -> None:
    """One `torch.optim.SGD` step (no dampening, no Nesterov) of the first `a` clients, in place.

    Args:
        params: Stacked parameters `[m, *shape]`; rows `[:a]` are updated.
        grads: Their gradients `[a, *shape]`.
        buffers: Momentum buffers `[m, *shape]`.
        lr: `[a]` learning rates.
        momentum: `[a]` momenta (0: plain SGD; the buffer then equals the gradient).
        weight_decay: `[a]` L2 coefficients, added to the gradient as SGD does.
        first: Whether this is every client's first step (the buffer starts as the gradient).
    """
    active = lr.shape[0]
    for p, g, buf in zip(params, grads, buffers):
        shape = (active, *[1] * (p.dim() - 1))
        p_a, buf_a = p[:active], buf[:active]
        d_p = torch.addcmul(g, weight_decay.view(shape), p_a)  # grad + wd * param
        if first:
            buf_a.copy_(d_p)
        else:
            buf_a.mul_(momentum.view(shape)).add_(d_p)
        p_a.addcmul_(lr.view(shape), buf_a, value=-1.0)  # param -= lr * buf
