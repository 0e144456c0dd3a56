"""accelerate + FSDP plugin on CPU/gloo, 2 procs. argv: fsdp_version (1|2) cpu(0|1) [mode: plugin|env]
Prints distributed_type, the prepared model's class, and runs 3 steps compared to a 1-proc full-batch reference."""
import os, sys, traceback, torch
sys.path.insert(0, os.path.dirname(__file__))
from probe_common import load, batch
torch.set_num_threads(1)
ver, cpu = int(sys.argv[1]), bool(int(sys.argv[2]))
mode = sys.argv[3] if len(sys.argv) > 3 else "plugin"
import accelerate
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
kw = {}
if mode in ("plugin", "force"):
    kw["fsdp_plugin"] = FullyShardedDataParallelPlugin(
        fsdp_version=ver, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["GPT2Block"], state_dict_type="SHARDED_STATE_DICT",
        **({"reshard_after_forward": True} if ver == 2 else {}),
    )
try:
    acc = Accelerator(cpu=cpu, **kw)
    if mode == "force":  # workaround: accelerate refuses FSDP on MULTI_CPU (state.py:947); force it after init
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType
        assert acc.distributed_type == DistributedType.MULTI_CPU, acc.distributed_type
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.fsdp_plugin = kw["fsdp_plugin"]
        if ver == 1 and os.environ.get("PROBE_PLAIN_CPU"):  # FSDP1: device_id cpu:0 != compute device cpu
            PartialState._shared_state["device"] = torch.device("cpu"); AcceleratorState._shared_state["device"] = torch.device("cpu")
            print("acc.device now", acc.device, flush=True)
except Exception as e:
    traceback.print_exc(); sys.exit(3)
r = acc.process_index
print(f"[{r}] accelerate {accelerate.__version__} cpu={cpu} ver={ver} mode={mode}: distributed_type={acc.distributed_type} "
      f"device={acc.device} is_fsdp2={getattr(acc,'is_fsdp2',None)} backend={acc.state.backend}", flush=True)
ref, model = load(), load()
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
try:
    model, opt = acc.prepare(model, opt)
except Exception:
    traceback.print_exc(); sys.exit(4)
print(f"[{r}] prepared: {[c.__name__ for c in type(model).__mro__[:3]]} param type {type(next(model.parameters())).__name__}", flush=True)
ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
W = acc.num_processes
for step in range(3):
    ids = batch(step)
    local = ids.chunk(W)[r]
    loss = model(input_ids=local, labels=local).loss
    acc.backward(loss)
    gn = acc.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad()
    rl = sum(ref(input_ids=c, labels=c).loss for c in ids.chunk(W)) / W
    rl.backward(); rgn = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0); ropt.step(); ropt.zero_grad()
    print(f"[{r}] step {step} loss {loss.item():.6f} gn {float(gn):.6f} ref gn {float(rgn):.6f}", flush=True)
sd = acc.get_state_dict(model)
if acc.is_main_process:
    rsd = ref.state_dict()
    print("[0] state dict keys", len(sd), "max|dw|", max((sd[k].cpu() - rsd[k]).abs().max().item() for k in sd if k in rsd))
acc.end_training() if hasattr(acc, "end_training") else None
