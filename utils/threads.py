"""torch's CPU thread count, set for a block and restored."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside, restoring the count after, also on an error. It
    changes a process-wide setting: not for use while other threads run torch. Used where a
    result must not depend on the thread count (the branch networks: with 2 threads, training on
    the same inputs gave other networks in another process; 3 passes, the weights differed
    between two processes and were identical with 1 thread) and in tests, where thread start-up
    and contention dominate tiny tensors."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
