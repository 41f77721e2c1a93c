"""Tuned numerics over the stacked client updates `[n, n_params]`, with their constants.

The aggregation rules (`fl_lightning.aggregation`, `fl_lightning.callbacks`) read as their papers'
math; the work that has to be fast, accurate at millions of parameters and independent of the
thread count lives here:

    - `weighted_sum`: `sum_i w_i rows[i]`, row after row in a fixed order (FedAvg, Multi-Krum,
      clipping, RFA's float64 result).
    - `gram_matrix`, `distance_gram`, `pairwise_sq_distances`: `rows @ rows.T` by blocks of columns
      with float64 sums across blocks, centred when the updates are close, and the squared
      distances taken from it (Krum, Multi-Krum, RFA).
    - `row_norms`: L2 norms by blocks of columns, summed in float64 (norm clipping).
    - `sort_columns`, `by_column_chunks`: column-wise sorts by chunks (coordinate median, trimmed mean).
    - `fp32_matmul_is_exact`: whether float32 matmuls may run at reduced precision (TF32, bf16).

The constants were tuned on the development CPU; the measurements behind them, with their
commands, are in `benchmarks/README.md`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

WIDE_SUM_CHUNK = 1 << 18
"""Columns per chunk of a sum wider than its rows (a 2 MiB float64 accumulator: the CPUs' L2 caches)."""
GRAM_BLOCK = 4096
"""Columns per block of the Gram product: small enough for float32 accumulation to stay accurate."""
GRAM_MAX_PARTIAL = 1 << 25
"""Most elements of per-block partial Gram matrices (or float64 copies of blocks) held at once."""
GRAM_CPU_PANEL = 16
"""Columns of the Gram matrix per product on CPUs: MKL's fast kernels want the second operand's row
count to be a multiple of 16 (the first operand's may be anything)."""
GRAM_CPU_GROUP_BYTES = 8 << 20
"""Bytes of updates multiplied per group of blocks on CPUs: every panel of a group reads it from the cache."""
NORM_BLOCK = 4096
"""Columns per block of the row norms (short float32 accumulations, summed in float64)."""
CENTRE_BELOW = 1e-3
"""Squared distance of a pair, relative to the sum of its squared norms, below which distances come from a centred
Gram matrix."""
SORT_COLUMN_CHUNK = 65536
"""Columns per chunk of the coordinate-wise sorts on the CPU (bounds the sorted copy)."""


def weighted_sum(rows: Tensor, weights: Tensor | Sequence[float], dtype: torch.dtype | None = None) -> Tensor:
    """`sum_i weights[i] * rows[i]` over `rows [n, n_params]`, accumulated row after row in `dtype`, `[n_params]`.

    A matrix-vector product would be as fast, but BLAS splits its reduction by thread count, so
    the result would change in the last bits with the number of processes; element-wise adds in a
    fixed row order do not, which keeps the global model bitwise equal on 1 and N processes. Rows of
    weight 0 are skipped.

    When `dtype` is wider than the rows' (RFA's float64 sum of float32 rows) on a CPU, the sum runs
    over column chunks of `WIDE_SUM_CHUNK`, so the wide accumulator stays in the cache (about 12x
    faster at 100 x 10M), with bitwise the same result (the same adds per element, in the same
    order). For sums in the rows' own dtype whole rows are faster.

    Args:
        rows: `[n, n_params]`.
        weights: `[n]`, a tensor or floats.
        dtype: Accumulation and result dtype; None: the rows'.
    """
    weights = weights.tolist() if isinstance(weights, Tensor) else [float(w) for w in weights]
    dtype = dtype or rows.dtype
    total = torch.zeros(rows.shape[1], dtype=dtype, device=rows.device)
    wide = rows.device.type == "cpu" and torch.finfo(dtype).bits > torch.finfo(rows.dtype).bits
    chunk = WIDE_SUM_CHUNK if wide else max(rows.shape[1], 1)
    for start in range(0, rows.shape[1], chunk):
        accumulator = total[start:start + chunk]  # a view: adds land in `total`
        for weight, row in zip(weights, rows[:, start:start + chunk]):
            if weight != 0:
                accumulator.add_(row, alpha=weight)
    return total


def gram_matrix(deltas: Tensor, centred: bool = False) -> Tensor:
    """The Gram matrix `deltas @ deltas.T` of the client updates, with float64 accumulation across blocks.

    The columns are split into blocks of `GRAM_BLOCK`; batched matrix products give every block's
    partial Gram matrix (plus one product for the last `n_params % GRAM_BLOCK` columns), and the
    partials are summed in float64. That keeps the float32 accumulation of each entry short
    (relative error ~1e-7, where a single float32 product over 10M columns reaches ~1e-3) at the
    speed of a single float32 product. The block layout depends only on the shape, and the
    per-block products are summed in a fixed order, so the result does not depend on the thread
    count. Where float32 matmuls may run at reduced precision (TF32 on GPUs, bf16 on CPUs, after
    `torch.set_float32_matmul_precision("high")` or the like), the blocks are multiplied in float64.

    On CPUs only the lower triangle is multiplied, by panels of `GRAM_CPU_PANEL` columns straight
    from the updates: with 30 clients, rows 0-29 times rows 0-15, then rows 16-29 times rows 14-29
    (the last panel is shifted to end at the last row, so no zero rows are needed). That is 30% fewer
    products than the full 30 x 30, at the kernels' fast sizes, with no copy of the updates.

    With `centred`, the Gram matrix is that of the updates less a centre `c` close to their mean,
    `G[i, j] = <deltas[i] - c, deltas[j] - c>`. Its rounding errors are then relative to the spread
    of the updates around `c` instead of to their size, which is what distances between
    near-identical updates need (see `pairwise_sq_distances`). `c` is each group's column mean in
    the updates' dtype, taken while the group is in the cache, and subtracted into a buffer that
    the products read. Any `c` gives the same distances, so it need not be exact: only
    deterministic, and near the updates.

    Args:
        deltas: Client updates, `[n, n_params]`.
        centred: Whether to subtract the centre `c` first.

    Returns:
        `G[i, j] = <deltas[i] - c, deltas[j] - c>` (`c = 0` unless `centred`), `[n, n]`, float64 on
        the CPU, exactly symmetric.
    """
    n, n_params = deltas.shape
    deltas = deltas.contiguous()
    exact = deltas.dtype == torch.float64 or fp32_matmul_is_exact(deltas.device)
    compute_dtype = deltas.dtype if exact else torch.float64
    num_blocks = n_params // GRAM_BLOCK
    if deltas.device.type == "cpu":
        width = min(GRAM_CPU_PANEL, n)
        blocks_per_product = max(1, GRAM_CPU_GROUP_BYTES // (n * GRAM_BLOCK * deltas.element_size()))
    else:  # one panel: the whole product, in as few kernel launches as the partials' memory allows
        width = n
        blocks_per_product = max(1, GRAM_MAX_PARTIAL // (n * n))
    panels = [(first, min(first, n - width)) for first in range(0, n, width)]  # (first row, first column)
    buffer = None
    if compute_dtype != deltas.dtype or centred:
        blocks_per_product = max(1, min(blocks_per_product, GRAM_MAX_PARTIAL // (n * GRAM_BLOCK)))
        buffer = torch.empty(blocks_per_product, n, GRAM_BLOCK, dtype=compute_dtype, device=deltas.device)
    gram = torch.zeros(n, n, dtype=torch.float64, device=deltas.device)
    for first_block in range(0, num_blocks, blocks_per_product):
        count = min(blocks_per_product, num_blocks - first_block)
        cols = deltas[:, first_block * GRAM_BLOCK:(first_block + count) * GRAM_BLOCK]  # [n, count * block], a view
        blocks = cols.view(n, count, GRAM_BLOCK).transpose(0, 1)  # [count, n, block], a view
        if centred:  # the group's column means subtracted into the buffer
            centre = cols.mean(dim=0).view(count, 1, GRAM_BLOCK)  # [count, 1, block]; 30x faster than on `blocks`
            blocks = torch.sub(blocks, centre, out=buffer[:count])
        elif buffer is not None:
            blocks = buffer[:count].copy_(blocks)  # cast to compute_dtype
        for first, start in panels:
            panel = blocks[:, start:start + width]  # [count, width, block]
            partial = torch.bmm(blocks[:, first:], panel.transpose(1, 2))  # [count, n - first, width]
            # the shifted last panel's first columns are the previous panel's: skip them
            gram[first:, first:start + width] += partial[:, :, first - start:].sum(0, dtype=torch.float64)
    tail = deltas[:, num_blocks * GRAM_BLOCK:]  # [n, n_params % block]
    tail = (tail - tail.mean(dim=0) if centred and tail.shape[1] else tail).to(compute_dtype)
    if tail.shape[1]:
        gram += (tail @ tail.T).to(torch.float64)
    lower = gram.cpu().tril()  # entries above the diagonal are partial or missing
    return lower + lower.tril(-1).T


def distance_gram(deltas: Tensor) -> Tensor:
    """A Gram matrix of the updates, or of the updates less a common centre, that resolves their distances.

    Distances are the same from both (`|a - b|^2 = |a - c|^2 + |b - c|^2 - 2<a - c, b - c>` for any
    `c`), but their rounding errors are not: the float32 products err by ~1e-7 of the squared norms
    of what they multiply. From the plain Gram matrix that is ~1e-7 of `|update|^2` on every
    distance, so updates closer than ~0.1 % of their size (colluding near-copies, late rounds) get
    distances off by more than the distances themselves. The plain Gram matrix is kept when every
    pair's squared distance is at least `CENTRE_BELOW` times the sum of the pair's squared norms:
    its errors are then at most a few 1e-4 of each distance. Otherwise a second pass gives the centred one
    (`gram_matrix(deltas, centred=True)`), whose errors are ~1e-7 of the spread's square. Always
    centring would cost ordinary rounds an extra pass over the updates (`benchmarks/README.md`).

    Args:
        deltas: Client updates, `[n, n_params]`.

    Returns:
        `[n, n]`, float64 on the CPU, exactly symmetric: `G[i, j] = <deltas[i] - c, deltas[j] - c>`
        with `c = 0` or `c` near the updates' mean.
    """
    gram = gram_matrix(deltas)  # [n, n]
    if deltas.shape[0] > 1:
        sq_norms = gram.diagonal()  # [n]
        others = sq_distances(gram)  # [n, n]
        others.fill_diagonal_(math.inf)  # an update is not close to itself
        if bool((others < CENTRE_BELOW * (sq_norms[:, None] + sq_norms[None, :])).any()):
            return gram_matrix(deltas, centred=True)
    return gram


def sq_distances(gram: Tensor) -> Tensor:
    """`|a - b|^2 = G[a, a] + G[b, b] - 2 G[a, b]` from a Gram matrix `[n, n]`, clamped at 0 (cancellation
    can leave tiny negative values for identical updates), `[n, n]`."""
    sq_norms = gram.diagonal()  # [n]
    return (sq_norms[:, None] + sq_norms[None, :] - 2 * gram).clamp_min(0)


def pairwise_sq_distances(deltas: Tensor) -> Tensor:
    """All pairwise squared Euclidean distances between client updates, from one Gram matrix (`distance_gram`).

    Args:
        deltas: Client updates, `[n, n_params]`.

    Returns:
        `D[i, j] = |deltas[i] - deltas[j]|^2`, `[n, n]`, float64 on the CPU, zero diagonal.
    """
    dists = sq_distances(distance_gram(deltas))  # [n, n]
    dists.fill_diagonal_(0)
    return dists


def row_norms(deltas: Tensor) -> Tensor:
    """L2 norm of every update, `[n]`, accurate at millions of parameters.

    `torch.linalg.vector_norm(deltas, dim=1)` accumulates a whole row in float32: at 10M parameters
    its relative error reaches ~3e-4. Here each block of `NORM_BLOCK` columns gets its own norm and
    the squares are summed in float64 (relative error ~1e-8). Every reduction has many outputs, so
    each is computed on one thread and the result does not depend on the thread count.
    """
    n, n_params = deltas.shape
    deltas = deltas.contiguous()
    num_blocks = n_params // NORM_BLOCK
    blocks = deltas[:, : num_blocks * NORM_BLOCK].view(n, num_blocks, NORM_BLOCK)  # a view
    sq_norms = torch.linalg.vector_norm(blocks, dim=2).to(torch.float64).square().sum(dim=1)  # [n]
    sq_norms += deltas[:, num_blocks * NORM_BLOCK:].to(torch.float64).square().sum(dim=1)  # the tail columns
    return sq_norms.sqrt().to(deltas.dtype)


def row_dots(deltas: Tensor, vector: Tensor) -> Tensor:
    """`deltas @ vector`, `[n]`, accurate at millions of parameters and independent of the thread count.

    Unlike a norm, a dot product cancels (its terms have both signs), so float32 sums would lose
    digits: the products are taken in float64 (exact for float32 inputs) by chunks of
    `SORT_COLUMN_CHUNK` columns (bounding the copy to `[n, SORT_COLUMN_CHUNK]`), each block of
    `NORM_BLOCK` columns reduced on one thread, so the sums do not depend on the thread count.
    """
    n, n_params = deltas.shape
    total = torch.zeros(n, dtype=torch.float64, device=deltas.device)
    for start in range(0, n_params, SORT_COLUMN_CHUNK):
        stop = min(start + SORT_COLUMN_CHUNK, n_params)
        products = deltas[:, start:stop].to(torch.float64) * vector[start:stop].to(torch.float64)  # [n, cols]
        num_blocks = products.shape[1] // NORM_BLOCK
        total += products[:, : num_blocks * NORM_BLOCK].view(n, num_blocks, NORM_BLOCK).sum(dim=2).sum(dim=1)
        total += products[:, num_blocks * NORM_BLOCK:].sum(dim=1)  # the tail columns
    return total


def sort_columns(block: Tensor) -> Tensor:
    """`block [n, cols]` sorted along dim 0.

    On the CPU numpy's vectorised sort does it 3-4x faster than `torch.sort` over short columns,
    fastest on contiguous `[cols, n]` rows; sorting is exact, so both give the same values.
    """
    if block.device.type == "cpu" and block.dtype in (torch.float32, torch.float64):
        rows = np.ascontiguousarray(block.detach().numpy().T)  # [cols, n]: each column a contiguous row
        return torch.from_numpy(np.sort(rows, axis=1)).T  # [n, cols], a transposed view
    return block.sort(dim=0).values


def by_column_chunks(rows: Tensor, reduce: Callable[[Tensor], Tensor], chunk: int | None = None) -> Tensor:
    """Applies a column-wise `reduce` (`[n, cols] -> [cols]`) by chunks of `chunk` columns on the CPU
    (bounding the sorted copy; None: `SORT_COLUMN_CHUNK`), at once on GPUs.

    On the CPU the chunks are spread over `torch.get_num_threads()` threads: numpy's sort, the bulk of
    the work, runs on one core and releases the GIL. Each chunk is reduced alone, by the same
    operations, so the result does not depend on the thread count.
    """
    if rows.device.type != "cpu":  # memory is not the limit there, and every chunk would cost kernel launches
        return reduce(rows)
    chunk = SORT_COLUMN_CHUNK if chunk is None else chunk
    out = torch.empty(rows.shape[1], dtype=rows.dtype)
    starts = range(0, rows.shape[1], chunk)

    def fill(start: int) -> None:
        out[start:start + chunk] = reduce(rows[:, start:start + chunk])

    workers = min(torch.get_num_threads(), len(starts))
    if workers <= 1:
        for start in starts:
            fill(start)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, starts))  # list(): re-raises a chunk's exception here
    return out


def fp32_matmul_is_exact(device: torch.device) -> bool:
    """Whether float32 matmuls on `device` run in IEEE float32 (not TF32 or bf16)."""
    backend = torch.backends.cuda.matmul if device.type == "cuda" else getattr(torch.backends.mkldnn, "matmul", None)
    precision = getattr(backend, "fp32_precision", None)
    if precision is None:  # torch before the per-backend API: only the global switch exists
        return torch.get_float32_matmul_precision() == "highest"
    return precision in ("none", "ieee")
