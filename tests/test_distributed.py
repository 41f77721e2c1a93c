"""The update gather on 2 gloo processes: shared-memory buffer and all_gather give the same rows, in slot order."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.fabric import Fabric

from fl_lightning.aggregation import FedAvg
from fl_lightning.client import train_client
from fl_lightning.config import ClientArgs, FLArgs, resolve_args
from fl_lightning.distributed import UpdateGatherer, create_private_file
from fl_lightning.orchestrator import Run
from fl_lightning.params import flat_params
from fl_lightning.tasks import Toy
from fl_lightning.types import ClientUpdate, RoundPlan

NUM_SLOTS, NUM_PARAMS = 5, 37  # 5 slots over 2 ranks: 3 and 2 rows, so one rank pads (all_gather path)


class GlooFabric:
    """The slice of Fabric the gatherer uses, over a plain gloo process group."""

    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size, self.device = rank, world, torch.device("cpu")

    def barrier(self) -> None:
        dist.barrier()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous())
        return torch.stack(out)


def expected_delta(round_idx: int, slot: int) -> torch.Tensor:
    return torch.arange(NUM_PARAMS, dtype=torch.float32) * (slot + 1) + 100 * round_idx


def worker(rank: int, world: int, port: int, shared_dir: str, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gatherer = UpdateGatherer(GlooFabric(rank, world), shared_dir=shared_dir)
    rounds, no_copy = [], []
    for round_idx in range(4):  # the buffer is reused: every round must see its own rows only
        slots = [slot for slot in range(NUM_SLOTS) if slot % world == (rank + round_idx) % world]
        rows = gatherer.rows(slots, NUM_SLOTS, NUM_PARAMS)
        local = []
        for slot, row in zip(slots, rows):
            # Clients write into their rows (rounds 0-2); in round 3 the deltas are made elsewhere
            # and handed over in reverse order, which the gather must copy into the right rows.
            delta = row.copy_(expected_delta(round_idx, slot)) if round_idx < 3 else expected_delta(round_idx, slot)
            local.append(ClientUpdate(slot=slot, client_id=10 * slot + round_idx, delta=delta,
                                      num_examples=slot + 1, loss=0.5, is_adversary=slot == 0))
        updates = gatherer(local[::-1] if round_idx == 3 else local, NUM_SLOTS, NUM_PARAMS)
        # Shared memory: the buffer itself is every rank's result, in slot order (no private copy).
        no_copy.append(gatherer.shared is not None
                       and updates.deltas.data_ptr() == gatherer.shared.data_ptr() == gatherer.buffer.data_ptr())
        rounds.append({"deltas": updates.deltas.clone(), "client_ids": updates.client_ids,
                       "num_examples": updates.num_examples})
        gatherer.release()  # every rank is done with the rows: the next round may overwrite them
    private = UpdateGatherer(GlooFabric(rank, world), shared_dir=shared_dir, private=True)
    slots = [2 * rank, 2 * rank + 1]
    local = [ClientUpdate(slot=slot, client_id=slot, delta=row.copy_(expected_delta(0, slot)), num_examples=1,
                          loss=0.5, is_adversary=False)
             for slot, row in zip(slots, private.rows(slots, 4, NUM_PARAMS))]
    updates = private(local, 4, NUM_PARAMS)
    is_copy = private.shared is None or updates.deltas.data_ptr() != private.shared.data_ptr()
    private_ok = is_copy and torch.equal(updates.deltas, torch.stack([expected_delta(0, s) for s in range(4)]))
    private.release()
    torch.save({"rounds": rounds, "shared": gatherer.shared is not None, "no_copy": no_copy, "private": private_ok},
               Path(results) / f"rank{rank}.pt")
    dist.destroy_process_group()


def gather_on_two_ranks(tmp_path: Path, shared_dir: str) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(2, port, shared_dir, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def test_shared_memory_and_all_gather_paths_give_the_rows_in_slot_order(tmp_path):
    buffer_dir = tmp_path / "shm"
    buffer_dir.mkdir()
    shared = gather_on_two_ranks(tmp_path, str(buffer_dir))
    fallback = gather_on_two_ranks(tmp_path, str(tmp_path / "missing"))  # no such directory: all_gather
    assert [r["shared"] for r in shared] == [True, True] and [r["shared"] for r in fallback] == [False, False]
    assert list(buffer_dir.iterdir()) == []  # the buffer's file is unlinked once every rank mapped it
    assert all(all(r["no_copy"]) for r in shared) and not any(any(r["no_copy"]) for r in fallback)
    assert all(r["private"] for r in shared + fallback)  # `on_before_aggregate` hooks get their own copy
    for results in (shared, fallback):
        for rank_result in results:
            for round_idx, got in enumerate(rank_result["rounds"]):
                expected = torch.stack([expected_delta(round_idx, slot) for slot in range(NUM_SLOTS)])
                assert torch.equal(got["deltas"], expected)
                assert got["client_ids"].tolist() == [10 * slot + round_idx for slot in range(NUM_SLOTS)]
                assert got["num_examples"].tolist() == [float(slot + 1) for slot in range(NUM_SLOTS)]


def test_shared_file_is_created_exclusively_and_owner_only(tmp_path):
    path = tmp_path / "buffer"
    create_private_file(str(path), 4096)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == 4096
    with pytest.raises(FileExistsError):  # never opens a file (or a link) someone else put there
        create_private_file(str(path), 4096)
    (tmp_path / "target").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(FileExistsError):
        create_private_file(str(tmp_path / "link"), 4096)
    assert (tmp_path / "target").read_text() == "x"


@pytest.mark.parametrize("batching", ["sequential", "vmap"])
def test_clients_write_their_deltas_into_the_round_buffer(batching):
    """One process: each client's delta is its row of the run's one round buffer (no per-client
    tensor), equal to local minus global, and the gather hands that buffer on without a copy."""
    fabric = Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    fl = resolve_args(Toy.fl_preset, FLArgs())
    client = resolve_args(Toy.client_preset, ClientArgs(batching=batching))
    task = Toy(Toy.make_settings(".", num_clients=fl.num_clients, seed=0))
    run = Run(fabric, task, task.build_data(), fl, client, FedAvg(), [], seed=0)
    global_params = flat_params(task)
    buffers = []
    for round_idx in (1, 2):
        plan = RoundPlan(round_idx, [3, 1, 4, 0, 2], [False] * 5)
        local = run.train_local(plan, [0, 1, 2, 3, 4], global_params)
        buffer = run.gather.buffer
        buffers.append(buffer.data_ptr())
        for update in local:
            assert update.delta.data_ptr() == buffer[update.slot].data_ptr()
            alone = train_client(fabric, task, run.client_context(plan, update.slot, global_params))  # a new tensor
            assert alone.delta.data_ptr() != update.delta.data_ptr()
            if batching == "sequential":
                assert torch.equal(alone.delta, update.delta)
        updates = run.gather(local, 5, global_params.numel())
        assert updates.deltas.data_ptr() == buffer.data_ptr() and updates.deltas.shape == (5, global_params.numel())
        global_params = global_params + FedAvg()(updates.deltas, updates.num_examples, torch.Generator()).update
    assert buffers[0] == buffers[1]  # allocated once, reused
