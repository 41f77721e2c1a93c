"""A bare PyTorch FedAvg loop doing the engine's math, for measuring the engine's overhead.

Same task (model, data, partition), same client selection and seeds, same local SGD, same
weighted sum. No Fabric, no hooks, no gathering, no metrics beyond time. Prints seconds per
round and, with --compare RUN_DIR, whether the final global model equals the engine's bitwise.

    FL_LIGHTNING_DATA=../shared/data python benchmarks/bare_loop.py --task emnist --source mnist --rounds 12 --threads 1
    FL_LIGHTNING_DATA=../shared/data python -m fl_lightning fit --task emnist --data.source mnist --fl.rounds 12 \
        --fl.eval_every 0 --fl.checkpoint_every 0 --log.logger csv --num_threads 1 --name engine
    python benchmarks/bare_loop.py --task emnist --source mnist --rounds 12 --threads 1 --compare runs/engine

Both print per-round wall and process-CPU seconds (the engine's are the `seconds` column of its
metrics.csv, which includes nothing but the round since evaluation is off).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open

from fl_lightning.config import preset_values
from fl_lightning.sampling import client_seed, sample_clients
from fl_lightning.tasks import get_task_class


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", required=True)
    parser.add_argument("--source", default=None)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_clients", type=int, default=None)
    parser.add_argument("--clients_per_round", type=int, default=None)
    parser.add_argument("--data_dir", default=os.environ.get("FL_LIGHTNING_DATA", "~/.cache/fl_lightning"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cls = get_task_class(args.task)
    fl, client = preset_values(cls.fl_preset), preset_values(cls.client_preset)
    k = args.num_clients or fl["num_clients"]
    m = args.clients_per_round or fl["clients_per_round"]
    torch.manual_seed(args.seed)
    settings = cls.make_settings(Path(args.data_dir).expanduser(), num_clients=k, seed=args.seed, source=args.source)
    task = cls(settings)
    task.prepare_data()
    data = task.build_data()
    params = [p for p in task.parameters() if p.requires_grad]
    global_params = torch.cat([p.detach().reshape(-1) for p in params])
    sizes = [p.numel() for p in params]
    times = []
    for round_idx in range(1, args.rounds + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        lr = client["lr"] * client["lr_decay"] ** (round_idx - 1)
        deltas, counts = [], []
        for slot, cid in enumerate(sample_clients(args.seed, round_idx, k, m)):
            seed = client_seed(args.seed, round_idx, cid, slot)
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p, chunk in zip(params, torch.split(global_params, sizes), strict=True):
                    p.copy_(chunk.view_as(p))
            optimizer = torch.optim.SGD(params, lr=lr, momentum=client["momentum"],
                                        weight_decay=client["weight_decay"])
            x, y = data.client_data(cid)
            task.train()
            for _ in range(client["local_epochs"]):
                perm = torch.randperm(x.shape[0], generator=generator)
                stop = x.shape[0] - x.shape[0] % client["batch_size"] if task.drop_last else x.shape[0]
                for b, i in enumerate(range(0, stop, client["batch_size"])):
                    idx = perm[i:i + client["batch_size"]]
                    optimizer.zero_grad(set_to_none=True)
                    loss = task.training_step((x.index_select(0, idx), y.index_select(0, idx)), b)
                    loss.backward()
                    if client["grad_clip_norm"] > 0:
                        torch.nn.utils.clip_grad_norm_(params, client["grad_clip_norm"])
                    optimizer.step()
            deltas.append(torch.cat([p.detach().reshape(-1) for p in params]) - global_params)
            counts.append(x.shape[0])
        weights = torch.tensor(counts, dtype=torch.float32)
        weights = weights / weights.sum()
        update = torch.zeros_like(global_params)
        for w, d in zip(weights.tolist(), deltas, strict=True):
            update.add_(d, alpha=w)
        global_params.add_(update)
        times.append(time.perf_counter() - start)
        print(f"round {round_idx}: wall {times[-1]:.3f} s cpu {time.process_time() - cpu_start:.3f} s", flush=True)
    print(f"bare loop: mean {sum(times) / len(times):.3f} s/round over {len(times)} rounds; "
          f"median {sorted(times)[len(times) // 2]:.3f}")
    if args.compare:
        with safe_open(str(Path(args.compare) / "model.safetensors"), framework="pt") as handle:
            engine = handle.get_tensor("global_params")
        print("bitwise equal to the engine's final model:", torch.equal(engine, global_params),
              "max abs diff", (engine - global_params).abs().max().item())


if __name__ == "__main__":
    main()
