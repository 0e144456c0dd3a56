"""The hardware limit: matmul FLOP/s with torch (square sizes, best of N after a warm-up).

fp32 on this CPU by default (`benchmarks.run`); spec `device` "cuda" and `dtype` "bfloat16" measure the GPU's dense
bf16 peak for the GPU check (benchmarks/gpu.py), each timing closed by `torch.cuda.synchronize`.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import child_main


def matmul_flops(
    n: int, repeats: int, device: str = "cpu", dtype: str = "float32", min_flop: float = 2e9
) -> float:
    """Best FLOP/s of `torch.mm` on (n, n) matrices (2·n³ FLOPs per product) of `dtype` on `device`."""
    import torch

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dt)
    out = torch.empty(n, n, device=device, dtype=dt)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    torch.mm(a, b, out=out)  # warm-up
    sync()
    inner = max(
        1, int(min_flop // (2 * n**3))
    )  # ≥ min_flop per timing so the clock resolution does not matter
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync()
        best = max(best, 2 * n**3 * inner / (time.perf_counter() - started))
    return best


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    sizes = spec.get("sizes", [256, 512, 1024, 2048])
    device, dtype = spec.get("device", "cpu"), spec.get("dtype", "float32")
    min_flop = spec.get("min_flop", 2e9)
    flops = {str(n): matmul_flops(n, spec.get("repeats", 5), device, dtype, min_flop) for n in sizes}
    return {
        "matmul_flops": flops,
        "peak_flops": max(flops.values()),
        "threads": torch.get_num_threads(),
        "device": device,
        "dtype": dtype,
    }


if __name__ == "__main__":
    child_main(run)
