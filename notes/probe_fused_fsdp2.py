"""Log-probs and gradients under FSDP2 (fully_shard per GPT2Block + root, as accelerate wraps) vs the plain model:
sequence_logps (auto path: full logits through the wrapper), packed_pair_logps (shared-prompt rows), and the fused
LM head forced by calling _fused_token_logps directly (it bypasses the root's forward)."""
import os, sys, traceback, torch, torch.distributed as dist
sys.path.insert(0, os.path.dirname(__file__))
from probe_common import load
torch.set_num_threads(1)
dist.init_process_group("gloo"); r, W = dist.get_rank(), dist.get_world_size()
from torch.distributed.fsdp import fully_shard
from sacpo.data.tokenize import Encoded, pad_sequences, pack_pairs
from sacpo.models.logprobs import sequence_logps, packed_pair_logps, head_path, _fused_token_logps, _plain_lm_head
plain, sharded = load(), load()
for blk in sharded.transformer.h: fully_shard(blk)
fully_shard(sharded)
print(r, "head_path(sharded):", head_path(sharded, fused=True).reason, flush=True)
pairs = [(Encoded((3, 4, 5, 6, 7, 9), 3), Encoded((3, 4, 5, 8, 9, 10, 11), 3)), (Encoded((1, 2, 7, 7), 2), Encoded((1, 2, 9), 2))]
mine = pairs[r::W]  # each rank its own pair
def grads(m):
    out = {}
    for n, p in m.named_parameters():
        g = p.grad
        out[n] = (g.full_tensor() if hasattr(g, "full_tensor") else g).clone() if g is not None else None
    return out
for name, fn in {
    "sequence_logps": lambda m, ps, fused: sequence_logps(m, pad_sequences([a for a, _ in ps] + [b for _, b in ps], 0), fused=fused),
    "packed_pair_logps": lambda m, ps, fused: packed_pair_logps(m, pack_pairs(ps, 0), fused=fused),
}.items():
    for fused in (None, True):
        plain.zero_grad(); sharded.zero_grad()
        # plain: the mean over ranks of each rank's loss = what data-parallel averages
        ref_vals = [fn(plain, pairs[i::W], fused) for i in range(W)]
        sum(v.sum() for v in ref_vals).div(W).backward()
        try:
            v = fn(sharded, mine, fused)
            v.sum().backward()  # FSDP2 reduce-scatter averages over ranks
            g1, g2 = grads(plain), grads(sharded)
            dg = max((g1[k] - g2[k]).abs().max().item() for k in g1 if g1[k] is not None)
            print(r, f"{name} fused={fused}: max|dlogp|={(v - ref_vals[r]).abs().max().item():.2e} max|dgrad|={dg:.2e}", flush=True)
        except Exception as e:
            print(r, f"{name} fused={fused}: FAIL {type(e).__name__}: {str(e)[:200]}", flush=True)
# force the fused path on the sharded model (what head_path refuses)
try:
    batch = pad_sequences([a for a, _ in mine], 0)
    head = _plain_lm_head(sharded)
    v = _fused_token_logps(sharded, head, batch, 256)
    print(r, "forced fused on FSDP2: ran, value", v.sum().item(), flush=True)
except Exception as e:
    print(r, f"forced fused on FSDP2: FAIL {type(e).__name__}: {str(e)[:300]}", flush=True)
dist.destroy_process_group()
