"""The hardware limit: fp32 matmul FLOP/s of this CPU with torch (square sizes, best of N after a warm-up)."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import child_main


def matmul_flops(n: int, repeats: int) -> float:
    """Best FLOP/s of `torch.mm` on (n, n) fp32 matrices (2·n³ FLOPs per product)."""
    import torch

    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    inner = max(1, int(2e9 // (2 * n**3)))  # ≥ ~2 GFLOP per timing so the clock resolution does not matter
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        best = max(best, 2 * n**3 * inner / (time.perf_counter() - started))
    return best


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    sizes = spec.get("sizes", [256, 512, 1024, 2048])
    flops = {str(n): matmul_flops(n, spec.get("repeats", 5)) for n in sizes}
    return {"matmul_flops": flops, "peak_flops": max(flops.values()), "threads": torch.get_num_threads()}


if __name__ == "__main__":
    child_main(run)
