"""Collectives of a round: gather the clients' updates, broadcast the new global model.

Every function here runs a collective and must be called on every rank (never under
`if fabric.is_global_zero`), with the same arguments in the same order, or the run hangs.
Nothing is pickled: per-client metadata travels as JSON bytes in a uint8 tensor.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import uuid
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import Tensor

from fl_lightning.types import ClientUpdate, RoundUpdates


class UpdateGatherer:
    """Gathers every rank's client updates into one `RoundUpdates`, in slot order, on every rank.

    When all ranks are CPU processes of one machine, the updates travel through one shared-memory
    buffer (a file in /dev/shm that every rank maps): each rank writes its rows, the metadata
    all_gather tells everyone that all rows are written, every rank copies the rows out in slot
    order, and a barrier keeps the next round's writes from overtaking a slower rank's copy. gloo
    moves an all_gather of W-EMNIST's 144 MB in ~0.4 s, 8 % of a round; the buffer takes
    milliseconds. Otherwise (GPUs, several machines, too little /dev/shm) it is one all_gather.

    Ranks hold `ceil(num_slots / world)` or one fewer updates: each pads to the larger count with
    zero rows (all_gather needs equal shapes), and the padding is dropped after the gather.
    """

    def __init__(self, fabric: Fabric, shared_dir: str = "/dev/shm") -> None:
        self.fabric = fabric
        self.shared_dir = shared_dir
        self.shared: Tensor | None = None  # [world * rows_per_rank, n_params], mapped by every rank
        self.shared_checked = False

    def __call__(self, local: list[ClientUpdate], num_slots: int, num_params: int,
                 dtype: torch.dtype = torch.float32) -> RoundUpdates:
        fabric = self.fabric
        rows_per_rank = math.ceil(num_slots / fabric.world_size)
        shared = self.shared_buffer(rows_per_rank * fabric.world_size, num_params, dtype)
        if shared is not None:
            for row, update in enumerate(local):
                shared[fabric.global_rank * rows_per_rank + row].copy_(update.delta)
            deltas = shared
        else:
            deltas = torch.zeros(rows_per_rank, num_params, dtype=dtype, device=fabric.device)  # [rows, n_params]
            for row, update in enumerate(local):
                deltas[row] = update.delta
            if fabric.world_size > 1:
                deltas = fabric.all_gather(deltas).reshape(-1, num_params)  # [world * rows, n_params]
        meta = [{"slot": u.slot, "client_id": u.client_id, "num_examples": u.num_examples, "loss": u.loss,
                 "is_adversary": u.is_adversary, "stats": u.stats} for u in local]
        all_meta = gather_json(fabric, meta)  # one list per rank; returns once every rank has written its rows
        rows, records = [], []
        for rank, rank_meta in enumerate(all_meta):
            for row, record in enumerate(rank_meta):
                rows.append(rank * rows_per_rank + row)
                records.append(record)
        order = sorted(range(len(records)), key=lambda i: records[i]["slot"])
        if [records[i]["slot"] for i in order] != list(range(num_slots)):
            raise RuntimeError(f"gathered slots {[records[i]['slot'] for i in order]} do not cover 0..{num_slots - 1}")
        records = [records[i] for i in order]
        index = [rows[i] for i in order]
        # One process and no padding: already in order, no copy. The shared buffer is always copied
        # out (even when its rows happen to be in slot order): the next round overwrites it.
        if shared is not None or index != list(range(deltas.shape[0])):
            deltas = deltas.index_select(0, torch.tensor(index, device=deltas.device))  # a private copy
        if shared is not None:
            fabric.barrier()  # every rank has its copy: the buffer is free for the next round
        return RoundUpdates(
            client_ids=torch.tensor([r["client_id"] for r in records], dtype=torch.int64),
            deltas=deltas,
            num_examples=torch.tensor([float(r["num_examples"]) for r in records], device=fabric.device),
            losses=torch.tensor([r["loss"] for r in records]),
            is_adversary=torch.tensor([r["is_adversary"] for r in records], dtype=torch.bool),
            stats=[r["stats"] for r in records],
        )

    def shared_buffer(self, num_rows: int, num_params: int, dtype: torch.dtype) -> Tensor | None:
        """The shared `[num_rows, n_params]` buffer, made on first use; None where it cannot serve.

        Every rank takes the same decision: rank 0 makes the file only if all ranks report its
        machine, and the buffer is used only if every rank could map it.
        """
        fabric = self.fabric
        if self.shared is not None and self.shared.shape == (num_rows, num_params) and self.shared.dtype == dtype:
            return self.shared
        if fabric.world_size == 1 or fabric.device.type != "cpu" or self.shared_checked:
            return None
        self.shared_checked = True  # shape and dtype are fixed for a run: decide once
        numel = num_rows * num_params
        nbytes = numel * dtype.itemsize
        machines = gather_json(fabric, [socket.gethostname(), _boot_id()])
        path = None
        if fabric.global_rank == 0 and all(m == machines[0] for m in machines):
            free = shutil.disk_usage(self.shared_dir).free if os.path.isdir(self.shared_dir) else 0
            if free > 2 * nbytes:  # leave room: tmpfs counts against the machine's memory
                path = os.path.join(self.shared_dir, f"fl_lightning-{os.getpid()}-{uuid.uuid4().hex}")
                try:
                    with open(path, "wb") as handle:
                        handle.truncate(nbytes)
                except OSError:
                    path = None
        path = broadcast_json(fabric, path)
        if path is None:
            return None
        try:
            shared = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(num_rows, num_params)
        except (OSError, RuntimeError):
            shared = None
        mapped = gather_json(fabric, shared is not None)  # also: every rank is done with the file's name
        if fabric.global_rank == 0:
            os.unlink(path)
        if not all(mapped):
            return None
        self.shared = shared
        return shared


def _boot_id() -> str:
    """This machine's boot id (Linux), so that two containers with one host name are told apart."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def gather_json(fabric: Fabric, obj: Any) -> list[Any]:
    """All ranks' JSON-serialisable `obj`, as a list indexed by rank (pickle-free all_gather_object)."""
    if fabric.world_size == 1:
        return [obj]
    payload = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=fabric.device)
    lengths = fabric.all_gather(torch.tensor([payload.numel()], device=fabric.device)).flatten().tolist()
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=fabric.device)
    padded[:payload.numel()] = payload
    gathered = fabric.all_gather(padded).cpu()  # [world, max_len]
    return [json.loads(bytes(gathered[r, :n].tolist()).decode()) for r, n in enumerate(lengths)]


def broadcast_json(fabric: Fabric, obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. the run name, which holds a timestamp)."""
    return gather_json(fabric, obj)[0]


def broadcast_tensor_(fabric: Fabric, tensor: Tensor) -> Tensor:
    """Overwrites `tensor` on every rank with rank 0's copy, in place (no drift between ranks)."""
    if fabric.world_size > 1:
        torch.distributed.broadcast(tensor, src=0)
    return tensor


def all_reduce_sum(fabric: Fabric, values: dict[str, Tensor]) -> dict[str, float]:
    """Sums each value over ranks (evaluation counts), returned as floats."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].double() for k in keys])
    if fabric.world_size > 1:
        stacked = fabric.all_reduce(stacked, reduce_op="sum")
    return dict(zip(keys, stacked.tolist()))
