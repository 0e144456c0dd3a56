"""`sacpo merge CONFIG`: P-SACPO merges θ = (1−q)·θ_a + q·θ_b of two model directories for several q.

cfg = load_config(MergeConfig, "configs/merge.yaml", ["qs=[0.5]"])
records = run_merge(cfg)           # <output_dir>/q<q>/ (HF model dirs), config.yaml, metrics.jsonl
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sacpo.config import ModelDtype, Probability, config_dataclass, help_field, to_yaml
from sacpo.fsutil import atomic_write_jsonl, atomic_write_text
from sacpo.merge.linear import merge_dirs
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
        help="dtype of the merged weights (auto | bf16 | fp16 | fp32; auto = θ_a's own). The inputs are read as "
        "stored and interpolated in float32",
    )


def run_merge(cfg: MergeConfig) -> list[dict[str, Any]]:
    """Merge for every q (each model dir written atomically by `merge_dirs`); returns one record per q."""
    out = Path(cfg.output_dir)
    dtype = resolve_dtype(cfg.dtype, cfg.a)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    records = []
    for q in cfg.qs:
        started = time.perf_counter()
        path = merge_dirs(cfg.a, cfg.b, q, out / f"q{q:g}", dtype)
        records.append(
            {"q": q, "a": cfg.a, "b": cfg.b, "model": str(path), "seconds": time.perf_counter() - started}
        )
    atomic_write_jsonl(out / "metrics.jsonl", records, ensure_ascii=True)
    return records
