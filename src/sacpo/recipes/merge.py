"""`sacpo merge CONFIG`: P-SACPO merges θ = (1−q)·θ_a + q·θ_b of two model directories for several q.

cfg = load_config(MergeConfig, "configs/merge.yaml", ["qs=[0.5]"])
records = run_merge(cfg)           # <output_dir>/q<q>/ (model or adapter dirs), config.yaml, metrics.jsonl

a and b may be full models or LoRA adapter directories; two adapters on one base merge into an adapter
(`sacpo.merge.linear`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sacpo.config import ModelDtype, Probability, config_dataclass, help_field, to_yaml
from sacpo.fsutil import atomic_write_jsonl, atomic_write_text
from sacpo.merge.linear import MERGE_FILE, MergeOutput, merge_dirs
from sacpo.models.dtypes import resolve_dtype


@config_dataclass
class MergeConfig:
    a: str = help_field(help="model directory θ_a (P-SACPO: step-1 policy)")
    b: str = help_field(help="model directory θ_b (P-SACPO: step-2 policy, large λ)")
    output_dir: str = help_field(help="writes <output_dir>/q<q>/ for each q")
    qs: list[Probability] = help_field(
        [0.25, 0.5, 0.75], help="merge weights: θ = (1−q)·θ_a + q·θ_b", min_length=1
    )
    dtype: ModelDtype = help_field(
        "auto",
        help="dtype of a full-model merge (auto | bf16 | fp16 | fp32; auto = the dtype θ_a's base is stored in). The "
        "inputs are read as stored and interpolated in float32; an adapter merge keeps the adapters' dtype",
    )
    output: MergeOutput = help_field(
        "auto",
        help="adapter: write each merge as a LoRA adapter on the shared base (a and b adapter directories on one "
        "base; exact up to float rounding); dense: a full model; auto: adapter when a and b allow it, else dense",
    )


def run_merge(cfg: MergeConfig) -> list[dict[str, Any]]:
    """Merge for every q (each model dir written atomically by `merge_dirs`); returns one record per q."""
    out = Path(cfg.output_dir)
    dtype = (
        None if cfg.dtype == "auto" else resolve_dtype(cfg.dtype, cfg.a)
    )  # auto: merge_dirs reads a's base
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    records = []
    for q in cfg.qs:
        started = time.perf_counter()
        path = merge_dirs(cfg.a, cfg.b, q, out / f"q{q:g}", cfg.output, dtype)
        kind = json.loads((path / MERGE_FILE).read_text())["output"]
        records.append(
            {
                "q": q,
                "a": cfg.a,
                "b": cfg.b,
                "model": str(path),
                "output": kind,
                "seconds": time.perf_counter() - started,
            }
        )
    atomic_write_jsonl(out / "metrics.jsonl", records, ensure_ascii=True)
    return records
