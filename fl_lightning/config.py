"""Typed argument groups of the CLI, the task presets that fill them, and input validation.

Fields of `fl`, `client` and `data` that default to `None` mean "the task's paper preset"
(litgpt's `precision=None` pattern): `resolve_args` fills them in one place, and the resolved values
are what is saved to `config.yaml` and logged, so `--config runs/<name>/config.yaml` reproduces a
run exactly. Each field's docstring becomes its `--help` text.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, TypeVar


class ConfigError(ValueError):
    """A bad setting, caught before any work starts; the message names the field and what is allowed."""


class ComponentError(ConfigError):
    """A bad constructor argument of an aggregator or a callback.

    A component does not know the option it was given under (`--aggregator.beta`,
    `--aggregator.inner.beta`, a config file): its message names the class and the argument
    (`TrimmedMean beta must be in [0, 0.5), got 0.7`), and the CLI rewrites it with the option.

    Attributes:
        component: The class name.
        argument: The constructor argument.
    """

    def __init__(self, component: str, argument: str, message: str) -> None:
        super().__init__(message)
        self.component, self.argument = component, argument


Group = TypeVar("Group")


@dataclass
class FLArgs:
    """Federated-learning settings."""

    rounds: int | None = None
    """Number of federated rounds (None: the task's preset)."""
    num_clients: int | None = None
    """K, the number of clients the training data is split over (None: preset)."""
    clients_per_round: int | None = None
    """m, the clients sampled per round (None: preset)."""
    server_lr: float = 1.0
    """Server step size: global += server_lr * aggregate (1.0 is FedAvg)."""
    eval_every: int = 1
    """Evaluate main-task and backdoor accuracy every this many rounds (0: only at the end)."""
    eval_batch_size: int = 64
    """Evaluation batch size (64 is faster than 1000 on CPUs; raise it on GPUs)."""
    eval_subset: int = 0
    """Measure main-task accuracy on this many test examples, one fixed draw for every seed and round (0: all of
    them). The backdoor test set is always whole. A cheaper estimate for many short runs (the claims check)."""
    checkpoint_every: int = 10
    """Save a resumable checkpoint every this many rounds (0: only at the end)."""


@dataclass
class ClientArgs:
    """Local training of every client: a fresh SGD optimizer per client per round."""

    lr: float | None = None
    """Learning rate at round 1 (None: preset)."""
    lr_decay: float | None = None
    """Per-round decay gamma: the lr of round t is lr * gamma ** (t - 1) (None: preset)."""
    momentum: float | None = None
    """SGD momentum (None: preset)."""
    weight_decay: float | None = None
    """SGD weight decay (None: preset)."""
    local_epochs: int | None = None
    """Local epochs per round (None: preset)."""
    batch_size: int | None = None
    """Local mini-batch size (None: preset)."""
    grad_clip_norm: float | None = None
    """Clip each step's gradient norm to this (0: off; None: preset)."""
    batching: Literal["sequential", "vmap"] = "sequential"
    """`sequential`: one client after another on the rank's model; `vmap`: the rank's honest clients
    trained together with torch.func (same math; attackers stay sequential; not for BatchNorm or LSTM tasks)."""


@dataclass
class DataArgs:
    """Which data a task loads and how it is split."""

    source: str | None = None
    """Data source, when a task has several (e.g. `mnist` for the `emnist` task; None: preset)."""
    partition: Literal["dirichlet", "iid", "natural"] | None = None
    """How the training set is split over clients (None: preset)."""
    alpha: float = 0.5
    """Dirichlet concentration of the `dirichlet` partition (smaller: more label skew)."""
    attack_case: Literal["edge", "almost_edge", "normal"] = "edge"
    """Who holds the edge-case examples: only the attacker, or honest clients too (with true labels)."""
    download: bool = True
    """Download a missing dataset into the data root (False: fail instead)."""
    tile: int = 1
    """Replicate the training set this many times before partitioning, so clients keep their size as K
    grows (scale benchmarks, as limit_emnist.py --tile); index replication, never a copy of the data.
    Tasks split by label only (emnist, cifar10, imagenet, toy); >= 1."""
    edge_count: int | None = None
    """Edge-case examples in the attacker's set, relabelled to the target (None: the task's preset:
    emnist 66 ARDIS sevens, cifar10 100 Southwest planes). Image tasks with a fixed edge set only."""
    clean_count: int | None = None
    """Clean training examples mixed into the attacker's set with their true labels (None: the
    task's preset: emnist 100, cifar10 400, imagenet 400). Image tasks only."""


@dataclass
class LogArgs:
    """Where metrics go."""

    logger: Literal["wandb", "csv", "none"] = "wandb"
    """`wandb` (online with credentials, else offline) plus metrics.csv; `csv`: metrics.csv only; `none`."""
    project: str = "fl_lightning"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user; None: your default)."""
    group: str | None = None
    """W&B run group (e.g. the sweep or experiment name)."""
    tags: list[str] | None = None
    """W&B tags."""
    progress_bar: bool = True
    """Show a rich progress bar over rounds (plain lines when the output is not a terminal)."""


def preset(group: type[Group], **values: Any) -> Group:
    """A task's preset for one argument group: `preset(FLArgs, rounds=500, ...)`.

    Typed: a misspelled field fails where the preset is defined (TypeError), and so does a field
    that has a CLI default of its own (only fields that default to `None`, "the task's preset",
    take preset values).
    """
    own_defaults = [f.name for f in fields(group) if f.name in values and f.default is not None]
    if own_defaults:
        raise TypeError(f"{group.__name__} fields {own_defaults} have their own default; a task preset sets only "
                        f"the fields that default to None")
    return group(**values)


def preset_values(preset: Any) -> dict[str, Any]:
    """The fields a preset sets, as a dict: those that default to `None` ("the task's preset") and hold a value."""
    return {f.name: getattr(preset, f.name) for f in fields(preset)
            if f.default is None and getattr(preset, f.name) is not None}


def resolve_args(preset: Group, args: Group) -> Group:
    """`args` with its `None` fields taken from a task preset of the same group (`preset(FLArgs, ...)`)."""
    if type(preset) is not type(args):
        raise TypeError(f"a {type(args).__name__} takes a {type(args).__name__} preset, got {type(preset).__name__}")
    return replace(args, **{name: value for name, value in preset_values(preset).items()
                            if getattr(args, name) is None})


# ---- validation helpers: each returns the problem as one line (or None), in the CLI's words ----

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(option: str, value: Any) -> str | None:
    """`option` must be a finite number > 0 (None: not set, fine)."""
    if value is None or (_is_number(value) and value > 0):
        return None
    return f"{option} must be > 0, got {value!r}"


def check_non_negative(option: str, value: Any) -> str | None:
    """`option` must be a finite number >= 0 (None: not set, fine)."""
    if value is None or (_is_number(value) and value >= 0):
        return None
    return f"{option} must be >= 0, got {value!r}"


def check_int(option: str, value: Any, minimum: int, maximum: int | None = None, hint: str = "") -> str | None:
    """`option` must be an integer in `minimum..maximum` (no maximum: `>= minimum`; None: not set, fine)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and minimum <= value
                         and (maximum is None or value <= maximum)):
        return None
    rule = f"an integer >= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
    return f"{option} must be {rule}{f' ({hint})' if hint else ''}, got {value!r}"


def check_choice(option: str, value: Any, allowed: Sequence[str], what: str, hint: str = "") -> str | None:
    """`option` must be one of `allowed` (None: not set, fine); `what` names the value, e.g. "source for task 'x'"."""
    if value is None or value in allowed:
        return None
    return f"{option}={value!r}: unknown {what}{f' ({hint})' if hint else ''}; allowed: {', '.join(allowed)}"


def check_finite(option: str, value: Any, positive: bool) -> str | None:
    """`option` must be a finite number > 0 (`positive`) or >= 0."""
    if _is_number(value) and value >= 0 and not (positive and value == 0):
        return None
    return f"{option} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}"


def check_argument(owner: object, name: str, check: Callable[..., str | None], value: Any, *args: Any,
                   **kwargs: Any) -> None:
    """Runs one of the checks above on a component's constructor argument; raises `ComponentError` on a problem.

    `check_argument(self, "beta", check_finite, beta, positive=False)` raises
    `TrimmedMean beta must be a finite number >= 0, got -0.1`, which the CLI names as `--aggregator.beta`.
    """
    if problem := check(f"{type(owner).__name__} {name}", value, *args, **kwargs):
        raise ComponentError(type(owner).__name__, name, problem)


def raise_problems(problems: Iterable[str | None]) -> None:
    """Raises one `ConfigError` naming every problem, one line each (`None`s are skipped); none: returns."""
    found = [problem for problem in problems if problem]
    if found:
        raise ConfigError(found[0] if len(found) == 1 else f"invalid settings: {'; '.join(found)}")


def validate_args(fl: FLArgs, client: ClientArgs, task_name: str) -> None:
    """Checks the resolved settings; raises one `ConfigError` listing every problem."""
    problems: list[str | None] = []
    for group, args in (("fl", fl), ("client", client)):
        for f in fields(args):
            if getattr(args, f.name) is None:
                problems.append(f"--{group}.{f.name} has no value and task {task_name!r} has no preset for it")
    problems += [check_positive(f"--fl.{name}", getattr(fl, name))
                 for name in ("rounds", "num_clients", "clients_per_round", "server_lr", "eval_batch_size")]
    problems += [check_non_negative(f"--fl.{name}", getattr(fl, name))
                 for name in ("eval_every", "checkpoint_every", "eval_subset")]
    problems += [check_positive(f"--client.{name}", getattr(client, name))
                 for name in ("lr", "local_epochs", "batch_size")]
    problems += [check_non_negative(f"--client.{name}", getattr(client, name))
                 for name in ("momentum", "weight_decay", "grad_clip_norm")]
    if client.lr_decay is not None and not (_is_number(client.lr_decay) and 0 < client.lr_decay <= 1):
        problems.append(f"--client.lr_decay must be in (0, 1], got {client.lr_decay!r}")
    if fl.num_clients and fl.clients_per_round and fl.clients_per_round > fl.num_clients:
        problems.append(f"--fl.clients_per_round={fl.clients_per_round} is larger than "
                        f"--fl.num_clients={fl.num_clients}; it must be in 1..{fl.num_clients}")
    raise_problems(problems)


def component_config(obj: Any) -> dict[str, Any]:
    """`{class_path, init_args}` of an aggregator or callback, read back from its attributes.

    Components store each constructor argument under an attribute of the same name; a nested
    component (e.g. the inner aggregator of norm clipping) is described recursively.
    """
    cls = type(obj)
    init_args = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not hasattr(obj, name):
            raise TypeError(f"{cls.__name__} must store its constructor argument {name!r} as an attribute")
        value = getattr(obj, name)
        init_args[name] = component_config(value) if hasattr(value, "__dict__") and not isinstance(
            value, type) else value
    # A class exported by `fl_lightning.callbacks` is written by that name, which stays valid when modules
    # move. Looked up among the loaded modules: the engine never imports the component library itself.
    library = sys.modules.get("fl_lightning.callbacks")
    exported = library is not None and getattr(library, cls.__name__, None) is cls
    path = f"fl_lightning.callbacks.{cls.__name__}" if exported else f"{cls.__module__}.{cls.__qualname__}"
    return {"class_path": path, "init_args": init_args}


def component_from_config(config: Any) -> Any:
    """The component a `component_config` dict describes, built again (nested ones too); other values as they are."""
    if not (isinstance(config, dict) and "class_path" in config):
        return config
    module, _, name = config["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{key: component_from_config(value) for key, value in config.get("init_args", {}).items()})


def group_dict(args: Any) -> dict[str, Any]:
    """A dataclass group as a plain dict (for config.yaml and W&B)."""
    return asdict(args)


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config to dotted keys (`fl.rounds`), the same keys the sweeps use."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat
