"""Run sacpo's train() (from a YAML) with the FSDP workaround installed. argv: config.yaml [--resume] [--no-force]"""
import json, os, sys, logging, time
sys.path.insert(0, os.path.dirname(__file__))
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
if "--no-force" not in sys.argv:
    import fsdp_force; fsdp_force.install()
    if "--no-fixes" not in sys.argv: fsdp_force.install_fixes()
kill_at = int(os.environ.get("PROBE_SIGKILL_AFTER_SAVE", "0"))
if kill_at:  # simulate a crash: every process SIGKILLs itself right after checkpoint step-<kill_at> is complete
    import signal
    import sacpo.train.checkpoint as _ck, sacpo.train.epochs as _ep
    _orig_save = _ck.save
    def _save(acc, out, step, *a, **k):
        _orig_save(acc, out, step, *a, **k)
        if step == kill_at:
            print(f"[{acc.process_index}] SIGKILL after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    _ck.save = _save
from sacpo.config import load_config
from sacpo.recipes.train import CommandTrainConfig
from sacpo.train.loop import train
cfg = load_config(CommandTrainConfig, sys.argv[1], [a for a in sys.argv[2:] if "=" in a])
t = time.time()
res = train(cfg, resume="--resume" in sys.argv, show_progress=False)
print("RESULT", json.dumps({"steps": res.steps, "fused_head": res.fused_head, "reason": res.fused_head_reason,
                            "shared": res.shared_prompt_rows, "final": res.final_metrics, "s": round(time.time() - t, 1)}), flush=True)
