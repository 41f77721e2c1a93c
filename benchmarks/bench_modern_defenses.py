"""Times the defenses published after the paper (issue 16) at the round sizes of the benchmarks, against FedAvg.

Each rule aggregates the same random updates (`bench_defenses.make_updates`); FoolsGold and any other
rule with a round context gets one (client ids 0..n-1, a zero global model), and keeps its state
across repeats as it would across rounds; FLDetector is timed once its window is full (its first
N + 1 rounds, untimed, detect nothing). FLTrust's aggregation is timed with a fixed server update
(a random vector); its server update itself trains the task's model, so `--server_update` times it
against one honest client's training on emnist (MNIST at the claims check's density and settings).
DeepSight is left out: it runs the task's model on random inputs, so its cost is forward passes
of a real model, not a function of these sizes (its timing is in `benchmarks/README.md`). Medians
over repeats, the rules taken in turn so that a slow spell of a shared machine hits all of them.
The target of issue 16: at most 0.5 s a round at
30 x 1,199,882 on 2 cores, a tenth of a W-EMNIST round.

Usage:
    python benchmarks/bench_modern_defenses.py                       # 30 x 1,199,882
    python benchmarks/bench_modern_defenses.py --sizes 30x1199882 100x10000000 --repeats 5
    python benchmarks/bench_modern_defenses.py --sizes --server_update     # FLTrust's server update only
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from bench_defenses import make_updates

from fl_lightning.aggregation import Aggregator, FedAvg, RoundContext
from fl_lightning.callbacks import CRFL, FLAME, Bulyan, FLDetector, FLTrust, FoolsGold, RobustLR


class FixedServer:
    """Stands in for `ServerModel` in FLTrust's aggregation timing: its update is given."""

    def __init__(self, update: torch.Tensor) -> None:
        self.update = update

    def train(self, params: torch.Tensor, seed: int) -> torch.Tensor:
        return self.update


def rules(n: int) -> dict[str, Aggregator]:
    return {"FedAvg": FedAvg(), "Bulyan (f=1)": Bulyan(num_adversaries=1), "FLAME": FLAME(),
            "RobustLR (θ=4)": RobustLR(threshold=min(4, n)), "FoolsGold": FoolsGold(),
            "FLTrust (aggregation)": FLTrust(), "FLDetector": FLDetector(), "CRFL": CRFL()}


def bench(n: int, n_params: int, repeats: int) -> list[tuple[str, float]]:
    deltas, weights = make_updates(n, n_params)
    server = FixedServer(deltas.mean(dim=0) + 0.1 * torch.randn(n_params, generator=torch.Generator().manual_seed(1)))
    candidates = rules(n)
    models = {name: torch.zeros(n_params) for name in candidates}  # each rule's global model, stepped by its rule
    rounds = dict.fromkeys(candidates, 0)

    def one_round(name: str) -> float:
        rule, rounds[name] = candidates[name], rounds[name] + 1
        # The example counts change every round, so the aggregate updates differ from round to round (as
        # FLDetector's window of update differences needs) without a second [n, n_params] copy.
        rule.begin_round(RoundContext(rounds[name], torch.arange(n), models[name], server))
        started = time.perf_counter()
        result = rule(deltas, weights + rounds[name], torch.Generator().manual_seed(rounds[name]))
        seconds = time.perf_counter() - started
        result.apply_(models[name], 1.0)
        return seconds

    for name, rule in candidates.items():  # rules that learn over a window are timed once it is full
        for _ in range(getattr(rule, "window", -1) + 1):
            one_round(name)
    timed: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name in candidates:
            timed.setdefault(name, []).append(one_round(name))
    return [(name, statistics.median(times)) for name, times in timed.items()]


def bench_server_update(repeats: int) -> tuple[float, float]:
    """Seconds of FLTrust's server update (100 root examples) and of one median emnist client's training."""
    import os

    from lightning.fabric import Fabric

    from fl_lightning.client import train_client
    from fl_lightning.config import ClientArgs, FLArgs, resolve_args
    from fl_lightning.orchestrator import Run
    from fl_lightning.params import flat_params
    from fl_lightning.tasks import get_task_class
    from fl_lightning.types import RoundPlan

    emnist = get_task_class("emnist")
    settings = emnist.make_settings(os.environ["FL_LIGHTNING_DATA"], num_clients=3383, seed=0, source="mnist", tile=4,
                                    edge_count=20, clean_count=30)
    fl = resolve_args(emnist.fl_preset, FLArgs(num_clients=3383, clients_per_round=10))
    client = resolve_args(emnist.client_preset, ClientArgs())
    task = emnist(settings)
    data = task.build_data()
    run = Run(Fabric(accelerator="cpu", devices=1), task, data, fl, client, FLTrust(), [], 0)
    params, sizes = flat_params(task), data.partition.sizes()
    median_client = int(sizes.argsort()[len(sizes) // 2])
    server_times, client_times = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        run.server.at_round(1).train(params, seed=0)
        server_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        train_client(run.fabric, task, run.client_context(RoundPlan(1, [median_client], [False]), 0, params))
        client_times.append(time.perf_counter() - started)
    return statistics.median(server_times), statistics.median(client_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["30x1199882"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--server_update", action="store_true", help="time FLTrust's server update on emnist")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.server_update:
        server, client = bench_server_update(args.repeats)
        print(f"\nFLTrust server update (100 root examples): {server:.3f} s; one median emnist client: {client:.3f} s")
    for size in args.sizes:
        n, n_params = (int(x) for x in size.split("x"))
        print(f"\n{n} x {n_params:,} (median of {args.repeats})\n\n| rule | seconds |\n|---|---|")
        for name, seconds in bench(n, n_params, args.repeats):
            print(f"| {name} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
