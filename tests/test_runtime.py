"""glibc allocator tuning: it must cut the page faults of training steps and respect MALLOC_* settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Conv-net training steps (the W-EMNIST model's shapes): counts the minor page faults of 20 steps.
STEPS = """
import resource, sys, torch
import torch.nn.functional as F
from fl_lightning.runtime import tune_malloc
print(tune_malloc() if sys.argv[1] == "tune" else False)
torch.set_num_threads(1)
conv1, conv2, fc = torch.nn.Conv2d(1, 32, 3), torch.nn.Conv2d(32, 64, 3), torch.nn.Linear(9216, 10)
x = torch.randn(32, 1, 28, 28)
def step():
    h = F.max_pool2d(F.relu(conv2(F.relu(conv1(x)))), 2)
    fc(h.flatten(1)).sum().backward()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")


def page_faults(mode: str, **env: str) -> tuple[bool, int]:
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", STEPS, mode], env=clean_env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuning_cuts_page_faults_of_training_steps() -> None:
    applied, tuned = page_faults("tune")
    _, default = page_faults("default")
    assert applied
    # 40x fewer in a quiet run; glibc's adaptive mmap threshold makes the default count vary (7k to 95k)
    assert tuned < default, (tuned, default)


# A fresh process asks for 16 MiB: glibc's default (128 KiB mmap threshold) maps it; tuned, it comes from the heap.
HEAP_OR_MMAP = '''
import ctypes, sys
from fl_lightning.runtime import tune_malloc
if sys.argv[1] == "tune":
    assert tune_malloc()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                      "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblkhd
pointer = libc.malloc(16 << 20)
print(libc.mallinfo2().hblkhd - before)
'''


def test_tuned_allocations_below_32_mib_come_from_the_heap() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    mapped = {mode: int(subprocess.run([sys.executable, "-c", HEAP_OR_MMAP, mode], env=env, capture_output=True,
                                       text=True, check=True).stdout) for mode in ("tune", "default")}
    assert mapped == {"tune": 0, "default": pytest.approx(16 << 20, abs=1 << 13)}


def test_user_malloc_settings_win() -> None:
    applied, _ = page_faults("tune", MALLOC_ARENA_MAX="2")
    assert not applied
