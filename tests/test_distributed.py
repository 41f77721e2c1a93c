"""The update gather on 2 gloo processes: shared-memory buffer and all_gather give the same rows, in slot order."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fl_lightning.distributed import UpdateGatherer
from fl_lightning.types import ClientUpdate

NUM_SLOTS, NUM_PARAMS = 5, 37  # 5 slots over 2 ranks: 3 and 2 rows, so one rank pads


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
    rounds = []
    for round_idx in range(3):  # the buffer is reused: every round must see its own rows only
        slots = [slot for slot in range(NUM_SLOTS) if slot % world == (rank + round_idx) % world]
        local = [ClientUpdate(slot=slot, client_id=10 * slot + round_idx, delta=expected_delta(round_idx, slot),
                              num_examples=slot + 1, loss=0.5, is_adversary=slot == 0) for slot in slots]
        updates = gatherer(local, NUM_SLOTS, NUM_PARAMS)
        rounds.append({"deltas": updates.deltas.clone(), "client_ids": updates.client_ids,
                       "num_examples": updates.num_examples})
    # 4 slots, rank-major (rank 0: 0 and 1, rank 1: 2 and 3): the buffer's rows are already in slot
    # order, and the result must still be a private copy, since the next round overwrites the buffer.
    in_order = UpdateGatherer(GlooFabric(rank, world), shared_dir=shared_dir)
    local = [ClientUpdate(slot=slot, client_id=slot, delta=expected_delta(0, slot), num_examples=1, loss=0.5,
                          is_adversary=False) for slot in (2 * rank, 2 * rank + 1)]
    updates = in_order(local, 4, NUM_PARAMS)
    private = in_order.shared is None or (
        updates.deltas.untyped_storage().data_ptr() != in_order.shared.untyped_storage().data_ptr())
    torch.save({"rounds": rounds, "shared": gatherer.shared is not None, "private": private},
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
    assert all(r["private"] for r in shared)
    for results in (shared, fallback):
        for rank_result in results:
            for round_idx, got in enumerate(rank_result["rounds"]):
                expected = torch.stack([expected_delta(round_idx, slot) for slot in range(NUM_SLOTS)])
                assert torch.equal(got["deltas"], expected)
                assert got["client_ids"].tolist() == [10 * slot + round_idx for slot in range(NUM_SLOTS)]
                assert got["num_examples"].tolist() == [float(slot + 1) for slot in range(NUM_SLOTS)]
