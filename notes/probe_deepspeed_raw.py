"""Raw deepspeed.initialize on CPU/gloo, 2 procs (torchrun), ZeRO stage argv[1]; 2 steps, compare nothing, just run."""
import os, sys, traceback, torch
sys.path.insert(0, os.path.dirname(__file__))
from probe_common import load, batch
torch.set_num_threads(1)
import deepspeed
stage = int(sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")
r, W = torch.distributed.get_rank(), torch.distributed.get_world_size()
cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
       "zero_optimization": {"stage": stage}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
try:
    model = load()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg.pop("optimizer")
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    print(f"[{r}/{W}] engine {type(engine).__name__} zero stage {engine.zero_optimization_stage()} device {engine.device}", flush=True)
    for s in range(2):
        ids = batch(s).chunk(W)[r]
        loss = engine(input_ids=ids, labels=ids).loss; engine.backward(loss); engine.step()
        print(f"[{r}] step {s} loss {loss.item():.6f} gn {engine.get_global_grad_norm()}", flush=True)
except Exception:
    traceback.print_exc(); sys.exit(4)
