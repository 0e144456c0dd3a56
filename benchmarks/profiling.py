"""Where the time of a DPO step goes: the torch profiler over the timed steps of sacpo (cached reference) and TRL
(live reference), the two sides of the headline comparison, each in the same child one after the other.

The profiler is stepped by the same optimizer post-step hook that times the benchmark, so its active window is
exactly the timed steps. Self CPU time is grouped by phase (the op's ancestors: optimizer step, backward, the rest
= forward, loss, data, clipping) and by kind of op (matmul, attention, softmax/logsumexp, other).
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from typing import Any

from benchmarks.common import child_main

KINDS = [
    ("matmul (mm/addmm/bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_")),
    ("attention (sdpa)", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("softmax / logsumexp / exp", ("softmax", "logsumexp", "aten::exp", "log_softmax")),
    (
        "copies / cat / index",
        ("aten::copy_", "aten::cat", "aten::index", "aten::gather", "aten::scatter", "aten::clone"),
    ),
]


def _phase(ev: Any) -> str:
    node = ev
    while node is not None:
        name = node.name
        if name.startswith("Optimizer.step"):
            return "optimizer step"
        if name.startswith("Optimizer.zero_grad"):
            return "zero_grad"
        if name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        node = node.cpu_parent
    return "forward, loss and the rest"


def _kind(name: str) -> str:
    for kind, patterns in KINDS:
        if any(p in name for p in patterns):
            return kind
    return "elementwise / other"


def profiled(fn: Any, spec: dict[str, Any]) -> dict[str, Any]:
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    wait = spec["profile_warmup"] - 1  # prof.step #0 ends at the first optimizer step (setup included)
    active = spec["steps"] - spec["profile_warmup"]
    prof = profile(
        activities=[ProfilerActivity.CPU], schedule=schedule(wait=wait, warmup=1, active=active, repeat=1)
    )
    times: list[float] = []

    def hook(*_: Any) -> None:
        times.append(time.perf_counter())
        prof.step()

    handle = register_optimizer_step_post_hook(hook)
    try:
        with prof:
            fn(spec)
    finally:
        handle.remove()
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    by_phase: dict[str, float] = defaultdict(float)
    by_kind: dict[str, float] = defaultdict(float)
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in events:
        us = ev.self_cpu_time_total
        if us <= 0:
            continue
        by_phase[_phase(ev)] += us
        by_kind[_kind(ev.name)] += us
        by_op[ev.name][0] += us
        by_op[ev.name][1] += 1
    total = sum(by_phase.values())
    ms = 1e-3 / active
    intervals = [b - a for a, b in itertools.pairwise(times[-active - 1 :])]
    top = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "steps": active,
        "seconds_per_step": sum(intervals) / len(intervals),
        "total_ms": total * ms,
        "categories": [(f"phase: {k}", v * ms) for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])]
        + [(f"kind: {k}", v * ms) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])],
        "top_ops": [(name, v[0] * ms, v[1] / active) for name, v in top],
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks import dpo_step

    sides = {}
    for side, ref in (("sacpo", "cached"), ("trl", "live")):
        s = {**spec, "side": side, "ref": ref, "tag": f"profile-{side}"}
        fn = dpo_step.run_sacpo if side == "sacpo" else dpo_step.run_trl
        try:
            sides[f"{side}/{ref}"] = profiled(fn, s)
        except Exception as e:  # report, don't lose the other side
            sides[f"{side}/{ref}"] = {"error": f"{type(e).__name__}: {e}"}
    return {"sides": sides}


if __name__ == "__main__":
    child_main(run)
