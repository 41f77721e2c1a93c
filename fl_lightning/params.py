"""A model's trainable parameters as one flat vector `[n_params]`: how models travel and are aggregated."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def flat_params(module: nn.Module, out: Tensor | None = None) -> Tensor:
    """All trainable parameters as one flat vector `[n_params]` (a copy), written into `out` when given."""
    params = [p.detach().reshape(-1) for p in module.parameters() if p.requires_grad]
    return torch.cat(params) if out is None else torch.cat(params, out=out)


@torch.no_grad()
def load_flat_params_(module: nn.Module, flat: Tensor) -> None:
    """Copies a flat vector into the module's trainable parameters, in place."""
    params = [p for p in module.parameters() if p.requires_grad]
    chunks = torch.split(flat, [p.numel() for p in params])
    torch._foreach_copy_(params, [c.view_as(p) for c, p in zip(chunks, params)])
