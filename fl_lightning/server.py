"""What the server holds beyond the updates: the task's model, its own small dataset, random probes.

Defenses that evaluate or train (FLTrust's server update, DeepSight's probes) reach the task through
`RoundContext.server`, a `ServerModel`; the simple rules never look. Every rank aggregates the same
round, so everything here is pure in its inputs and the generator it is handed.

The server's data ("root set", `Aggregator.server_examples` rows) is drawn from the test split,
which no client holds; those rows are then left out of the main-task evaluation (`split_test_rows`),
so no reported accuracy is measured on examples the server trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fl_lightning.client import client_lr, lr_scale, train_epochs
from fl_lightning.params import flat_params, load_flat_params_
from fl_lightning.types import LocalTraining

if TYPE_CHECKING:
    from lightning.fabric import Fabric

    from fl_lightning.config import ClientArgs
    from fl_lightning.task import FederatedData, Task

_TEST_SPLIT_SEED = 0x5E7  # one draw for every run: runs that differ only in their seed see the same rows


def split_test_rows(num_test: int, main_subset: int, server_examples: int) -> tuple[Tensor | None, Tensor | None]:
    """The test rows of the main-task evaluation and those of the server's dataset, disjoint.

    One fixed permutation of the test rows: the evaluation takes its first `main_subset` (all but the
    server's when 0), the server its last `server_examples`. With no server data the evaluation rows
    are those of `--fl.eval_subset` alone, as before the server existed.

    Returns:
        `(eval_rows, server_rows)`, sorted int64; `eval_rows` None: every test row; `server_rows`
        None: no server data.

    Raises:
        ValueError: The two do not fit in the test set together.
    """
    if server_examples + (main_subset if 0 < main_subset < num_test else 0) > num_test:
        raise ValueError(f"{server_examples} server examples and an evaluation subset of {main_subset} do not fit "
                         f"in the {num_test} test examples")
    if server_examples == 0 and not 0 < main_subset < num_test:
        return None, None
    order = torch.randperm(num_test, generator=torch.Generator().manual_seed(_TEST_SPLIT_SEED))
    eval_count = main_subset if 0 < main_subset < num_test else num_test - server_examples
    server_rows = order[num_test - server_examples:].sort().values if server_examples else None
    return order[:eval_count].sort().values, server_rows


def output_layer(task: nn.Module) -> tuple[slice, slice | None, int]:
    """Where the last `nn.Linear` (the output layer) sits in the flat parameter vector.

    Returns:
        `(weight, bias, num_outputs)`: the slices of its weight `[num_outputs * fan_in]` and bias
        (None without one) in `flat_params(task)`.
    """
    last = [m for m in task.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"{type(task).__name__} has no nn.Linear output layer")
    layer, offsets, start = last[-1], {}, 0
    for param in (p for p in task.parameters() if p.requires_grad):
        offsets[id(param)] = slice(start, start + param.numel())
        start += param.numel()
    bias = offsets.get(id(layer.bias)) if layer.bias is not None else None
    return offsets[id(layer.weight)], bias, layer.out_features


@dataclass
class ServerModel:
    """The task's model and data as the server sees them, for defenses that train or evaluate.

    Attributes:
        fabric: The run's Fabric.
        task: The rank's one model; loading parameters into it is safe after the round's local
            training (each client reloads the global model).
        client: The clients' training settings: the server trains as an honest client would.
        round_idx: The round (its learning-rate decay); `at_round` sets it.
        root_inputs: The server's own examples (`server_examples` test rows), or None.
        root_targets: Their labels.
        probe_like: A few test inputs: `random_inputs` draws inputs of their shape, type and range.
    """

    fabric: Fabric
    task: Task
    client: ClientArgs
    root_inputs: Tensor | None
    root_targets: Tensor | None
    probe_like: Tensor
    round_idx: int = 1

    @classmethod
    def build(cls, fabric: Fabric, task: Task, data: FederatedData, client: ClientArgs,
              server_rows: Tensor | None) -> ServerModel:
        """From the task's data and the rows `split_test_rows` gave the server."""
        root_inputs = root_targets = None
        if server_rows is not None:
            rows = server_rows.to(data.test_inputs.device)
            root_inputs, root_targets = data.test_inputs[rows], data.test_targets[rows]
        return cls(fabric, task, client, root_inputs, root_targets, data.test_inputs[:64])

    def at_round(self, round_idx: int) -> ServerModel:
        """This server in round `round_idx` (its learning rate)."""
        return replace(self, round_idx=round_idx)

    def train(self, params: Tensor, seed: int) -> Tensor:
        """The update (trained minus `params`) of the round's local training on the server's examples.

        The server trains as an honest client would (`fl_lightning.client.start_client`): torch's
        global generator (dropout) and the batch order both seeded with `seed`.

        Args:
            params: The model to start from, `[n_params]`.
            seed: Seeds the training's randomness.
        """
        if self.root_inputs is None:
            raise ValueError("the server holds no examples: the aggregator must ask for them (server_examples)")
        client = self.client
        ctx = LocalTraining(
            round_idx=self.round_idx, slot=-1, client_id=-1, is_adversary=False, model=self.task,
            global_params=params, inputs=self.root_inputs, targets=self.root_targets,
            lr=client_lr(client, self.round_idx), lr_scale=lr_scale(client, self.round_idx),
            epochs=client.local_epochs, batch_size=client.batch_size, momentum=client.momentum,
            weight_decay=client.weight_decay, grad_clip_norm=client.grad_clip_norm, seed=seed,
            generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        load_flat_params_(self.task, params)
        train_epochs(self.fabric, self.task, ctx)
        return flat_params(self.task).sub_(params)

    @torch.no_grad()
    def logits(self, params: Tensor, inputs: Tensor, batch_size: int = 256) -> Tensor:
        """The model's outputs for `inputs` with parameters `params`, in eval mode, `[n, ...]`."""
        load_flat_params_(self.task, params)
        self.task.eval()
        return torch.cat([self.task(inputs[i:i + batch_size]).float() for i in range(0, inputs.shape[0], batch_size)])

    def random_inputs(self, count: int, generator: torch.Generator) -> Tensor:
        """`count` random inputs shaped and typed like the task's: uniform pixels for uint8 images,
        standard normal for float inputs, uniform ids below the largest test id for tokens."""
        like = self.probe_like
        shape = (count, *like.shape[1:])
        if like.dtype == torch.uint8:
            drawn = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
        elif like.dtype.is_floating_point:
            drawn = torch.randn(shape, generator=generator, dtype=like.dtype)
        else:
            drawn = torch.randint(0, int(like.max()) + 1, shape, generator=generator, dtype=like.dtype)
        return drawn.to(like.device)

    def output_layer(self) -> tuple[slice, slice | None, int]:
        """The output layer's weight and bias slices in the flat vector, and its width (`output_layer`)."""
        return output_layer(self.task)
