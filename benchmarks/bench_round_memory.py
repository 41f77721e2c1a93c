"""Peak memory of a Reddit-shaped round: m clients of a ~10.7M-parameter LSTM, on 1 and 2 processes.

The model is the Reddit task's (`LSTMLanguageModel`: 50,000-word vocabulary, embedding and hidden
200, 2 layers, tied decoder: 10,693,200 parameters); the data are synthetic (random token rows, a
few per client, one local step), so the round's memory is the engine's, not the data's. Each
configuration runs `fl_lightning.orchestrator.fit` in a child process (its ranks are children of
that one), and every rank samples its own `/proc/self/status` every 5 ms:

* `VmHWM`: the kernel's peak resident set of the rank, shared-memory pages it touched included;
* peak `RssAnon`: its private memory (heap, the round buffer on one process, per-client tensors);
* peak `RssShmem`: the pages of the shared /dev/shm round buffer it has mapped (2 processes: the
  same pages in both ranks, so the machine holds them once).

The yardstick is the round's stacked updates themselves, `m * n_params * 4` bytes (4.28 GB at
m=100). The machine's total on 2 processes is reported as the sum of the ranks' peak private
memory plus the shared buffer once (an upper bound: the ranks' peaks need not coincide).

    python benchmarks/bench_round_memory.py                      # 1 and 2 processes, m=100
    python benchmarks/bench_round_memory.py --devices 2 --m 40   # one configuration
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fl_lightning.config import ClientArgs, DataArgs, FLArgs, LogArgs, preset
from fl_lightning.hooks import FLCallback
from fl_lightning.task import ClientPartition, FederatedData, Task, TaskSettings
from fl_lightning.tasks.reddit import LSTMLanguageModel

VOCAB, SEQ, ROWS_PER_CLIENT = 50_000, 8, 4


class RedditShaped(Task):
    """The Reddit LSTM (10.7M parameters) on random token rows: memory-shaped like a Reddit round, seconds to train."""

    name = "reddit_shaped"
    fl_preset = preset(FLArgs, rounds=3, num_clients=200, clients_per_round=100)
    client_preset = preset(ClientArgs, lr=20.0, lr_decay=1.0, momentum=0.0, weight_decay=0.0, local_epochs=1,
                           batch_size=20, grad_clip_norm=0.25)
    data_preset = preset(DataArgs, partition="iid")
    supports_vmap = False

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        self.model = LSTMLanguageModel(VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return F.cross_entropy(self(inputs).flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        inputs, targets = batch
        logits = self(inputs).flatten(0, 1)
        return {"correct": (logits.argmax(dim=1) == targets.flatten()).sum().float(),
                "total": torch.tensor(float(targets.numel())),
                "loss_sum": F.cross_entropy(logits, targets.flatten(), reduction="sum")}

    def build_data(self) -> FederatedData:
        generator = torch.Generator().manual_seed(self.settings.seed)
        rows = torch.randint(0, VOCAB, (self.settings.num_clients * ROWS_PER_CLIENT + 8, SEQ + 1), generator=generator)
        n = self.settings.num_clients * ROWS_PER_CLIENT
        offsets = torch.arange(0, n + 1, ROWS_PER_CLIENT)
        return FederatedData(train_inputs=rows[:n, :-1], train_targets=rows[:n, 1:],
                             partition=ClientPartition.from_csr(torch.arange(n), offsets),
                             test_inputs=rows[n:, :-1], test_targets=rows[n:, 1:])


def status() -> dict[str, int]:
    """This process's memory counters from /proc/self/status, in KiB."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0])
    return values


class AtFirstRound(FLCallback):
    """Records the memory counters when the first round starts (data, model and start state built)."""

    def __init__(self) -> None:
        self.at_start: dict[str, int] = {}

    def on_round_start(self, round_idx: int, plan: object) -> None:
        if not self.at_start:
            self.at_start = status()


def child(args: argparse.Namespace) -> None:
    """One configuration (this runs in every rank: Fabric starts rank 1 with the same command line)."""
    from fl_lightning.orchestrator import fit

    peaks = {"RssAnon": 0, "RssShmem": 0, "anon_plus_shmem": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = status()
            peaks["RssAnon"] = max(peaks["RssAnon"], now["RssAnon"])
            peaks["RssShmem"] = max(peaks["RssShmem"], now["RssShmem"])
            peaks["anon_plus_shmem"] = max(peaks["anon_plus_shmem"], now["RssAnon"] + now["RssShmem"])
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    probe = AtFirstRound()
    history = fit(task="reddit_shaped", callbacks=[probe],
                  fl=FLArgs(rounds=args.rounds, clients_per_round=args.m, eval_every=0, checkpoint_every=0),
                  log=LogArgs(logger="none", progress_bar=False), out_dir=args.out, name="run",
                  accelerator="cpu", devices=args.devices, num_threads=1)
    done.set()
    sampler.join()
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    result = {"rank": rank, "VmHWM": status()["VmHWM"], **{f"peak_{k}": v for k, v in peaks.items()},
              **{f"start_{k}": v for k, v in probe.at_start.items()},
              "seconds": time.perf_counter() - started, "round_seconds": [row["seconds"] for row in history]}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))


def measure(devices: int, m: int, rounds: int) -> list[dict]:
    """Runs one configuration in a child process; returns each rank's measurements."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--child", "--devices", str(devices), "--m", str(m), "--rounds", str(rounds),
               "--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        paths = [Path(out, f"rank{r}.json") for r in range(devices)]
        deadline = time.time() + 60  # rank 1 is rank 0's child and may write its file a moment later
        while not all(p.exists() for p in paths) and time.time() < deadline:
            time.sleep(0.1)
        return [json.loads(p.read_text()) for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        args.devices = args.devices[0]
        child(args)
        return
    num_params = sum(p.numel() for p in LSTMLanguageModel(VOCAB).parameters())
    stacked = args.m * num_params * 4 / 2**30
    print(f"m={args.m} x {num_params:,} parameters: stacked updates {stacked:.2f} GiB; torch {torch.__version__}")
    gib = 1 / 2**20  # KiB -> GiB
    for devices in args.devices:
        ranks = measure(devices, args.m, args.rounds)
        for r in ranks:
            print(f"  {devices} process(es), rank {r['rank']}: VmHWM {r['VmHWM'] * gib:.2f} GiB "
                  f"({r['VmHWM'] * gib / stacked:.2f}x), peak RssAnon {r['peak_RssAnon'] * gib:.2f} GiB, "
                  f"peak RssShmem {r['peak_RssShmem'] * gib:.2f} GiB; at the first round's start: VmRSS "
                  f"{r['start_VmRSS'] * gib:.2f}, RssAnon {r['start_RssAnon'] * gib:.2f} GiB; "
                  f"s/round {', '.join(f'{s:.1f}' for s in r['round_seconds'])}")
        shared = max(r["peak_RssShmem"] for r in ranks)
        total = sum(r["peak_RssAnon"] for r in ranks) + shared
        private = " + ".join(f"{r['peak_RssAnon'] * gib:.2f}" for r in ranks)
        print(f"  {devices} process(es): machine total <= {total * gib:.2f} GiB ({total * gib / stacked:.2f}x) "
              f"= private peaks {private} + shared {shared * gib:.2f}", flush=True)


if __name__ == "__main__":
    main()
