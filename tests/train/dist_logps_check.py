"""`torchrun --nproc_per_node 2 dist_logps_check.py MODEL_DIR`: log-probs and gradients of the
tiny policy wrapped as sacpo trains it (FSDP2: `fully_shard` per GPT2Block, then the root, as accelerate wraps;
DDP: DistributedDataParallel) against the plain model, for `sequence_logps` (auto and fused=True: under a wrapper
`head_path` falls back to full logits) and, under FSDP2, `packed_pair_logps` (shared-prompt rows; a DDP wrapper
has no `config`, so `supports_packed_pairs` is False there and sacpo trains on unshared rows). Each process takes
its own pair; the plain model's loss is the mean over processes, which is what data parallelism averages. Rank 0 prints
one JSON line: {"fsdp2" | "ddp": {"<fn> fused=<f>": [max |Δ log-prob|, max |Δ gradient| over all parameters],
"reason": the wrapped model's head_path reason}}."""

import json
import sys

import torch
import torch.distributed as dist

from sacpo.data.tokenize import Encoded, pack_pairs, pad_sequences
from sacpo.models.load import load_model
from sacpo.models.logprobs import head_path, packed_pair_logps, sequence_logps

PAIRS = [
    (Encoded((3, 4, 5, 6, 7, 9), 3), Encoded((3, 4, 5, 8, 9, 10, 11), 3)),
    (Encoded((1, 2, 7, 7), 2), Encoded((1, 2, 9), 2)),
]
FNS = {
    "sequence_logps": lambda m, ps, f: sequence_logps(
        m, pad_sequences([a for a, _ in ps] + [b for _, b in ps], 0), fused=f
    ),
    "packed_pair_logps": lambda m, ps, f: packed_pair_logps(m, pack_pairs(ps, 0), fused=f),
}


def _load(path):
    model = load_model(path)
    model.config.use_cache = False
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return model


def _wrap(model, kind):
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def _grads(model):
    out = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[n.removeprefix("module.")] = g.clone()
    return out


def check(path, kind):
    rank, world = dist.get_rank(), dist.get_world_size()
    plain, wrapped = _load(path), _wrap(_load(path), kind)
    result = {"reason": head_path(wrapped, fused=True).reason}
    for name, fn in FNS.items():
        if kind == "ddp" and name == "packed_pair_logps":
            continue
        for fused in (None, True):
            plain.zero_grad()
            wrapped.zero_grad()
            ref = [fn(plain, PAIRS[i::world], fused) for i in range(world)]
            sum(v.sum() for v in ref).div(world).backward()
            mine = fn(wrapped, PAIRS[rank::world], fused)
            mine.sum().backward()
            g_ref, g = _grads(plain), _grads(wrapped)
            assert set(g_ref) == set(g), set(g_ref) ^ set(g)
            dg = max((g_ref[k] - g[k]).abs().max().item() for k in g_ref)
            result[f"{name} fused={fused}"] = [(mine - ref[rank]).abs().max().item(), dg]
    diffs = [None] * world
    dist.all_gather_object(diffs, result)
    merged = {k: [max(d[k][i] for d in diffs) for i in range(2)] for k in result if k != "reason"}
    return {**merged, "reason": result["reason"]}


def main(path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = {kind: check(path, kind) for kind in ("fsdp2", "ddp")}
    if dist.get_rank() == 0:
        print(json.dumps(out), flush=True)
    # both ranks reach this point before the group goes: without it, a rank tearing gloo down while the other still
    # holds the group aborted once in CI ("terminate called without an active exception", SIGABRT after the checks)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
