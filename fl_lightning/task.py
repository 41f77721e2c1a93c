"""The task contract: a LightningModule plus its federated data.

A task file in `tasks/` holds one `Task` subclass: the model, `training_step` (returns the loss),
`validation_step` (returns sums, so counts can be added across ranks), the paper's
hyperparameters as presets, and `build_data`, which returns the task's `FederatedData`: the
training tensors once, the clients as index arrays into them, the main test set and the
edge-case (backdoor) sets.

A task never calls `self.log`: the orchestrator owns logging, and per-client per-step logging
would flood W&B.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor

from fl_lightning.config import (
    ClientArgs,
    ConfigError,
    DataArgs,
    FLArgs,
    check_choice,
    check_int,
    check_positive,
    raise_problems,
    resolve_args,
)

Batch = tuple[Tensor, Tensor]

TaskName = Literal["toy", "sentiment140", "reddit", "emnist", "cifar10", "imagenet"]
"""The built-in tasks (`--task NAME`); `fl_lightning.tasks` registers one class per name and checks
at import that the two lists agree. The engine knows the names, never the task modules."""


@dataclass(frozen=True)
class TaskSettings:
    """What a task is built from (the resolved run configuration, as the task sees it).

    Build it with `Task.make_settings` outside `fit` (tests, benchmarks): that resolves the task's
    presets and checks the result, as `fit` does.

    Attributes:
        data_dir: The data root (`--data_dir`, else `$FL_LIGHTNING_DATA`, else `~/.cache/fl_lightning`).
        num_clients: K, the number of clients to partition the training data into.
        seed: The run seed: the partition and every edge-case draw derive from it.
        model: A model variant the task knows by name (capacity experiments), or None for the default.
        data: The `--data.*` group with the task's presets filled in (`Task.resolve_presets`); its
            fields are documented once, in `fl_lightning.config.DataArgs`.
    """

    data_dir: Path
    num_clients: int
    seed: int = 0
    model: str | None = None
    data: DataArgs = field(default_factory=DataArgs)


@dataclass
class ClientPartition:
    """Clients as slices of one index array (CSR layout): memory and lookups do not grow per client.

    Attributes:
        order: Indices into the training tensors, client after client, `[n_assigned]`; int32 when
            built by `from_csr` / `from_lists` and the rows fit (half the memory; `index_select` takes
            it), else int64.
        offsets: Client `c` holds `order[offsets[c]:offsets[c + 1]]`, `[num_clients + 1]` int64.
    """

    order: Tensor
    offsets: Tensor

    @classmethod
    def from_csr(cls, order: np.ndarray | Tensor, offsets: np.ndarray | Tensor) -> ClientPartition:
        """From a CSR pair (e.g. `partition.label_partition`'s), with `order` as int32 when its values fit."""
        order = torch.as_tensor(np.asarray(order))
        fits = order.numel() == 0 or (int(order.min()) >= 0 and int(order.max()) <= torch.iinfo(torch.int32).max)
        return cls(order=order.to(torch.int32 if fits else torch.int64),
                   offsets=torch.as_tensor(np.asarray(offsets), dtype=torch.int64))

    @classmethod
    def from_lists(cls, client_indices: list[np.ndarray] | list[Tensor]) -> ClientPartition:
        """Builds the CSR layout from one index array per client."""
        sizes = np.fromiter((len(ix) for ix in client_indices), dtype=np.int64, count=len(client_indices))
        offsets = np.zeros(len(client_indices) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        arrays = [np.asarray(ix, dtype=np.int64) for ix in client_indices]
        return cls.from_csr(np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64), offsets)

    @property
    def num_clients(self) -> int:
        return self.offsets.numel() - 1

    def indices(self, client_id: int) -> Tensor:
        """Indices of one client's examples, `[n_client]`."""
        return self.order[self.offsets[client_id]:self.offsets[client_id + 1]]

    def size(self, client_id: int) -> int:
        """Examples of one client."""
        return int(self.offsets[client_id + 1] - self.offsets[client_id])

    def sizes(self) -> Tensor:
        """Examples per client, `[num_clients]`."""
        return self.offsets[1:] - self.offsets[:-1]


@dataclass
class FederatedData:
    """A task's data, loaded once per process.

    Attributes:
        train_inputs: All training inputs, `[N, ...]`; clients hold index arrays into it.
        train_targets: All training targets, `[N, ...]`.
        partition: Which rows each client holds.
        test_inputs: Main-task test inputs.
        test_targets: Main-task test targets.
        backdoor_inputs: Edge-case test inputs (the target task), or None when the task has none.
        backdoor_targets: The attacker's labels for them (backdoor accuracy = share predicted so).
        edge_train_inputs: The attacker's poisoned training set (edge examples already relabelled
            to the target, mixed with clean examples), or None.
        edge_train_targets: Its targets.
        extras: Task-specific tensors (e.g. the attacker's clean subset for the prox attack).
    """

    train_inputs: Tensor
    train_targets: Tensor
    partition: ClientPartition
    test_inputs: Tensor
    test_targets: Tensor
    backdoor_inputs: Tensor | None = None
    backdoor_targets: Tensor | None = None
    edge_train_inputs: Tensor | None = None
    edge_train_targets: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return self.partition.num_clients

    def client_data(self, client_id: int) -> Batch:
        """One client's examples, gathered with one `index_select` per tensor."""
        idx = self.partition.indices(client_id).to(self.train_inputs.device)
        return self.train_inputs.index_select(0, idx), self.train_targets.index_select(0, idx)

    def to(self, device: torch.device | str) -> FederatedData:
        """Moves every tensor to `device` (once, before training; batches are then slices on the device)."""
        moved = {name: (value.to(device) if isinstance(value, Tensor) else value)
                 for name, value in vars(self).items() if name not in ("partition", "extras")}
        return FederatedData(partition=self.partition, extras={k: v.to(device) for k, v in self.extras.items()},
                             **moved)


def iterate_batches(inputs: Tensor, targets: Tensor, batch_size: int, generator: torch.Generator,
                    drop_last: bool = False) -> Iterator[Batch]:
    """Shuffled mini-batches of one client's data (the last partial batch kept unless `drop_last`).

    The permutation is drawn on the CPU from `generator`, so the order does not depend on the device.
    """
    num_examples = inputs.shape[0]
    perm = torch.randperm(num_examples, generator=generator).to(inputs.device)
    stop = num_examples - num_examples % batch_size if drop_last else num_examples
    for start in range(0, stop, batch_size):
        idx = perm[start:start + batch_size]
        yield inputs.index_select(0, idx), targets.index_select(0, idx)


class Task(L.LightningModule, ABC):
    """Base class of the federated tasks.

    Class attributes (the paper's presets; the CLI's `None` means "take these"):
        name: Registry name (`--task NAME`).
        fl_preset: Defaults for the `fl` group (`preset(FLArgs, rounds=..., num_clients=..., ...)`).
        client_preset: Defaults for the `client` group (lr, lr_decay, momentum, ...).
        data_preset: Defaults for the `data` group (partition, source, edge_count, ...); a task takes
            `--data.edge_count` / `--data.clean_count` only when its preset sets them.
        sources: The values `--data.source` may take (empty: the task has one source).
        models: The `--model` names the task knows (empty: none, the option must stay unset); tasks
            with a family of names (`lenet_w<k>`) override `check_model`.
        partitions: The values `--data.partition` may take.
        attack_cases: The values `--data.attack_case` may take.
        refusals: Why a setting is limited, by `DataArgs` field (shown with the allowed values).
        backdoor_target: The label the edge-case backdoor forces, or None.
        drop_last: Whether local training skips the last partial batch (the Sentiment140 reference does).
        supports_vmap: Whether `--client.batching vmap` can train the model (`fl_lightning/batched.py`):
            no BatchNorm, no data-dependent shapes, and `training_step` a mean of per-row losses.
        supports_tile: Whether `build_data` honours `--data.tile` (the label-split tasks); other
            tasks refuse a tile above 1.
    """

    name: ClassVar[str]
    fl_preset: ClassVar[FLArgs] = FLArgs()
    client_preset: ClassVar[ClientArgs] = ClientArgs()
    data_preset: ClassVar[DataArgs] = DataArgs()
    sources: ClassVar[tuple[str, ...]] = ()
    models: ClassVar[tuple[str, ...]] = ()
    partitions: ClassVar[tuple[str, ...]] = ("dirichlet", "iid")
    attack_cases: ClassVar[tuple[str, ...]] = ("edge", "almost_edge", "normal")
    refusals: ClassVar[dict[str, str]] = {}
    backdoor_target: ClassVar[int | None] = None
    drop_last: ClassVar[bool] = False
    supports_vmap: ClassVar[bool] = True
    supports_tile: ClassVar[bool] = False
    registry: ClassVar[dict[str, type[Task]]] = {}
    """Every task class that declares its own `name`, by name (filled as the classes are defined)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a subclass that keeps its parent's name (a test variant) does not replace it
            Task.registry.setdefault(cls.name, cls)

    @staticmethod
    def by_name(name: str) -> type[Task]:
        """The registered task class called `name`; the CLI registers the built-in ones (`fl_lightning.tasks`)."""
        if name not in Task.registry:
            valid = ", ".join(sorted(Task.registry)) or "none registered (import fl_lightning.tasks)"
            raise ConfigError(f"--task: unknown task {name!r}; valid: {valid}")
        return Task.registry[name]

    @classmethod
    def resolve_presets(cls, fl: FLArgs, client: ClientArgs, data: DataArgs) -> tuple[FLArgs, ClientArgs, DataArgs]:
        """The three groups with their `None` fields taken from this task's presets (the one place presets apply)."""
        return (resolve_args(cls.fl_preset, fl), resolve_args(cls.client_preset, client),
                resolve_args(cls.data_preset, data))

    @classmethod
    def make_settings(cls, data_dir: str | Path, num_clients: int, *, seed: int = 0, model: str | None = None,
                      **data: Any) -> TaskSettings:
        """Settings to build this task outside `fit` (tests, benchmarks): `data` are `DataArgs` fields; the
        presets are resolved (`resolve_presets`) and the result checked (`check_settings`), as `fit` does."""
        _, _, resolved = cls.resolve_presets(FLArgs(), ClientArgs(), DataArgs(**data))
        settings = TaskSettings(data_dir=Path(data_dir), num_clients=num_clients, seed=seed, model=model,
                                data=resolved)
        cls.check_settings(settings)
        return settings

    @classmethod
    def check_settings(cls, settings: TaskSettings) -> None:
        """Raises one `ConfigError` for every setting this task cannot take, without loading any data.

        `fit` and `validate` call it before processes launch; the constructor calls it again. Tasks
        extend it (calling `super()`) for checks of their own.
        """
        raise_problems(cls.setting_problems(settings))

    @classmethod
    def setting_problems(cls, settings: TaskSettings) -> list[str | None]:
        """The problems `check_settings` reports (`None` entries: fine); tasks extend the list."""
        data, task = settings.data, repr(cls.name)

        def choice(key: str, allowed: tuple[str, ...], what: str) -> str | None:
            return check_choice(f"--data.{key}", getattr(data, key), allowed, f"{what} for task {task}",
                                cls.refusals.get(key, ""))

        problems = [
            check_int("--fl.num_clients", settings.num_clients, 1),
            cls.check_model(settings.model),
            choice("source", cls.sources, "source") if cls.sources else None,
            choice("partition", cls.partitions, "partition"),
            choice("attack_case", cls.attack_cases, "attack case"),
            check_positive("--data.alpha", data.alpha),
            check_int("--data.tile", data.tile, 1, hint="1: no replication"),
        ]
        if data.source is not None and not cls.sources:
            problems.append(f"--data.source={data.source!r}: task {task} has one source; leave it unset")
        if data.partition is None:
            problems.append(f"--data.partition has no value: build the settings with {cls.__name__}.make_settings "
                            f"(or resolve_presets), which fills in the task's preset")
        if data.tile != 1 and not cls.supports_tile and isinstance(data.tile, int):
            problems.append(f"--data.tile={data.tile}: task {task} cannot tile its training set (its clients are "
                            f"its own split, e.g. one per user); use --data.tile 1 (the tasks that tile split by "
                            f"label: emnist, cifar10, imagenet, toy)")
        for key in ("edge_count", "clean_count"):
            value, preset_value = getattr(data, key), getattr(cls.data_preset, key)
            if preset_value is None and value is not None:
                problems.append(f"--data.{key}={value}: task {task} does not take it (its attacker set is fixed "
                                f"by the task); leave it unset")
        problems.append(check_int("--data.clean_count", data.clean_count, 0))
        return problems

    @classmethod
    def check_model(cls, model: str | None) -> str | None:
        """The problem with `--model` for this task (`parse_model`'s error), or None."""
        try:
            cls.parse_model(model)
        except ConfigError as err:
            return str(err)
        return None

    @classmethod
    def parse_model(cls, model: str | None) -> Any:
        """What the task builds from `--model` (None: its default); raises `ConfigError` for a name it does not
        know. Default: one of `models`, returned as is; tasks with a family of names (`lenet_w<k>`) override it."""
        if model is not None and not cls.models:
            raise ConfigError(f"--model={model!r}: task {cls.name!r} has no model variants; leave it unset")
        raise_problems([check_choice("--model", model, cls.models, f"model for task {cls.name!r}")])
        return model

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__()
        self.check_settings(settings)
        self.settings = settings

    def prepare_data(self) -> None:
        """Downloads and converts the task's data into `settings.data_dir` if missing (rank 0 first)."""

    def artifacts(self) -> dict[str, Path]:
        """Files a run keeps beside its model, by name in the run directory (e.g. a trained tokenizer)."""
        return {}

    @abstractmethod
    def build_data(self) -> FederatedData:
        """Loads the task's tensors and partitions them over `settings.num_clients` clients."""

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Returns the mean loss of one mini-batch (the orchestrator calls backward and the optimizer)."""
        inputs, targets = batch
        return torch.nn.functional.cross_entropy(self(inputs), targets)

    @torch.no_grad()
    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        """Returns sums over the batch: `correct`, `total` and `loss_sum` (added over ranks, divided once)."""
        inputs, targets = batch
        logits = self(inputs)
        loss_sum = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        correct = (logits.argmax(dim=1) == targets).sum()
        return {"correct": correct.float(), "total": torch.tensor(float(targets.shape[0]), device=logits.device),
                "loss_sum": loss_sum.float()}
