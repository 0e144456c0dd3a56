"""Raw torch FSDP1 (FullyShardedDataParallel) on CPU/gloo: with device_id None / 'cpu'."""
import os, sys, torch, torch.distributed as dist, traceback, functools
sys.path.insert(0, os.path.dirname(__file__))
from probe_common import load, batch
torch.set_num_threads(1)
dist.init_process_group("gloo"); r = dist.get_rank()
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
for dev in (None, torch.device("cpu"), torch.device("cpu:0")):
    try:
        m = FSDP(load(), device_id=dev, use_orig_params=True,
                 auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={GPT2Block}))
        ids = batch(0).chunk(2)[r]
        loss = m(input_ids=ids, labels=ids).loss; loss.backward()
        print(r, "device_id", dev, "OK loss", loss.item(), flush=True)
    except Exception as e:
        print(r, "device_id", dev, "FAIL", type(e).__name__, e, flush=True)
dist.destroy_process_group()
