"""Shared fixtures: the real offline data, a clean process-group state, and the repo root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline data root (`$FL_LIGHTNING_DATA`, else `../shared/data` beside the checkout).

    Tests on real data fail, rather than skip, when it is missing: CI must run them.
    """
    root = Path(os.environ.get("FL_LIGHTNING_DATA") or REPO_ROOT.parent / "shared" / "data")
    if not (root / "mnist" / "mnist.npz").is_file():
        pytest.fail(f"offline data not found at {root}; set FL_LIGHTNING_DATA to the shared data folder")
    return root


@pytest.fixture(autouse=True)
def _clean_torch_state():
    """Restores global torch state a test may change, and tears down any process group."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
