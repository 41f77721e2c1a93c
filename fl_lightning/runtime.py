"""Process set-up and teardown: Fabric's launch, CPU threads, and the glibc allocator's thresholds.

`make_fabric` launches one process per device (or joins the processes `fabric run` / `torchrun`
started); `set_threads` shares the node's cores among its processes; `teardown` destroys the
process group.

The allocator: CPU training allocates and frees the same activation buffers (a few MiB each) at every step.
glibc serves allocations above its mmap threshold with fresh `mmap` calls and gives freed heap
memory back to the kernel above its trim threshold, so every step page-faults those buffers in
again. Raising both thresholds keeps them in the heap and reuses them: on the W-EMNIST workload
this cuts page faults about 40x and a round by about 20 % (`benchmarks/README.md`). Setting only
the trim threshold makes things worse, because the dynamic mmap threshold then keeps growing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch
from lightning.fabric import Fabric

MMAP_THRESHOLD = 32 << 20
"""Allocations below 32 MiB come from the heap (glibc's default starts at 128 KiB)."""
TRIM_THRESHOLD = 2_000_000_000
"""Free heap memory is returned to the kernel only above ~2 GB."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's malloc.h


def tune_malloc() -> bool:
    """Sets glibc's mmap and trim thresholds in this process, as `MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=2000000000` would.

    Leaves the allocator alone when the user set any `MALLOC_*_` variable (their choice wins), and
    off glibc (macOS, Windows, musl), where `mallopt` does not exist or means something else.

    Returns:
        Whether the thresholds were set.
    """
    if not sys.platform.startswith("linux") or any(key.startswith("MALLOC_") for key in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; glibc applies each threshold independently.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def make_fabric(accelerator: str, devices: int, num_nodes: int, precision: str,
                callbacks: list | None = None) -> Fabric:
    """A launched Fabric with one process per device; under `fabric run`, its command line decides.

    `fabric run` passes accelerator, devices, nodes and precision through `LT_*` variables and has
    started the processes already: Fabric refuses constructor values that disagree with the
    variables, and a second launch.
    """
    if os.environ.get("LT_CLI_USED") == "1":
        return Fabric(callbacks=callbacks)
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                    strategy="ddp" if devices * num_nodes > 1 else "auto", precision=precision, callbacks=callbacks)
    fabric.launch()
    return fabric


def set_threads(num_threads: int | None, devices: int) -> None:
    """CPU threads per process: the cores of this node shared evenly among its processes."""
    if num_threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # torchrun and `fabric run` say how many processes share this node; Fabric's own launcher uses `devices`.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", devices))
        num_threads = max(1, cores // max(1, local_processes))
    torch.set_num_threads(num_threads)


def teardown(fabric: Fabric) -> None:
    """Barrier, then destroy the process group: without it, DDP runs sometimes abort at exit."""
    if fabric.world_size > 1 and torch.distributed.is_initialized():
        fabric.barrier()
        torch.distributed.destroy_process_group()
