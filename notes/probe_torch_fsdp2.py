"""Raw torch FSDP2 (fully_shard) on CPU/gloo, 2 procs: forward/backward/step, compare with 1-proc full batch."""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.path.dirname(__file__))
from probe_common import load, batch
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
print("torch", torch.__version__, "rank", rank)
ref = load()
model = load()
mesh = init_device_mesh("cpu", (world,))
for blk in model.transformer.h:
    fully_shard(blk, mesh=mesh)
fully_shard(model, mesh=mesh)
print(rank, type(model).__mro__[:3], type(model.lm_head.weight))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
for step in range(3):
    ids = batch(step, n=4)
    local = ids.chunk(world)[rank]
    loss = model(input_ids=local, labels=local).loss
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad()
    # reference: full batch, mean of per-rank losses (equal-length rows -> same as full-batch loss of means)
    rl = sum(ref(input_ids=c, labels=c).loss for c in ids.chunk(world)) / world
    rl.backward(); rgn = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0); ropt.step(); ropt.zero_grad()
    print(rank, "step", step, "loss", float(loss), "gn", float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn), "ref gn", float(rgn))
# gather full state dict
from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    rsd = ref.state_dict()
    md = max((sd[k] - rsd[k]).abs().max().item() for k in sd)
    print("full state dict keys", len(sd), "max |w_fsdp - w_ref|", md)
dist.destroy_process_group()
