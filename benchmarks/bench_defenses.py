"""Times every defense against a straightforward numpy implementation of the same rule, in one run.

The numpy versions are what the reference code does (`defense.py` of Wang et al.): Python loops over
clients and over pairs of clients (Krum distances), and the reference's Weiszfeld loop for RFA,
with `np.median` / `np.sort` for the coordinate-wise rules. Each pair of results is also compared,
so a fast wrong answer cannot hide in the table.

Usage:
    python benchmarks/bench_defenses.py                              # 30 x 1,199,882 and 100 x 10M
    python benchmarks/bench_defenses.py --sizes 30x1199882 --repeats 5

Prints a markdown table (medians over repeats, the torch and numpy calls alternating so that a slow
spell of a shared machine hits both sides; the numpy side may use fewer repeats at the large size,
see --numpy-repeats) plus the machine, torch version and thread count.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from fl_lightning.aggregation import Aggregate, Aggregator, FedAvg
from fl_lightning.callbacks import CoordinateMedian, GeometricMedian, Krum, MultiKrum, NormClipping, TrimmedMean, WeakDP

NORM_BOUND, STDDEV, NUM_ADVERSARIES, BETA = 2.0, 0.025, 1, 0.1


# ----- straightforward numpy versions (the reference's loops) -----

def np_fedavg(points: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    total = np.zeros_like(points[0])
    for weight, point in zip(counts / counts.sum(), points):
        total += np.float32(weight) * point
    return total


def np_clipped(points: list[np.ndarray]) -> list[np.ndarray]:
    return [point / max(1.0, float(np.linalg.norm(point)) / NORM_BOUND) for point in points]


def np_norm_clipping(points: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    return np_fedavg(np_clipped(points), counts)


def np_weak_dp(points: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    aggregate = np_norm_clipping(points, counts)
    return aggregate + np.random.default_rng(0).normal(0.0, STDDEV, aggregate.shape).astype(np.float32)


def np_krum_scores(points: list[np.ndarray], f: int) -> np.ndarray:
    n = len(points)
    dists = np.zeros((n, n))
    for i in range(n):  # one subtraction and one norm per pair, as the reference does
        for j in range(i + 1, n):
            dists[i, j] = dists[j, i] = float(np.linalg.norm(points[i] - points[j])) ** 2
    return np.array([np.sort(np.delete(dists[i], i))[: n - f - 2].sum() for i in range(n)])


def np_krum(points: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    return points[int(np.argmin(np_krum_scores(points, NUM_ADVERSARIES)))].copy()


def np_multi_krum(points: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    selected = np.argsort(np_krum_scores(points, NUM_ADVERSARIES), kind="stable")[: len(points) - NUM_ADVERSARIES]
    return np_fedavg([points[i] for i in selected], counts[selected])


def np_rfa(points: list[np.ndarray], counts: np.ndarray, maxiter: int = 500, eps: float = 1e-5,
           ftol: float = 1e-7) -> np.ndarray:
    """The reference's smoothed Weiszfeld: float64 arithmetic over float32 points, one client at a time."""
    alphas = counts / counts.sum()

    def weighted_average(weights: np.ndarray) -> np.ndarray:
        total = np.zeros(points[0].shape)
        for weight, point in zip(weights / weights.sum(), points):
            total += weight * point
        return total

    def objective(median: np.ndarray) -> float:
        return sum(alpha * float(np.linalg.norm(median - point)) for alpha, point in zip(alphas, points))

    median = weighted_average(alphas)
    obj = objective(median)
    for _ in range(maxiter):
        previous = obj
        weights = np.array([alpha / max(eps, float(np.linalg.norm(median - point)))
                            for alpha, point in zip(alphas, points)])
        median = weighted_average(weights)
        obj = objective(median)
        if abs(previous - obj) < ftol * obj:
            break
    return median.astype(np.float32)


def np_median(points: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    return np.median(as_matrix(points), axis=0)


def np_trimmed_mean(points: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    n = len(points)
    trimmed = int(BETA * n)
    return np.sort(as_matrix(points), axis=0)[trimmed: n - trimmed].mean(axis=0)


def as_matrix(points: list[np.ndarray]) -> np.ndarray:
    """The `[n, n_params]` array the row views come from (no 4 GB `np.stack` copy at 100 x 10M)."""
    base = points[0].base
    if base is not None and base.shape == (len(points), points[0].shape[0]):
        return base
    return np.stack(points)


DEFENSES: list[tuple[str, Callable[[], Aggregator], Callable[..., np.ndarray]]] = [
    ("FedAvg", FedAvg, np_fedavg),
    ("NormClipping(2.0)", lambda: NormClipping(NORM_BOUND), np_norm_clipping),
    ("WeakDP(2.0, 0.025)", lambda: WeakDP(NORM_BOUND, STDDEV), np_weak_dp),
    ("Krum(f=1)", lambda: Krum(NUM_ADVERSARIES), np_krum),
    ("MultiKrum(f=1)", lambda: MultiKrum(NUM_ADVERSARIES), np_multi_krum),
    ("GeometricMedian (RFA)", GeometricMedian, np_rfa),
    ("CoordinateMedian", CoordinateMedian, np_median),
    ("TrimmedMean(0.1)", lambda: TrimmedMean(BETA), np_trimmed_mean),
]


# ----- data and timing -----

def make_updates(n: int, n_params: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Client updates that look like a round's: a shared low-rank part plus noise, norms spread
    around the clipping bound, and one model-replacement attacker (row 0, scaled 10x)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, n_params, generator=g)  # [8, n_params]
    deltas = torch.empty(n, n_params)
    for row in range(n):  # row by row: no [n, n_params] temporaries
        deltas[row] = torch.randn(8, generator=g) @ basis / 3 + torch.randn(n_params, generator=g)
        deltas[row] *= (0.5 + 3.5 * torch.rand(1, generator=g)) / deltas[row].norm()  # norms in [0.5, 4]
    del basis
    deltas[0] *= 10
    counts = torch.randint(50, 500, (n,), generator=g).float()
    return deltas, counts


def with_noise(aggregate: Aggregate) -> Aggregate:
    """Weak DP's noise added to the update, as the numpy version returns it (and as the server adds it)."""
    if aggregate.noise is None:
        return aggregate
    return Aggregate(update=aggregate.update + aggregate.noise, client_weights=aggregate.client_weights)


def timed_pair(torch_fn: Callable[[], object], numpy_fn: Callable[[], object], repeats: int, numpy_repeats: int,
               device: torch.device) -> tuple[float, object, float, object]:
    """Median seconds of both sides and their last results, the calls alternating (torch, numpy, torch, ...)
    so that a slow spell of a shared machine hits both sides alike."""
    times: dict[str, list[float]] = {"torch": [], "numpy": []}
    results: dict[str, object] = {}
    for index in range(max(repeats, numpy_repeats)):
        for side, fn, count in (("torch", torch_fn, repeats), ("numpy", numpy_fn, numpy_repeats)):
            if index >= count:
                continue
            results[side] = None
            gc.collect()
            if side == "torch" and device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[side] = fn()
            if side == "torch" and device.type == "cuda":
                torch.cuda.synchronize()
            times[side].append(time.perf_counter() - start)
    return statistics.median(times["torch"]), results["torch"], statistics.median(times["numpy"]), results["numpy"]


def bench_size(n: int, n_params: int, repeats: int, numpy_repeats: int, device: torch.device,
               only: set[str] | None) -> list[dict[str, object]]:
    deltas, counts = make_updates(n, n_params)
    points = list(deltas.numpy())  # views of the rows: no copy
    counts_np = counts.numpy().astype(np.float64)
    on_device, counts_device = deltas.to(device), counts.to(device)
    rows = []
    for name, make, np_fn in DEFENSES:
        if only and name.split("(")[0].strip() not in only:
            continue
        aggregator = make()
        aggregator(on_device[:, :50_000], counts_device, torch.Generator().manual_seed(0))  # warm-up
        t_torch, result, t_numpy, expected = timed_pair(
            lambda agg=aggregator: with_noise(agg(on_device, counts_device, torch.Generator().manual_seed(0))),
            lambda fn=np_fn: fn(points, counts_np), repeats, numpy_repeats, device)
        update = result.update.float().cpu()
        del result
        diff = (update - torch.from_numpy(np.asarray(expected, dtype=np.float32))).abs().max().item()
        scale = float(np.abs(expected).max())
        rows.append({"n": n, "n_params": n_params, "defense": name, "torch_s": t_torch, "numpy_s": t_numpy,
                     "ratio": t_numpy / t_torch, "repeats": f"{repeats}/{numpy_repeats}",
                     "rel_diff": diff / scale if "WeakDP" not in name else float("nan")})
        print(f"  {n} x {n_params:,} {name:<24} torch {t_torch:8.3f} s  numpy {t_numpy:8.3f} s  "
              f"x{t_numpy / t_torch:6.1f}  max|diff|/max|ref| {rows[-1]['rel_diff']:.1e}", file=sys.stderr, flush=True)
        del expected
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="30x1199882,100x10000000", help="comma-separated NxN_PARAMS")
    parser.add_argument("--repeats", type=int, default=5, help="timed torch calls per defense (median)")
    parser.add_argument("--numpy-repeats", type=int, default=3, help="timed numpy calls below 1e8 elements")
    parser.add_argument("--numpy-repeats-large", type=int, default=1, help="timed numpy calls from 1e8 elements")
    parser.add_argument("--device", default="cpu", help="device of the torch side (the numpy side is the CPU)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: every core, as the engine's one process uses them; "
                             "1: the single core the numpy loops use)")
    parser.add_argument("--only", default="", help="comma-separated defense names (e.g. Krum,GeometricMedian)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    only = {name.strip() for name in args.only.split(",") if name.strip()} or None
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
        machine = f"{model}, {torch.get_num_threads()} torch threads"
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        machine += f", torch side on {torch.cuda.get_device_name(device)}"
    print(f"machine: {machine}; torch {torch.__version__}; numpy {np.__version__}; python {platform.python_version()}",
          file=sys.stderr)
    print(f"command: python {' '.join(sys.argv)}", file=sys.stderr)
    rows = []
    for size in args.sizes.split(","):
        n, n_params = (int(part) for part in size.lower().split("x"))
        numpy_repeats = args.numpy_repeats if n * n_params < 10**8 else args.numpy_repeats_large
        rows += bench_size(n, n_params, args.repeats, numpy_repeats, device, only)
    print("| updates x params | defense | torch (s) | numpy (s) | numpy / torch | repeats torch/numpy | "
          "max diff / max value |")
    print("|---|---|---:|---:|---:|---|---:|")
    for row in rows:
        diff = "noise" if row["rel_diff"] != row["rel_diff"] else f"{row['rel_diff']:.0e}"
        print(f"| {row['n']} x {row['n_params']:,} | {row['defense']} | {row['torch_s']:.3f} | {row['numpy_s']:.3f} | "
              f"{row['ratio']:.1f}x | {row['repeats']} | {diff} |")


if __name__ == "__main__":
    main()
