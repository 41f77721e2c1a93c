"""Krum, Multi-Krum and RFA at 30 x 1,199,882 (the EMNIST CNN's updates), torch side only: one JSON line.

Medians of 7 calls after a warm-up, on seeded random updates. Meant to compare two checkouts in one
sitting: run it alternately with each checkout's own environment, e.g.

    for i in 1 2 3; do
        old/.venv/bin/python benchmarks/bench_robust_rules.py; .venv/bin/python benchmarks/bench_robust_rules.py
    done
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from fl_lightning.callbacks import GeometricMedian, Krum, MultiKrum


def main() -> None:
    torch.manual_seed(0)
    deltas = torch.randn(30, 1_199_882) * 0.01  # [n, n_params]
    weights = torch.randint(5, 60, (30,)).float()  # [n]
    medians = {}
    for name, rule in (("Krum", Krum(1)), ("MultiKrum", MultiKrum(1)), ("RFA", GeometricMedian())):
        rule(deltas, weights, torch.Generator().manual_seed(0))  # warm-up
        times = []
        for _ in range(7):
            started = time.perf_counter()
            rule(deltas, weights, torch.Generator().manual_seed(0))
            times.append(time.perf_counter() - started)
        medians[name] = statistics.median(times)
    print(json.dumps(medians))


if __name__ == "__main__":
    main()
