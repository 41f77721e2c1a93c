"""Run state on disk: one safetensors file per checkpoint, written atomically, no pickle.

The file holds the flat global model (`global_params`) and, in its string metadata, a JSON record
of everything else a resume needs (the round, the task, the W&B run id, callback state). Because
all randomness derives from (seed, round, client), that is the whole state: a run resumed from
round t continues bitwise as if it had never stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

CHECKPOINT_NAME = "checkpoint.safetensors"
AGGREGATOR_PREFIX = "aggregator/"  # the aggregator state's tensors in a checkpoint
MODEL_NAME = "model.safetensors"


@dataclass
class RunState:
    """What a checkpoint holds: the round last completed, the flat global model, and what a resume needs.

    Attributes:
        round_idx: The last completed round (0: the start model).
        global_params: The flat global model, `[n_params]`, on the run's device.
        wandb_id: The W&B run to continue on resume, if any.
        callback_states: Each callback's `state_dict`, in the order of `--callbacks`.
        aggregator_state: The aggregator's `state_dict` (named tensors), saved beside the model.
    """

    round_idx: int
    global_params: Tensor
    wandb_id: str | None = None
    callback_states: tuple[dict, ...] = ()
    aggregator_state: dict[str, Tensor] = field(default_factory=dict)

    def save(self, path: Path, task_name: str) -> Path:
        """Writes the state as a checkpoint (`save_checkpoint`)."""
        return save_checkpoint(path, self.global_params, {
            "round_idx": self.round_idx, "task": task_name, "wandb_id": self.wandb_id,
            "callbacks": list(self.callback_states)}, self.aggregator_state)


def save_checkpoint(path: Path, global_params: Tensor, state: dict[str, Any],
                    aggregator_state: dict[str, Tensor] | None = None) -> Path:
    """Writes `global_params`, the aggregator's tensors and the JSON `state` to `path`: temporary file, fsync, rename.

    A kill at any moment leaves either the previous checkpoint or the new one, never half a file.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".tmp")
    tensors = {f"{AGGREGATOR_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in (aggregator_state or {}).items()}
    save_file({"global_params": global_params.detach().float().cpu().contiguous(), **tensors}, str(partial),
              metadata={"state": json.dumps(state)})
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


def load_checkpoint(path: Path) -> tuple[Tensor, dict[str, Any]]:
    """Reads a checkpoint written by `save_checkpoint`: (flat global model on CPU, state)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if "global_params" not in handle.keys() or "state" not in metadata:
            raise ValueError(f"{path} is not an fl_lightning checkpoint (no global_params / state)")
        return handle.get_tensor("global_params"), json.loads(metadata["state"])


def load_aggregator_state(path: Path) -> dict[str, Tensor]:
    """The aggregator's tensors saved in a checkpoint (empty for a rule without state)."""
    with safe_open(str(path), framework="pt") as handle:
        return {k[len(AGGREGATOR_PREFIX):]: handle.get_tensor(k) for k in handle.keys()
                if k.startswith(AGGREGATOR_PREFIX)}


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file from a path that may be a run directory (prefers the resumable checkpoint)."""
    path = Path(path)
    if path.is_dir():
        for name in (CHECKPOINT_NAME, MODEL_NAME):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"run directory {path} holds neither {CHECKPOINT_NAME} nor {MODEL_NAME}")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    return path
