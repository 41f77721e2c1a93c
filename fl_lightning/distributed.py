"""Collectives of a round: gather the clients' updates, broadcast the new global model.

Every function here runs a collective and must be called on every rank (never under
`if fabric.is_global_zero`), with the same arguments in the same order, or the run hangs.
Nothing is pickled: per-client metadata travels as JSON bytes in a uint8 tensor.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import Tensor

from fl_lightning.client import ClientUpdate, RoundUpdates


def gather_updates(fabric: Fabric, local: list[ClientUpdate], num_slots: int, num_params: int) -> RoundUpdates:
    """Gathers every rank's client updates into one `RoundUpdates`, in slot order, on every rank.

    Ranks hold `ceil(num_slots / world)` or one fewer updates: each pads to the larger count with
    zero rows (all_gather needs equal shapes), and the padding is dropped after the gather.
    """
    device = fabric.device
    rows_per_rank = math.ceil(num_slots / fabric.world_size)
    deltas = torch.zeros(rows_per_rank, num_params, device=device)  # [rows, n_params], zero padded
    for row, update in enumerate(local):
        deltas[row] = update.delta
    meta = [{"slot": u.slot, "client_id": u.client_id, "num_examples": u.num_examples, "loss": u.loss,
             "is_adversary": u.is_adversary, "stats": u.stats} for u in local]
    if fabric.world_size > 1:
        deltas = fabric.all_gather(deltas).reshape(-1, num_params)  # [world * rows, n_params]
    all_meta = gather_json(fabric, meta)  # one list per rank
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
    if index != list(range(deltas.shape[0])):  # one process and no padding: already in order, no copy
        deltas = deltas.index_select(0, torch.tensor(index, device=device))
    return RoundUpdates(
        client_ids=torch.tensor([r["client_id"] for r in records], dtype=torch.int64),
        deltas=deltas,
        num_examples=torch.tensor([float(r["num_examples"]) for r in records], device=device),
        losses=torch.tensor([r["loss"] for r in records]),
        is_adversary=torch.tensor([r["is_adversary"] for r in records], dtype=torch.bool),
        stats=[r["stats"] for r in records],
    )


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
