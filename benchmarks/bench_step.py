"""One local training step per task: achieved FLOP rate against the machine's matmul peak, eager vs faster variants.

A client's local training is a loop of SGD steps (forward, backward, optimizer) on one model, so
the step is where the time goes. For each task this times a step on a real mini-batch of the
task's preset size, counts its floating-point operations with `torch.utils.flop_counter`
(matmuls and convolutions, forward and backward; LSTM layers by formula, 2 x 4 gates x (in + hidden)
x hidden per token, times 3 for the backward; element-wise work is not counted), and divides.
The yardstick is a square float32 matmul measured in the same process with the same threads:
what the BLAS reaches on this machine, which is the most a step could hope for.

Variants: `eager` (what the engine runs), `channels_last` (vision models: NHWC convolutions),
`compile` (`torch.compile`, inductor, same fp32 math; the compile time is reported apart).

    FL_LIGHTNING_DATA=../shared/data python benchmarks/bench_step.py --threads 2
    FL_LIGHTNING_DATA=../shared/data python benchmarks/bench_step.py --tasks emnist --variants eager,compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fl_lightning.data import resolve_data_dir
from fl_lightning.tasks import get_task_class

# Task, its settings for the benchmark (the paper presets; EMNIST on the MNIST source), batch size.
TASKS: dict[str, dict] = {
    "emnist": {"source": "mnist", "num_clients": 1000, "batch_size": 32},
    "cifar10": {"source": "jpeg", "num_clients": 200, "batch_size": 32},  # the offline subset; same VGG-9
    "sentiment140": {"source": None, "num_clients": 1948, "batch_size": 20},
}


def matmul_peak(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a square float32 matmul (the machine's practical peak at this thread count)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median_seconds(lambda: a @ b, repeats) / 1e9


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 8) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(task_name: str, data_dir: Path) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor], int]:
    spec = TASKS[task_name]
    task_cls = get_task_class(task_name)
    settings = task_cls.make_settings(data_dir, num_clients=spec["num_clients"], seed=0, source=spec["source"])
    task = task_cls(settings)
    data = task.build_data()
    batch_size = spec["batch_size"]
    batch = (data.train_inputs[:batch_size].contiguous(), data.train_targets[:batch_size].contiguous())
    return task, batch, batch_size


def step_fn(task: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], None]:
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    task.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        task.training_step(batch, 0).backward()
        optimizer.step()

    return step


def step_flops(task: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """FLOPs of one forward and backward pass: counted ops, plus LSTMs by formula (the counter misses them)."""
    lstm_flops = 0

    def count_lstm(module: torch.nn.LSTM, inputs: tuple, output: object) -> None:
        nonlocal lstm_flops
        batch_size, steps = inputs[0].shape[:2] if module.batch_first else inputs[0].shape[1::-1]
        hidden, size_in = module.hidden_size, module.input_size
        for _ in range(module.num_layers):  # 4 gates, each [in + hidden] x hidden multiply-adds per token
            lstm_flops += 3 * 2 * 4 * (size_in + hidden) * hidden * batch_size * steps  # x3: forward + backward
            size_in = hidden

    hooks = [m.register_forward_hook(count_lstm) for m in task.modules() if isinstance(m, torch.nn.LSTM)]
    with FlopCounterMode(display=False) as counter:
        task.training_step(batch, 0).backward()
    for hook in hooks:
        hook.remove()
    task.zero_grad(set_to_none=True)
    return counter.get_total_flops() + lstm_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--variants", default="eager,channels_last,compile")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per variant (median)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(None)
    peak = matmul_peak(args.threads)
    rows = []
    for task_name in args.tasks.split(","):
        task, batch, batch_size = build(task_name, data_dir)
        flops = step_flops(task, batch)
        for variant in args.variants.split(","):
            compile_seconds = 0.0
            if variant == "channels_last":
                if batch[0].dim() != 4:
                    continue  # text models have no image layout
                task = task.to(memory_format=torch.channels_last)
                batch = (batch[0].contiguous(memory_format=torch.channels_last), batch[1])
            elif variant == "compile":
                task = task.to(memory_format=torch.contiguous_format)
                batch = (batch[0].contiguous(), batch[1])
                task.forward = torch.compile(task.forward)
                step = step_fn(task, batch)
                start = time.perf_counter()
                step()
                compile_seconds = time.perf_counter() - start
            seconds = median_seconds(step_fn(task, batch), args.repeats)
            gflops = flops / seconds / 1e9
            rows.append({"task": task_name, "variant": variant, "batch_size": batch_size,
                         "params": sum(p.numel() for p in task.parameters() if p.requires_grad),
                         "step_ms": seconds * 1e3, "examples_per_s": batch_size / seconds,
                         "gflop_per_step": flops / 1e9, "gflops": gflops, "peak_fraction": gflops / peak,
                         "compile_s": compile_seconds})
            print(f"{task_name} {variant}: {seconds * 1e3:.2f} ms/step, {gflops:.1f} GFLOP/s", file=sys.stderr)
            if variant == "compile":
                task.forward = type(task).forward.__get__(task)  # undo, for the next variant
    print(f"\n{torch.get_num_threads()} threads; square float32 matmul peak {peak:.0f} GFLOP/s; "
          f"torch {torch.__version__}\n")
    print("| task | variant | params | batch | ms/step | examples/s | GFLOP/step | GFLOP/s | of matmul peak |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        extra = f" (compile {r['compile_s']:.0f} s)" if r["compile_s"] else ""
        print(f"| {r['task']} | {r['variant']}{extra} | {r['params']:,} | {r['batch_size']} | {r['step_ms']:.2f} | "
              f"{r['examples_per_s']:.0f} | {r['gflop_per_step']:.3f} | {r['gflops']:.1f} | {r['peak_fraction']:.0%} |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "matmul_peak_gflops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
