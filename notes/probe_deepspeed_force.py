"""accelerate + DeepSpeed forced on MULTI_CPU (like fsdp_force): argv zero stage. 3 steps vs a 1-process reference."""
import os, sys, traceback, torch
sys.path.insert(0, os.path.dirname(__file__))
from probe_common import load, batch
torch.set_num_threads(1)
stage = int(sys.argv[1])
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, DeepSpeedPlugin
ds_cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True}}
plugin = DeepSpeedPlugin(hf_ds_config=ds_cfg)
acc = Accelerator(cpu=True, deepspeed_plugin=plugin)
print(f"[{acc.process_index}] before force: {acc.distributed_type}", flush=True)
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")  # sees torch's gloo group: reuses it
for st in (PartialState._shared_state, AcceleratorState._shared_state):
    st["distributed_type"] = DistributedType.DEEPSPEED
plugin.set_mixed_precision("no"); plugin.select(_from_accelerator_state=True)
acc.state.deepspeed_plugins = plugin
r, W = acc.process_index, acc.num_processes
ref = load() if stage < 3 else None  # ZeRO-3: HfDeepSpeedConfig makes from_pretrained partition every model (zero.Init)
model = load()
opt = torch.optim.AdamW(model.parameters(), lr=1e-2); ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2) if ref is not None else None
try:
    model, opt = acc.prepare(model, opt)
    print(f"[{r}] prepared {type(model).__name__} stage {model.zero_optimization_stage()}", flush=True)
    for s in range(3):
        ids = batch(s)
        local = ids.chunk(W)[r]
        loss = model(input_ids=local, labels=local).loss; acc.backward(loss); opt.step(); opt.zero_grad()
        rgn = float("nan")
        if ref is not None:
            rl = sum(ref(input_ids=c, labels=c).loss for c in ids.chunk(W)) / W
            rl.backward(); rgn = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0); ropt.step(); ropt.zero_grad()
        print(f"[{r}] step {s} loss {loss.item():.6f} gn {model.get_global_grad_norm()} ref gn {float(rgn):.6f}", flush=True)
    sd = acc.get_state_dict(model)
    if acc.is_main_process: print("[0] gathered", len(sd), "tensors, e.g. wte", tuple(sd["transformer.wte.weight"].shape), sd["transformer.wte.weight"].dtype, flush=True)
    if acc.is_main_process and ref is not None:
        rsd = ref.state_dict()
        print("[0] gathered keys", len(sd), "max|dw|", max((sd[k].float() - rsd[k]).abs().max().item() for k in sd if k in rsd), flush=True)
except Exception:
    traceback.print_exc(); sys.exit(4)
