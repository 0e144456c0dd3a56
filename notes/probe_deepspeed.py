"""accelerate + DeepSpeed on CPU. argv: cpu(0|1). Prints deepspeed's accelerator, the distributed type, then 2 steps."""
import os, sys, traceback, torch
sys.path.insert(0, os.path.dirname(__file__))
from probe_common import load, batch
torch.set_num_threads(1)
cpu = bool(int(sys.argv[1]))
try:
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    print("deepspeed", deepspeed.__version__, "accelerator", get_accelerator()._name, "comm backend", get_accelerator().communication_backend_name(), flush=True)
except Exception:
    traceback.print_exc()
from accelerate import Accelerator
try:
    acc = Accelerator(cpu=cpu)
except Exception:
    traceback.print_exc(); sys.exit(3)
print(f"[{acc.process_index}] cpu={cpu} distributed_type={acc.distributed_type} device={acc.device} n={acc.num_processes}", flush=True)
model = load(); opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
try:
    model, opt = acc.prepare(model, opt)
    print(f"[{acc.process_index}] prepared {type(model).__name__}", flush=True)
    for s in range(2):
        ids = batch(s).chunk(acc.num_processes)[acc.process_index]
        loss = model(input_ids=ids, labels=ids).loss; acc.backward(loss); opt.step(); opt.zero_grad()
        print(f"[{acc.process_index}] step {s} loss {loss.item():.6f}", flush=True)
except Exception:
    traceback.print_exc(); sys.exit(4)
