"""Shared helpers for the FSDP probes: a tiny GPT-2 built once under /tmp/fsdp_probe."""
import os, sys
from pathlib import Path
ROOT = Path(os.environ.get("PROBE_ROOT", "/tmp/fsdp_probe"))

def tiny(seed=0):
    from sacpo.models.tiny import build_tiny_gpt2
    p = ROOT / "gpt2"
    if not (p / "config.json").exists():
        build_tiny_gpt2(p, seed=seed)
    return p

def load(seed=0):
    import torch
    from transformers import GPT2LMHeadModel
    m = GPT2LMHeadModel.from_pretrained(tiny(seed))
    m.config.use_cache = False
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return m

def batch(seed, n=4, T=16):
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, T), generator=g)
