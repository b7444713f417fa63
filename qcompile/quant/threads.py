"""One CPU thread for the rounding algorithms' loops (GPTQ, HQQ): each step is a tensor op of a few thousand to
a few million elements, and OpenMP's fork/join per op costs more than the op once the cores are shared (HQQ on a
1536x384 weight: 0.12 s on one thread, 1.46 s on two of a 2-core machine at load 6)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """torch's intra-op threads set to 1 while the block runs on `device` "cpu"; restored after."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
