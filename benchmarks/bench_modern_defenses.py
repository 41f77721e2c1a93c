"""Times the defenses published after the paper (issue 16) at the round sizes of the benchmarks, against FedAvg.

Each rule aggregates the same random updates (`bench_defenses.make_updates`); FoolsGold and any other
rule with a round context gets one (client ids 0..n-1, a zero global model), and keeps its state
across repeats as it would across rounds. Medians over repeats, the rules taken in turn so that a slow
spell of a shared machine hits all of them. The target of issue 16: at most 0.5 s a round at
30 x 1,199,882 on 2 cores, a tenth of a W-EMNIST round.

Usage:
    python benchmarks/bench_modern_defenses.py                       # 30 x 1,199,882
    python benchmarks/bench_modern_defenses.py --sizes 30x1199882 100x10000000 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from bench_defenses import make_updates

from fl_lightning.aggregation import Aggregator, FedAvg, RoundContext
from fl_lightning.callbacks import FLAME, Bulyan, FoolsGold, RobustLR


def rules(n: int) -> dict[str, Aggregator]:
    return {"FedAvg": FedAvg(), "Bulyan (f=1)": Bulyan(num_adversaries=1), "FLAME": FLAME(),
            "RobustLR (θ=4)": RobustLR(threshold=min(4, n)), "FoolsGold": FoolsGold()}


def bench(n: int, n_params: int, repeats: int) -> list[tuple[str, float]]:
    deltas, weights = make_updates(n, n_params)
    context = RoundContext(1, torch.arange(n), torch.zeros(n_params))
    timed: dict[str, list[float]] = {}
    candidates = rules(n)
    for _ in range(repeats):
        for name, rule in candidates.items():
            rule.begin_round(context)
            started = time.perf_counter()
            rule(deltas, weights, torch.Generator().manual_seed(0))
            timed.setdefault(name, []).append(time.perf_counter() - started)
    return [(name, statistics.median(times)) for name, times in timed.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["30x1199882"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for size in args.sizes:
        n, n_params = (int(x) for x in size.split("x"))
        print(f"\n{n} x {n_params:,} (median of {args.repeats})\n\n| rule | seconds |\n|---|---|")
        for name, seconds in bench(n, n_params, args.repeats):
            print(f"| {name} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
