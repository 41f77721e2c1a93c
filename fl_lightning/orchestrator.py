"""The Fabric orchestrator: `fit` (train a federated model) and `validate` (evaluate a checkpoint).

One process per device (Fabric DDP; gloo on CPU, NCCL on GPUs; also under `fabric run` and
`torchrun`). Each process holds the task's one model and the full data, trains its share of the
round's clients, and takes part in the gather; every process then holds the same updates,
aggregates them the same way, and applies rank 0's result. `run_rounds` is the round on one
screen; everything else here is setup and measurement.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Literal

import torch
import yaml
from lightning.fabric import Fabric
from torch import Tensor

from fl_lightning.aggregation import Aggregate, Aggregator, FedAvg
from fl_lightning.batched import BatchedTrainer, check_vmap_support
from fl_lightning.checkpoint import CHECKPOINT_NAME, MODEL_NAME, find_checkpoint, load_checkpoint, save_checkpoint
from fl_lightning.client import (
    ClientUpdate,
    LocalTraining,
    RoundPlan,
    RoundUpdates,
    client_lr,
    evaluation_sums,
    flat_params,
    load_flat_params_,
    lr_scale,
    train_client,
)
from fl_lightning.config import (
    ClientArgs,
    ConfigError,
    DataArgs,
    FLArgs,
    LogArgs,
    component_config,
    flatten_config,
    group_dict,
    validate_args,
)
from fl_lightning.data import DataError, resolve_data_dir
from fl_lightning.distributed import UpdateGatherer, all_reduce_sum, broadcast_json, broadcast_tensor_
from fl_lightning.hooks import FLCallback
from fl_lightning.loggers import MetricsCSV, RoundProgress, make_wandb_logger
from fl_lightning.metrics import reject_non_finite, round_metrics
from fl_lightning.runtime import tune_malloc
from fl_lightning.sampling import client_seed, sample_clients, server_seed, slots_for_rank
from fl_lightning.task import FederatedData, Task, TaskName, TaskSettings

Precision = Literal["32-true", "bf16-mixed"]


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
) -> None:
    """Trains a federated model on a task, with optional attacks (callbacks) and defenses (aggregator).

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
    """
    if malloc_tuning:
        tune_malloc()
    task_cls = Task.by_name(task)
    fl, client, data = task_cls.resolve_presets(fl, client, data)
    validate_args(fl, client, task)
    if client.batching == "vmap":
        check_vmap_support(task_cls)
    try:
        root = resolve_data_dir(data_dir)
    except DataError as err:
        raise ConfigError(str(err)) from err
    for option, path in (("--resume", resume), ("--init_from", init_from)):
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{option} {path!r} does not exist")
    if resume is not None and not (Path(resume) / CHECKPOINT_NAME).is_file():
        raise ConfigError(f"--resume {resume!r} holds no {CHECKPOINT_NAME} (was a checkpoint written yet?)")
    if resume is None and name is not None and (Path(out_dir) / name / CHECKPOINT_NAME).exists():
        raise ConfigError(f"run directory {Path(out_dir) / name} already holds a run; continue it with "
                          f"--resume {Path(out_dir) / name} or choose another --name")
    aggregator = aggregator if aggregator is not None else FedAvg()
    callbacks = list(callbacks or [])
    config = {
        "task": task, "model": model, "data": group_dict(data), "fl": group_dict(fl), "client": group_dict(client),
        "aggregator": component_config(aggregator), "callbacks": [component_config(c) for c in callbacks],
        "log": group_dict(log), "seed": seed, "data_dir": data_dir, "out_dir": out_dir, "init_from": init_from,
        "accelerator": accelerator, "devices": devices, "num_nodes": num_nodes, "precision": precision,
        "num_threads": num_threads, "malloc_tuning": malloc_tuning,
    }
    settings = TaskSettings(data_dir=root, num_clients=fl.num_clients, seed=seed, model=model, data=data)
    task_cls.check_settings(settings)

    fabric = make_fabric(accelerator, devices, num_nodes, precision, callbacks)
    set_threads(num_threads, devices)
    torch.manual_seed(seed)  # the initial model: the same for a seed on every rank and every run
    run = Run.setup(fabric, task_cls(settings), fl, client, aggregator, seed)
    run_dir = Path(resume) if resume else Path(out_dir) / broadcast_json(fabric, name or default_name(task, out_dir))
    state = run.initial_state(run_dir, resume, init_from)
    run.open_outputs(run_dir, config, log, resumed_round=state.round_idx if resume else None,
                     wandb_id=state.wandb_id)
    try:
        fabric.call("on_fit_start", task=run.task, data=run.data, fabric=fabric, seed=seed)
        for callback, callback_state in zip(callbacks, state.callback_states):
            callback.load_state_dict(callback_state)
        if state.round_idx == 0 and fl.eval_every > 0:
            run.log_round(0, run.evaluate(state.global_params) | {"seconds": 0.0})
        run_rounds(run, state)
        fabric.call("on_fit_end")
        run.save_model(state)
    finally:
        run.close_outputs()
        teardown(fabric)


@dataclass
class RunState:
    """What a checkpoint holds: the round last completed and the flat global model."""

    round_idx: int
    global_params: Tensor
    wandb_id: str | None = None
    callback_states: tuple[dict, ...] = ()


def run_rounds(run: Run, state: RunState) -> None:
    """The federated rounds: select, train locally, gather, aggregate, apply, measure, persist."""
    fabric, fl = run.fabric, run.fl
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
        # 3. Gather: every rank now holds the same updates, in slot order.
        updates = run.gather_updates(local, len(plan.client_ids), state.global_params.numel(),
                                     state.global_params.dtype)
        # 4. Aggregate: non-finite updates are rejected, never averaged in.
        updates, rejected = reject_non_finite(updates)
        fabric.call("on_before_aggregate", updates=updates, round_idx=round_idx)
        aggregate = run.aggregate(updates, round_idx)
        fabric.call("on_after_aggregate", aggregate=aggregate, round_idx=round_idx)
        # 5. Apply, then make rank 0's result everyone's.
        aggregate.apply_(state.global_params, fl.server_lr)
        broadcast_tensor_(fabric, state.global_params)
        state.round_idx = round_idx
        # 6. Measure.
        metrics = round_metrics(updates, aggregate, len(rejected)) | {"lr": client_lr(run.client, round_idx)}
        if is_due(round_idx, fl.eval_every, fl.rounds):
            metrics |= run.evaluate(state.global_params)
        metrics["seconds"] = time.perf_counter() - started
        fabric.call("on_round_end", round_idx=round_idx, metrics=metrics)
        run.log_round(round_idx, metrics, rejected)
        # 7. Persist.
        if is_due(round_idx, fl.checkpoint_every, fl.rounds):
            run.save_checkpoint(state)


def is_due(round_idx: int, every: int, last_round: int) -> bool:
    """Whether a periodic action (eval, checkpoint) runs after this round; always after the last."""
    return round_idx == last_round or (every > 0 and round_idx % every == 0)


class Run:
    """One process's view of a run: Fabric, the task and its data on the device, and the outputs."""

    def __init__(self, fabric: Fabric, task: Task, data: FederatedData, fl: FLArgs, client: ClientArgs,
                 aggregator: Aggregator, seed: int) -> None:
        self.fabric, self.task, self.data = fabric, task, data
        self.fl, self.client, self.aggregator, self.seed = fl, client, aggregator, seed
        # Per-step hooks cost a signature inspection per call: only call them if someone listens.
        self.step_hooks = any(type(c).on_after_optimizer_step is not FLCallback.on_after_optimizer_step
                              for c in fabric._callbacks)
        rank, world = fabric.global_rank, fabric.world_size
        # Evaluation is sharded by index over ranks; counts are summed, so no sample is seen twice.
        self.eval_sets = {"main": (data.test_inputs[rank::world].contiguous(),
                                   data.test_targets[rank::world].contiguous())}
        if data.backdoor_inputs is not None:
            self.eval_sets["backdoor"] = (data.backdoor_inputs[rank::world].contiguous(),
                                          data.backdoor_targets[rank::world].contiguous())
        # The batched trainer checks the built model (BatchNorm, vmap-able ops) before the first round.
        self.batched: BatchedTrainer | None = None
        if client.batching == "vmap":
            self.batched = BatchedTrainer(fabric, task)
            self.batched.probe(data.train_inputs[:2], data.train_targets[:2])
        self.gather_updates = UpdateGatherer(fabric)
        self.metrics_csv: MetricsCSV | None = None
        self.wandb = None
        self.progress: RoundProgress | None = None
        self.run_dir = Path(".")

    @classmethod
    def setup(cls, fabric: Fabric, task: Task, fl: FLArgs, client: ClientArgs, aggregator: Aggregator,
              seed: int) -> Run:
        """Prepares data (rank 0 first, so a download happens once), builds it and moves it to the device."""
        with fabric.rank_zero_first():
            task.prepare_data()
            data = task.build_data()
        if data.num_clients != fl.num_clients:
            raise ConfigError(f"task {task.name!r} built {data.num_clients} clients, expected "
                              f"--fl.num_clients={fl.num_clients}")
        task.to(fabric.device)
        return cls(fabric, task, data.to(fabric.device), fl, client, aggregator, seed)

    def initial_state(self, run_dir: Path, resume: str | None, init_from: str | None) -> RunState:
        """Round 0 from the seeded initialisation (or `init_from`), or the checkpoint of a resumed run."""
        global_params = flat_params(self.task)
        state = RunState(round_idx=0, global_params=global_params)
        source = resume or init_from
        if source is not None:
            params, saved = load_checkpoint(find_checkpoint(run_dir / CHECKPOINT_NAME if resume else source))
            if params.numel() != global_params.numel():
                raise ConfigError(f"{source} holds {params.numel()} parameters; task {self.task.name!r} with this "
                                  f"model has {global_params.numel()}")
            state.global_params = params.to(self.fabric.device, torch.float32)
            if resume:
                state.round_idx, state.wandb_id = saved["round_idx"], saved.get("wandb_id")
                state.callback_states = tuple(saved.get("callbacks", ()))
        broadcast_tensor_(self.fabric, state.global_params)
        return state

    def train_local(self, plan: RoundPlan, slots: list[int], global_params: Tensor) -> list[ClientUpdate]:
        """This rank's clients of the round, trained one after another or batched (`--client.batching vmap`)."""
        contexts = (self.client_context(plan, slot, global_params) for slot in slots)
        if self.batched is not None:
            return self.batched.train(list(contexts), self.step_hooks)
        return [train_client(self.fabric, self.task, ctx, self.step_hooks) for ctx in contexts]

    def client_context(self, plan: RoundPlan, slot: int, global_params: Tensor) -> LocalTraining:
        """The local-training context of one slot, with randomness from (seed, round, client, slot)."""
        client_id, client = plan.client_ids[slot], self.client
        inputs, targets = self.data.client_data(client_id)
        seed = client_seed(self.seed, plan.round_idx, client_id, slot)
        return LocalTraining(
            round_idx=plan.round_idx, slot=slot, client_id=client_id, is_adversary=plan.is_adversary[slot],
            model=self.task, global_params=global_params, inputs=inputs, targets=targets,
            lr=client_lr(client, plan.round_idx), lr_scale=lr_scale(client, plan.round_idx),
            epochs=client.local_epochs, batch_size=client.batch_size,
            momentum=client.momentum, weight_decay=client.weight_decay, grad_clip_norm=client.grad_clip_norm,
            seed=seed, generator=torch.Generator().manual_seed(seed))

    def aggregate(self, updates: RoundUpdates, round_idx: int) -> Aggregate:
        """The aggregator's result; a zero step when every update was rejected."""
        if updates.deltas.shape[0] == 0:
            return Aggregate(update=torch.zeros(updates.deltas.shape[1], device=updates.deltas.device),
                             client_weights=None)
        generator = torch.Generator().manual_seed(server_seed(self.seed, round_idx))
        return self.aggregator(updates.deltas, updates.num_examples, generator)

    @torch.no_grad()
    def evaluate(self, global_params: Tensor) -> dict[str, float]:
        """Main-task and backdoor accuracy (and loss) of the global model, sharded over ranks."""
        started = time.perf_counter()
        load_flat_params_(self.task, global_params)
        metrics = {}
        for split, (inputs, targets) in self.eval_sets.items():
            sums = evaluation_sums(self.fabric, self.task, inputs, targets, self.fl.eval_batch_size)
            totals = all_reduce_sum(self.fabric, sums)
            metrics[f"{split}_acc"] = totals["correct"] / max(totals["total"], 1.0)
            metrics[f"{split}_loss"] = totals["loss_sum"] / max(totals["total"], 1.0)
        metrics.pop("backdoor_loss", None)  # the loss towards the attacker's labels says nothing new
        metrics["eval_seconds"] = time.perf_counter() - started  # part of the round's `seconds`
        return metrics

    # ----- outputs (rank 0 writes; every rank calls, so collectives stay symmetric) -----

    def open_outputs(self, run_dir: Path, config: dict, log: LogArgs, resumed_round: int | None,
                     wandb_id: str | None) -> None:
        self.run_dir = run_dir
        if not self.fabric.is_global_zero:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "config.yaml", "w") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)
        for file_name, source in self.task.artifacts().items():
            shutil.copy2(source, run_dir / file_name)
        if log.logger != "none":
            self.metrics_csv = MetricsCSV(run_dir / "metrics.csv", resume_round=resumed_round)
        self.wandb = make_wandb_logger(log, run_dir, run_dir.name, wandb_id)
        if self.wandb is not None and resumed_round is None:
            self.wandb.log_hyperparams(flatten_config(config))
        self.progress = RoundProgress(self.fl.rounds, resumed_round or 0, log.progress_bar, self.task.name)
        print(f"run directory: {run_dir}  ({self.fabric.world_size} process(es), {self.fabric.device})",
              file=sys.stderr)

    def log_round(self, round_idx: int, metrics: dict[str, float], rejected: list[int] = ()) -> None:
        if not self.fabric.is_global_zero:
            return
        if rejected:
            print(f"round {round_idx}: rejected non-finite updates of clients {rejected}", file=sys.stderr)
        if self.metrics_csv is not None:
            self.metrics_csv.append({"round": round_idx, **metrics})
        if self.wandb is not None:
            self.wandb.log_metrics({wandb_key(k): v for k, v in metrics.items()}, step=round_idx)
        if self.progress is not None and round_idx > 0:
            self.progress.update(round_idx, metrics)

    def checkpoint_state(self, state: RunState) -> dict:
        wandb_id = self.wandb.version if self.wandb is not None else state.wandb_id
        return {"round_idx": state.round_idx, "task": self.task.name, "wandb_id": wandb_id,
                "callbacks": [c.state_dict() if hasattr(c, "state_dict") else {} for c in self.fabric._callbacks]}

    def save_checkpoint(self, state: RunState) -> None:
        if self.fabric.is_global_zero:
            save_checkpoint(self.run_dir / CHECKPOINT_NAME, state.global_params, self.checkpoint_state(state))
        self.fabric.barrier()

    def save_model(self, state: RunState) -> None:
        """The final global model, loadable by `validate` and `--init_from`."""
        if self.fabric.is_global_zero:
            save_checkpoint(self.run_dir / MODEL_NAME, state.global_params, self.checkpoint_state(state))
            print(f"final model: {self.run_dir / MODEL_NAME}", file=sys.stderr)
        self.fabric.barrier()

    def close_outputs(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.wandb is not None:
            self.wandb.finalize("success")
            import wandb

            wandb.finish()


WANDB_GROUPS = {"main_acc": "val", "backdoor_acc": "val", "main_loss": "val", "adversary_weight": "agg",
                "num_adversaries": "agg", "rejected_updates": "agg", "aggregate_norm": "agg", "seconds": "time",
                "eval_seconds": "time", "lr": "train"}


def wandb_key(metric: str) -> str:
    """W&B panel name of a metric: `val/main_acc`, `train/loss_benign`, `update/norm_adv`, ..."""
    if metric in WANDB_GROUPS:
        return f"{WANDB_GROUPS[metric]}/{metric}"
    for group in ("train", "update"):
        if metric.startswith(group + "_"):
            return f"{group}/{metric[len(group) + 1:]}"
    return f"client/{metric}"


def validate(
    *,
    checkpoint: str,
    data_dir: str | None = None,
    accelerator: str = "auto",
    devices: int = 1,
    eval_batch_size: int | None = None,
) -> None:
    """Evaluates a saved global model: main-task and backdoor accuracy.

    Args:
        checkpoint: A run directory (its final model, else its last checkpoint) or a checkpoint file;
            the run's config.yaml beside it says which task and data to build.
        data_dir: Data root; None: the run's, else `$FL_LIGHTNING_DATA`, else `~/.cache/fl_lightning`.
        accelerator: `cpu`, `gpu`, `cuda` or `auto`.
        devices: Processes to shard the evaluation over.
        eval_batch_size: Evaluation batch size; None: the run's.
    """
    path = find_checkpoint(checkpoint)
    config_path = path.parent / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"no config.yaml beside {path}; validate needs the run's configuration")
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
        run = Run.setup(fabric, task_cls(settings), fl, ClientArgs(**config["client"]), FedAvg(), config["seed"])
        params, saved = load_checkpoint(path)
        metrics = run.evaluate(params.to(fabric.device))
        fabric.print(f"{path} (round {saved['round_idx']}): " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    finally:
        teardown(fabric)


def default_name(task: str, out_dir: str) -> str:
    """`<task>-<date>-<time>`, with a counter if that run directory exists already."""
    base = f"{task}-{datetime.now():%Y%m%d-%H%M%S}"
    name, counter = base, 1
    while (Path(out_dir) / name).exists():
        counter += 1
        name = f"{base}-{counter}"
    return name


def make_fabric(accelerator: str, devices: int, num_nodes: int, precision: str,
                callbacks: list[FLCallback] | None = None) -> Fabric:
    """A launched Fabric with one process per device; under `fabric run`, its command line decides.

    `fabric run` passes accelerator, devices, nodes and precision through `LT_*` variables and has
    started the processes already: Fabric refuses constructor values that disagree with the
    variables, and a second launch.
    """
    if os.environ.get("LT_CLI_USED") == "1":
        return Fabric(callbacks=callbacks)
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    strategy="ddp" if devices * num_nodes > 1 else "auto", precision=precision, callbacks=callbacks)
    fabric.launch()
    return fabric


def set_threads(num_threads: int | None, devices: int) -> None:
    """CPU threads per process: the cores of this node shared evenly among its processes."""
    if num_threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # torchrun and `fabric run` say how many processes share this node; Fabric's own launcher uses `devices`.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", devices))
        num_threads = max(1, cores // max(1, local_processes))
    torch.set_num_threads(num_threads)


def teardown(fabric: Fabric) -> None:
    """Barrier, then destroy the process group: without it, DDP runs sometimes abort at exit."""
    if fabric.world_size > 1 and torch.distributed.is_initialized():
        fabric.barrier()
        torch.distributed.destroy_process_group()
