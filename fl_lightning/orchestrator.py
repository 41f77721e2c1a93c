"""The Fabric orchestrator: `fit` (train a federated model) and `validate` (evaluate a saved one).

`fit` reads top-down: `check_fit` resolves the task's presets and checks every setting (no
process, no file yet), `make_fabric` launches one process per device, `build` prepares the data,
the model, the outputs and the start state, and `run_rounds` runs the rounds, the round on one
screen, returning the per-round metrics.

One process per device (Fabric DDP; gloo on CPU, NCCL on GPUs; also under `fabric run` and
`torchrun`). Each process holds the task's one model and the full data, trains its share of the
round's clients, and takes part in the gather; every process then holds the same updates,
aggregates them the same way, and applies rank 0's result.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from dataclasses import dataclass, is_dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from lightning.fabric import Fabric
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator, FedAvg, RoundContext
from fl_lightning.batched import BatchedTrainer, check_vmap_support
from fl_lightning.checkpoint import (
    CHECKPOINT_NAME,
    MODEL_NAME,
    RunState,
    find_checkpoint,
    load_aggregator_state,
    load_checkpoint,
)
from fl_lightning.client import client_lr, lr_scale, train_client
from fl_lightning.config import (
    ClientArgs,
    ConfigError,
    DataArgs,
    FLArgs,
    LogArgs,
    component_config,
    component_from_config,
    group_dict,
    validate_args,
)
from fl_lightning.data import DataError, resolve_data_dir
from fl_lightning.distributed import UpdateGatherer, broadcast_json, broadcast_tensor_
from fl_lightning.evaluation import Evaluator
from fl_lightning.hooks import FLCallback
from fl_lightning.loggers import RunLogger
from fl_lightning.metrics import reject_non_finite, round_metrics, summary_lines
from fl_lightning.params import flat_params
from fl_lightning.runtime import make_fabric, set_threads, teardown, tune_malloc
from fl_lightning.sampling import client_seed, sample_clients, server_seed, slots_for_rank
from fl_lightning.server import ServerModel, split_test_rows
from fl_lightning.task import FederatedData, Task, TaskName, TaskSettings
from fl_lightning.types import ClientUpdate, LocalTraining, RoundPlan, RoundUpdates

Precision = Literal["32-true", "bf16-mixed"]
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


def fit(
    *,
    task: TaskName,
    model: str | None = None,
    data: DataArgs = DataArgs(),
    fl: FLArgs = FLArgs(),
    client: ClientArgs = ClientArgs(),
    aggregator: Aggregator | None = None,
    callbacks: list[FLCallback] | None = None,
    log: LogArgs = LogArgs(),
    seed: int = 0,
    data_dir: str | None = None,
    out_dir: str = "runs",
    name: str | None = None,
    resume: str | None = None,
    init_from: str | None = None,
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    precision: Precision = "32-true",
    num_threads: int | None = None,
    malloc_tuning: bool = True,
) -> list[dict[str, float]]:
    """Trains a federated model on a task, with optional attacks (callbacks) and defenses (aggregator).

    A task (`--task`, `tasks/`) brings its model, data and the paper's presets; attacks are FL callbacks
    (`--callbacks+=EdgeCaseAttack`, `callbacks/edge_case.py`) and defenses are aggregators over the
    stacked updates (`--aggregator Krum`, `callbacks/`). Every setting is checked before any process
    starts or any file is written (`check_fit`); a bad one ends in one `error:` line.

    Args:
        task: The task, by name; its presets are the paper's hyperparameters.
        model: A model variant of the task (capacity experiments), e.g. `vgg11`; None: the preset.
        data: Data source, partition and attack case.
        fl: Federated settings (rounds, K, m, evaluation and checkpoint cadence).
        client: Local training settings (a fresh SGD per client per round).
        aggregator: The server's aggregation rule (a defense), e.g. `Krum`; None: FedAvg.
        callbacks: Attacks and other FL callbacks, e.g. `--callbacks+=EdgeCaseAttack`.
        log: Logging (W&B, metrics.csv, progress bar).
        seed: Seed of everything: partition, client selection, local training, server noise.
        data_dir: Data root; None: `$FL_LIGHTNING_DATA`, else `~/.cache/fl_lightning`.
        out_dir: Runs are written to `<out_dir>/<name>/`.
        name: Run name; None: `<task>-<date>-<time>`.
        resume: A run directory to continue from its last checkpoint (its config.yaml is loaded first).
        init_from: Start from the global model of this checkpoint or run directory (e.g. a model
            trained without attack, as the paper does).
        accelerator: `cpu`, `gpu`, `cuda` or `auto`.
        devices: Processes (devices) per node.
        num_nodes: Nodes (multi-node through torchrun or SLURM).
        precision: `32-true` (the paper's) or `bf16-mixed` (autocast in local training and evaluation).
        num_threads: CPU threads per process; None: the cores divided by the processes on this node.
            Bitwise equality across process counts on CPU needs the same value in both runs.
        malloc_tuning: Keep freed activation buffers in the heap (glibc `mallopt`; about 20 % faster
            rounds on CPUs). Skipped when any `MALLOC_*` variable is set.

    Returns:
        The run's history: one metrics dict per round run here (`round` included; round 0, the
        start model, when a new run evaluates it), the rows of `metrics.csv`.
    """
    plan = check_fit(**locals())  # every setting, before any process starts or any file is written
    if malloc_tuning:
        tune_malloc()
    fabric = make_fabric(accelerator, devices, num_nodes, precision, plan.callbacks)
    set_threads(num_threads, devices)
    try:
        run, state = build(fabric, plan)
        try:
            fabric.call("on_fit_start", task=run.task, data=run.data, fabric=fabric, seed=seed)
            for callback, callback_state in zip(plan.callbacks, state.callback_states):
                callback.load_state_dict(callback_state)
            history = []
            if state.round_idx == 0 and plan.fl.eval_every > 0:
                history.append(run.log_round(0, run.evaluate(state.global_params) | {"seconds": 0.0}))
            history += run_rounds(run, state)
            fabric.call("on_fit_end")
            run.save(state, MODEL_NAME)
            if fabric.global_rank == 0:
                print("\n".join(summary_lines(history)), file=sys.stderr)
        finally:
            run.logger.close()
    finally:
        teardown(fabric)
    return history


@dataclass
class FitPlan:
    """`fit`'s settings with the task's presets filled in and every one checked (`check_fit`).

    Attributes:
        task_cls: The task class.
        settings: What the task is built from.
        fl: Federated settings, resolved.
        client: Local training settings, resolved.
        aggregator: The aggregation rule (FedAvg when none was given).
        callbacks: The FL callbacks.
        log: Logging settings.
        seed: The run seed.
        run_dir: The run directory, or None for a new run without `--name` (rank 0 names it at launch).
        resume: Whether the run continues from `run_dir`'s checkpoint.
        init_from: A checkpoint or run directory to start from.
        config: The resolved configuration, as `config.yaml` holds it.
    """

    task_cls: type[Task]
    settings: TaskSettings
    fl: FLArgs
    client: ClientArgs
    aggregator: Aggregator
    callbacks: list[FLCallback]
    log: LogArgs
    seed: int
    run_dir: Path | None
    resume: bool
    init_from: str | None
    config: dict[str, Any]


def check_fit(**kwargs: Any) -> FitPlan:
    """Resolves the task's presets and checks every setting of `fit` (same keywords) without side effects.

    `fit` calls it first; `sweep` calls it for every planned run before starting the first.

    Raises:
        ConfigError: One line naming the first bad option and what is allowed.
    """
    bound = inspect.signature(fit).bind(**kwargs)
    bound.apply_defaults()
    args = bound.arguments
    task_cls = Task.by_name(args["task"])
    fl, client, data = task_cls.resolve_presets(args["fl"], args["client"], args["data"])
    validate_args(fl, client, args["task"])
    check_launch(args["accelerator"], args["devices"], args["num_nodes"], args["num_threads"])
    if client.batching == "vmap":
        check_vmap_support(task_cls)
    try:
        root = resolve_data_dir(args["data_dir"])
    except DataError as err:
        raise ConfigError(str(err)) from err
    settings = TaskSettings(data_dir=root, num_clients=fl.num_clients, seed=args["seed"], model=args["model"],
                            data=data)
    task_cls.check_settings(settings)
    aggregator = args["aggregator"] if args["aggregator"] is not None else FedAvg()
    callbacks = list(args["callbacks"] or [])
    aggregator.check_run(fl)
    for callback in callbacks:
        callback.check_run(fl)
    resume, init_from, out_dir, name = args["resume"], args["init_from"], args["out_dir"], args["name"]
    for option, path in (("--resume", resume), ("--init_from", init_from)):
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{option}={path}: does not exist (give a run directory or a checkpoint file)")
    if resume is not None and not (Path(resume) / CHECKPOINT_NAME).is_file():
        raise ConfigError(f"--resume={resume}: holds no {CHECKPOINT_NAME} (was a checkpoint written yet?)")
    if resume is None and name is not None and (Path(out_dir) / name / CHECKPOINT_NAME).exists():
        raise ConfigError(f"run directory {Path(out_dir) / name} already holds a run; continue it with "
                          f"--resume {Path(out_dir) / name} or choose another --name")
    resolved = {**args, "fl": fl, "client": client, "data": data, "aggregator": aggregator}
    config = {key: as_config_value(value) for key, value in resolved.items() if key not in ("name", "resume")}
    run_dir = Path(resume) if resume else (Path(out_dir) / name if name else None)
    return FitPlan(task_cls=task_cls, settings=settings, fl=fl, client=client, aggregator=aggregator,
                   callbacks=callbacks, log=args["log"], seed=args["seed"], run_dir=run_dir,
                   resume=resume is not None, init_from=init_from, config=config)


def as_config_value(value: Any) -> Any:
    """A `fit` argument as `config.yaml` holds it: groups as dicts, components as `{class_path, init_args}`."""
    if is_dataclass(value):
        return group_dict(value)
    if isinstance(value, list):
        return [as_config_value(item) for item in value]
    if isinstance(value, (Aggregator, FLCallback)):
        return component_config(value)
    return value


def check_launch(accelerator: str, devices: int, num_nodes: int, num_threads: int | None) -> None:
    """Checks the process settings before Fabric sees them (its own errors come as tracebacks)."""
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"--accelerator={accelerator}: must be one of {', '.join(ACCELERATORS)}")
    for option, value in (("--devices", devices), ("--num_nodes", num_nodes), ("--num_threads", num_threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{option}={value}: must be an integer >= 1")
    if accelerator in ("gpu", "cuda") and os.environ.get("LT_CLI_USED") != "1":
        available = torch.cuda.device_count()
        if available < devices:
            raise ConfigError(f"--accelerator={accelerator} --devices={devices}: {available} CUDA device(s) visible; "
                              f"use --accelerator cpu or fewer --devices")


def build(fabric: Fabric, plan: FitPlan) -> tuple[Run, RunState]:
    """Everything a run needs on this process: data and model, outputs, and the start (or resumed) state."""
    torch.manual_seed(plan.seed)  # the initial model: the same for a seed on every rank and every run
    task = plan.task_cls(plan.settings)
    with fabric.rank_zero_first():  # a download happens once
        task.prepare_data()
        data = task.build_data()
    if data.num_clients != plan.fl.num_clients:
        raise ConfigError(f"task {task.name!r} built {data.num_clients} clients, expected "
                          f"--fl.num_clients={plan.fl.num_clients}")
    try:
        split_test_rows(data.test_inputs.shape[0], plan.fl.eval_subset, plan.aggregator.server_examples)
    except ValueError as err:
        raise ConfigError(f"--fl.eval_subset={plan.fl.eval_subset} with --aggregator "
                          f"{type(plan.aggregator).__name__}: {err}") from None
    task.to(fabric.device)
    data = data.to(fabric.device)
    run_dir = plan.run_dir or Path(plan.config["out_dir"]) / broadcast_json(
        fabric, default_name(task.name, plan.config["out_dir"]))
    state = start_state(fabric, task, run_dir, plan)
    logger = RunLogger(run_dir, plan.config, plan.log, task.artifacts(), plan.fl.rounds, task.name,
                       resumed_round=state.round_idx if plan.resume else None, wandb_id=state.wandb_id,
                       enabled=fabric.is_global_zero)
    if fabric.is_global_zero:
        print(f"run directory: {run_dir}  ({fabric.world_size} process(es), {fabric.device})", file=sys.stderr)
    run = Run(fabric, task, data, plan.fl, plan.client, plan.aggregator, plan.callbacks, plan.seed, run_dir, logger)
    return run, state


def start_state(fabric: Fabric, task: Task, run_dir: Path, plan: FitPlan) -> RunState:
    """Round 0 from the seeded initialisation (or `init_from`), or the checkpoint of a resumed run."""
    global_params = flat_params(task)
    state = RunState(round_idx=0, global_params=global_params)
    source = str(run_dir) if plan.resume else plan.init_from
    if source is not None:
        params, saved = load_checkpoint(find_checkpoint(run_dir / CHECKPOINT_NAME if plan.resume else source))
        if params.numel() != global_params.numel():
            raise ConfigError(f"{source} holds {params.numel()} parameters; task {task.name!r} with this "
                              f"model has {global_params.numel()}")
        state.global_params = params.to(fabric.device, torch.float32)
        if plan.resume:
            state.round_idx, state.wandb_id = saved["round_idx"], saved.get("wandb_id")
            state.callback_states = tuple(saved.get("callbacks", ()))
            plan.aggregator.load_state_dict(load_aggregator_state(find_checkpoint(run_dir / CHECKPOINT_NAME)))
    broadcast_tensor_(fabric, state.global_params)
    return state


def run_rounds(run: Run, state: RunState) -> list[dict[str, float]]:
    """The federated rounds: select, train locally, gather, aggregate, apply, measure, persist.

    Returns:
        One metrics dict per round (`round` included), as logged.
    """
    fabric, fl, history = run.fabric, run.fl, []
    for round_idx in range(state.round_idx + 1, fl.rounds + 1):
        started = time.perf_counter()
        # 1. Select: pure in (seed, round); attack callbacks mark adversarial slots.
        plan = RoundPlan(round_idx, sample_clients(run.seed, round_idx, fl.num_clients, fl.clients_per_round),
                         [False] * fl.clients_per_round)
        fabric.call("on_round_start", round_idx=round_idx, plan=plan)
        # 2. Train locally: this rank's slots, one after another or batched (--client.batching).
        sizes = [run.data.partition.size(client_id) for client_id in plan.client_ids]  # balances the ranks' work
        my_slots = slots_for_rank(len(plan.client_ids), fabric.global_rank, fabric.world_size, sizes)
        local = run.train_local(plan, my_slots, state.global_params)
        # 3. Gather: every rank now holds the same updates, in slot order (the clients wrote them
        #    into the round buffer; on one machine the buffer is the result, with no copy).
        updates = run.gather(local, len(plan.client_ids), state.global_params.numel(), state.global_params.dtype)
        # 4. Aggregate: non-finite updates are rejected, never averaged in.
        updates, rejected, norms = reject_non_finite(updates)
        fabric.call("on_before_aggregate", updates=updates, round_idx=round_idx)
        aggregate = run.aggregate(updates, round_idx, state.global_params)
        fabric.call("on_after_aggregate", aggregate=aggregate, round_idx=round_idx)
        # 5. Apply, then make rank 0's result everyone's.
        aggregate.apply_(state.global_params, fl.server_lr)
        broadcast_tensor_(fabric, state.global_params)
        state.round_idx = round_idx
        # 6. Measure.
        # The norms measured before `on_before_aggregate`, unless a hook may have changed the rows.
        metrics = (round_metrics(updates, aggregate, len(rejected), None if run.gather.private else norms)
                   | {"lr": client_lr(run.client, round_idx)})
        run.gather.release()  # the last read of the round's updates: their buffer is free for the next round
        if is_due(round_idx, fl.eval_every, fl.rounds):
            metrics |= run.evaluate(state.global_params)
        metrics["seconds"] = time.perf_counter() - started
        fabric.call("on_round_end", round_idx=round_idx, metrics=metrics)
        history.append(run.log_round(round_idx, metrics, rejected))
        # 7. Persist.
        if is_due(round_idx, fl.checkpoint_every, fl.rounds):
            run.save(state, CHECKPOINT_NAME)
    return history


def is_due(round_idx: int, every: int, last_round: int) -> bool:
    """Whether a periodic action (eval, checkpoint) runs after this round; always after the last."""
    return round_idx == last_round or (every > 0 and round_idx % every == 0)


class Run:
    """One process's part of a run: the round's compute (local training, gather, aggregation) and its outputs.

    `build` makes it with the run directory and the logger; without them (tests) nothing is written.
    """

    def __init__(self, fabric: Fabric, task: Task, data: FederatedData, fl: FLArgs, client: ClientArgs,
                 aggregator: Aggregator, callbacks: list[FLCallback], seed: int, run_dir: Path | None = None,
                 logger: RunLogger | None = None) -> None:
        self.fabric, self.task, self.data = fabric, task, data
        self.fl, self.client, self.aggregator, self.callbacks, self.seed = fl, client, aggregator, callbacks, seed
        self.run_dir, self.logger = run_dir, logger
        # Per-step hooks cost a signature inspection per call: only call them if someone listens.
        self.step_hooks = any(type(c).on_after_optimizer_step is not FLCallback.on_after_optimizer_step
                              for c in callbacks)
        self.evaluate = Evaluator(fabric, task, data, fl.eval_batch_size, main_subset=fl.eval_subset,
                                  server_examples=aggregator.server_examples)
        _, server_rows = split_test_rows(data.test_inputs.shape[0], fl.eval_subset, aggregator.server_examples)
        self.server = ServerModel.build(fabric, task, data, client, server_rows)
        # `on_before_aggregate` may change rows in place: on every rank, so not in shared memory.
        self.gather = UpdateGatherer(fabric, private=any(
            type(c).on_before_aggregate is not FLCallback.on_before_aggregate for c in callbacks))
        # The batched trainer checks the built model (BatchNorm, vmap-able ops) before the first round.
        self.batched: BatchedTrainer | None = None
        if client.batching == "vmap":
            self.batched = BatchedTrainer(fabric, task)
            self.batched.probe(data.train_inputs[:2], data.train_targets[:2])

    def train_local(self, plan: RoundPlan, slots: list[int], global_params: Tensor) -> list[ClientUpdate]:
        """This rank's clients of the round, trained one after another or batched (`--client.batching vmap`)."""
        rows = self.gather.rows(slots, len(plan.client_ids), global_params.numel(), global_params.dtype)
        contexts = [self.client_context(plan, slot, global_params, row) for slot, row in zip(slots, rows)]
        if self.batched is not None:
            return self.batched.train(contexts)
        return [train_client(self.fabric, self.task, ctx) for ctx in contexts]

    def client_context(self, plan: RoundPlan, slot: int, global_params: Tensor,
                       delta_out: Tensor | None = None) -> LocalTraining:
        """The local-training context of one slot, with randomness from (seed, round, client, slot);
        its update is written into `delta_out` (its row of the round buffer) when given."""
        client_id, client = plan.client_ids[slot], self.client
        inputs, targets = self.data.client_data(client_id)
        seed = client_seed(self.seed, plan.round_idx, client_id, slot)
        return LocalTraining(
            round_idx=plan.round_idx, slot=slot, client_id=client_id, is_adversary=plan.is_adversary[slot],
            model=self.task, global_params=global_params, inputs=inputs, targets=targets,
            lr=client_lr(client, plan.round_idx), lr_scale=lr_scale(client, plan.round_idx),
            epochs=client.local_epochs, batch_size=client.batch_size,
            momentum=client.momentum, weight_decay=client.weight_decay, grad_clip_norm=client.grad_clip_norm,
            seed=seed, generator=torch.Generator().manual_seed(seed), step_hooks=self.step_hooks, delta_out=delta_out)

    def aggregate(self, updates: RoundUpdates, round_idx: int, global_params: Tensor) -> Aggregate:
        """The aggregator's result; a zero step when every update was rejected."""
        if updates.deltas.shape[0] == 0:
            return Aggregate(update=torch.zeros(updates.deltas.shape[1], device=updates.deltas.device),
                             client_weights=None)
        generator = torch.Generator().manual_seed(server_seed(self.seed, round_idx))
        self.aggregator.begin_round(RoundContext(round_idx, updates.client_ids.cpu(), global_params,
                                                 self.server.at_round(round_idx)))
        return self.aggregator(updates.deltas, updates.num_examples, generator)

    def log_round(self, round_idx: int, metrics: dict[str, float], rejected: list[int] = ()) -> dict[str, float]:
        """Logs a round (rank 0) and returns its history row."""
        if self.logger is not None:
            self.logger.log_round(round_idx, metrics, rejected)
        return {"round": round_idx, **metrics}

    def save(self, state: RunState, file_name: str) -> None:
        """A checkpoint (`CHECKPOINT_NAME`, resumable) or the final model (`MODEL_NAME`), written by rank 0."""
        if self.fabric.is_global_zero and self.run_dir is not None:
            state.wandb_id = self.logger.wandb_id if self.logger is not None else state.wandb_id
            state.callback_states = tuple(c.state_dict() for c in self.callbacks)
            state.aggregator_state = self.aggregator.state_dict()
            state.save(self.run_dir / file_name, self.task.name)
            if file_name == MODEL_NAME:
                print(f"final model: {self.run_dir / MODEL_NAME}", file=sys.stderr)
        self.fabric.barrier()


def validate(
    *,
    checkpoint: str,
    data_dir: str | None = None,
    accelerator: str = "auto",
    devices: int = 1,
    eval_batch_size: int | None = None,
    smoothing_samples: int = 0,
    smoothing_sigma: float = 0.01,
    smoothing_alpha: float = 0.001,
    certify_attack_round: int | None = None,
    certify_attackers: int = 1,
    certify_weight: float | None = None,
    certify_scale: float = 1.0,
    certify_poison_fraction: float = 0.05,
    certify_local_steps: float | None = None,
    certify_lr: float | None = None,
    certify_lipschitz: float | None = None,
) -> dict[str, float]:
    """Evaluates a saved global model: main-task and backdoor accuracy, and optionally CRFL's parameter smoothing.

    Args:
        checkpoint: A run directory (its final model, else its last checkpoint) or a checkpoint file;
            the run's config.yaml beside it says which task and data to build.
        data_dir: Data root; None: the run's, else `$FL_LIGHTNING_DATA`, else `~/.cache/fl_lightning`.
        accelerator: `cpu`, `gpu`, `cuda` or `auto`.
        devices: Processes to shard the evaluation over.
        eval_batch_size: Evaluation batch size; None: the run's.
        smoothing_samples: M, the noisy models `w_T + N(0, σ_T^2 I)` whose majority vote is the smoothed
            prediction (CRFL, Xie et al., ICML 2021; the paper: 1000); 0: no smoothing.
        smoothing_sigma: σ_T, the smoothing noise per parameter (the paper: 0.01).
        smoothing_alpha: The certificate holds with probability 1 - α (Clopper-Pearson; the paper: 0.001).
        certify_attack_round: t_adv, the round of the attack the radius assumes; None: the checkpoint's
            round - 1 (the smallest radius).
        certify_attackers: R, the attackers in that round.
        certify_weight: p_i, each attacker's aggregation weight; None: 1 / the run's clients per round.
        certify_scale: γ, the attackers' scale factor (1: no boosting; the paper: 10 or 100).
        certify_poison_fraction: q_B / n_B, the share of backdoored examples in an attacker's batch (the paper: 0.05).
        certify_local_steps: τ, the attackers' local iterations; None: the run's local epochs × batches of a
            mean-sized client.
        certify_lr: η, their local learning rate; None: the run's round-1 lr.
        certify_lipschitz: L_Z, the Lipschitz constant of the loss gradient in the input; None: the CRFL
            reference's sqrt(2 + 2ρ + ρ^2) at ρ = ρ_{t_adv}.

    Returns:
        The metrics (`main_acc`, `main_loss`, `backdoor_acc`, `eval_seconds`); with smoothing also
        `smoothed_main_acc`, `smoothed_backdoor_acc`, `certified_main_acc` (correct and certified) and
        `certified_radius_mean` (the mean certified radius, 0 for wrong or abstained examples, and for runs
        not trained with CRFL), from `fl_lightning.callbacks.crfl`.
    """
    try:
        path = find_checkpoint(checkpoint)
    except FileNotFoundError as err:
        raise ConfigError(f"--checkpoint={checkpoint}: {err}") from None
    config_path = path.parent / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"--checkpoint={checkpoint}: no config.yaml beside {path}; validate needs the run's "
                          f"configuration")
    check_launch(accelerator, devices, 1, None)
    if eval_batch_size is not None and (isinstance(eval_batch_size, bool) or eval_batch_size < 1):
        raise ConfigError(f"--eval_batch_size={eval_batch_size}: must be an integer >= 1")
    from fl_lightning.callbacks.crfl import run_radius, smoothing_metrics, smoothing_problems
    from fl_lightning.config import raise_problems
    from fl_lightning.sampling import derive_seed

    certify = dict(attack_round=certify_attack_round, attackers=certify_attackers, weight=certify_weight,
                   scale=certify_scale, poison_fraction=certify_poison_fraction, local_steps=certify_local_steps,
                   lr=certify_lr, lipschitz=certify_lipschitz)
    raise_problems(smoothing_problems(smoothing_samples, smoothing_sigma, smoothing_alpha, **certify))
    with open(config_path) as handle:
        config = yaml.safe_load(handle)
    task_cls = Task.by_name(config["task"])
    fl = replace(FLArgs(**config["fl"]), eval_batch_size=eval_batch_size or config["fl"]["eval_batch_size"])
    data = DataArgs(**config["data"])
    try:
        root = resolve_data_dir(data_dir or config.get("data_dir"))
    except DataError as err:
        raise ConfigError(str(err)) from err
    settings = TaskSettings(data_dir=root, num_clients=fl.num_clients, seed=config["seed"], model=config["model"],
                            data=data)
    task_cls.check_settings(settings)
    fabric = make_fabric(accelerator, devices, 1, "32-true")
    try:
        torch.manual_seed(config["seed"])
        task = task_cls(settings)
        with fabric.rank_zero_first():
            task.prepare_data()
            built = task.build_data()
        task.to(fabric.device)
        params, saved = load_checkpoint(path)
        # The test rows a rule trained on at the server (FLTrust's root set) stay out, as in the run.
        aggregator = component_from_config(config.get("aggregator"))
        evaluator = Evaluator(fabric, task, built.to(fabric.device), fl.eval_batch_size,
                              server_examples=getattr(aggregator, "server_examples", 0))
        metrics = evaluator(params.to(fabric.device))
        if smoothing_samples:  # CRFL's parameter smoothing: same M noisy models on every rank, from the run's seed
            radius = run_radius(config, saved["round_idx"], built, smoothing_sigma, **certify)
            metrics |= smoothing_metrics(fabric, task, evaluator.sets, params.to(fabric.device, torch.float32),
                                         samples=smoothing_samples, sigma=smoothing_sigma, alpha=smoothing_alpha,
                                         seed=derive_seed(0xC4F1, config["seed"], saved["round_idx"]),
                                         batch_size=fl.eval_batch_size, radius=radius)
        fabric.print(f"{path} (round {saved['round_idx']}): " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    finally:
        teardown(fabric)
    return metrics


def default_name(task: str, out_dir: str) -> str:
    """`<task>-<date>-<time>`, with a counter if that run directory exists already."""
    base = f"{task}-{datetime.now():%Y%m%d-%H%M%S}"
    name, counter = base, 1
    while (Path(out_dir) / name).exists():
        counter += 1
        name = f"{base}-{counter}"
    return name
