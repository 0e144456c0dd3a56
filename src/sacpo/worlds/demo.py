"""The embedded default run of `sacpo demo`: the SACPO story on a tiny local GPT-2 and the PKU-schema fixture.

SFT (builtin tiny GPT-2) → DPO on helpfulness (β) → DPO on safety from that policy with β/λ for a λ sweep →
P-SACPO merges of step 1 with the largest-λ step 2 over q → the naive merge baseline (DPO(helpful) ⊕ DPO(safe),
both from SFT). Runs on 2 CPU cores in a few minutes; `quick` shrinks it to seconds for tests.
"""

from __future__ import annotations

from pathlib import Path

from sacpo.config import from_dict
from sacpo.train.pipeline import PipelineConfig
from sacpo.worlds.fixture import write_pku_fixture


def demo_config(out_dir: str | Path, quick: bool = False) -> PipelineConfig:
    """The demo pipeline, writing its fixture data under out_dir/data."""
    out = Path(out_dir)
    data = str(write_pku_fixture(out / "data" / "pku_tiny.jsonl", n_rows=48 if quick else 192))
    steps = 4 if quick else 40
    lams = [1.0, 4.0] if quick else [0.5, 1.0, 2.0, 4.0]
    return from_dict(
        PipelineConfig,
        {
            "policy": "builtin:tiny-gpt2",
            "output_dir": str(out),
            "defaults": {
                "max_steps": steps,
                "batch_size": 8,
                "lr": 5e-4,
                "warmup_ratio": 0.1,
                "max_length": 96,
                "max_prompt_length": 48,
                "log_every": max(1, steps // 4),
                "kl_prompts": 4 if quick else 16,
                "kl_max_new_tokens": 24 if quick else 48,
            },
            "stages": [
                {
                    "name": "helpful",
                    "data": {"source": data, "format": "pku_helpful"},
                    "loss": "dpo",
                    "beta": 0.1,
                },
                {"name": "safe", "data": {"source": data, "format": "pku_safe"}, "loss": "dpo", "lam": lams},
                {
                    "name": "safe_kto",
                    "start_from": "helpful",
                    "data": {"source": data, "format": "pku_safe_kto"},
                    "loss": "kto",
                    "lam": lams[-1],
                },
                {
                    "name": "safe_from_sft",
                    "start_from": "sft",
                    "data": {"source": data, "format": "pku_safe"},
                    "loss": "dpo",
                    "beta": 0.1,
                },
            ],
            "merges": [
                {"name": "psacpo", "a": "helpful", "b": f"safe-lam{lams[-1]:g}", "qs": [0.25, 0.5, 0.75]},
                {"name": "naive", "a": "helpful", "b": "safe_from_sft", "qs": [0.5]},
            ],
        },
    )
