"""Compare model/ weights and metrics.jsonl of two sacpo run dirs. argv: dirA dirB [file]"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
a, b = Path(sys.argv[1]), Path(sys.argv[2])
f = sys.argv[3] if len(sys.argv) > 3 else "model.safetensors"
wa, wb = load_file(a / "model" / f), load_file(b / "model" / f)
assert set(wa) == set(wb), set(wa) ^ set(wb)
d = {k: (wa[k].float() - wb[k].float()).abs().max().item() for k in wa}
rel = max(((wa[k].float() - wb[k].float()).norm() / wa[k].float().norm().clamp(min=1e-12)).item() for k in wa)
print(f"weights: {len(wa)} tensors, max|dw|={max(d.values()):.3e} (at {max(d, key=d.get)}), max rel L2={rel:.3e}, bit-identical={all(v == 0 for v in d.values())}")
ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
assert [r["step"] for r in ma] == [r["step"] for r in mb]
worst = max(abs(ra[k] - rb[k]) for ra, rb in zip(ma, mb) for k in ra if k in rb and isinstance(ra[k], float))
print(f"metrics: steps {[r['step'] for r in ma]}, max |d metric| = {worst:.3e}")
for s in (a, b):
    sm = json.loads((s / "summary.json").read_text())
    print(s.name, "num_processes", sm["num_processes"], "fused_head", sm["fused_head"], sm["fused_head_reason"], "model_format", sm["model_format"])
