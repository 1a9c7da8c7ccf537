"""What the benchmarks share: a free port on 127.0.0.1 and the machine's matmul peak
(reported beside every throughput: two machines sold as one CPU model differ)."""

from __future__ import annotations

import socket
import time

import numpy as np


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def matmul_gflops(n=2048, repeats=5):
    """NumPy's best float32 matmul rate (``n`` x ``n``), GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm: BLAS threads, pages
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
