"""Prototype workaround (no src/ change): make accelerate honour an FSDP config on CPU.

accelerate 1.16 picks DistributedType.FSDP only for accelerator devices (state.py:947, the MULTI_GPU/... list; MULTI_CPU
is not in it), so `accelerate launch --config_file <FSDP yaml>` on a CPU-only machine silently runs DDP
(Accelerator(cpu=True)) or NO distribution at all (cpu=False). This wraps sacpo's make_accelerator: when the launcher
set ACCELERATE_USE_FSDP=true and the state came out MULTI_CPU, it switches the shared state to FSDP with a plugin
built from the launcher's FSDP_* env vars (FSDP2 only; FSDP1 additionally needs device=cpu, not cpu:0)."""
import os
import torch


def make_accelerator_fsdp(cfg):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    acc = Accelerator(mixed_precision="no", cpu=True)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # from FSDP_* env vars of the launcher
        for st in (PartialState._shared_state, AcceleratorState._shared_state):
            st["distributed_type"] = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
        if plugin.fsdp_version == 1:
            for st in (PartialState._shared_state, AcceleratorState._shared_state):
                st["device"] = torch.device("cpu")
    return acc


def install():
    import sacpo.train.loop as loop
    import sacpo.train.policy as policy
    policy.make_accelerator = make_accelerator_fsdp
    loop.make_accelerator = make_accelerator_fsdp


# ------------------------------------------------------------------ prototype fixes of sacpo itself (monkeypatched)
def _local(t):
    """A DTensor's full value (replicated results such as a grad norm), else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def install_fixes():
    import sacpo.train.loop as loop

    orig_step_loop = loop._step_loop

    def _step_loop(cfg, acc, model, inputs, tokenizer, probe, workspace):
        sl, raw = orig_step_loop(cfg, acc, model, inputs, tokenizer, probe, workspace)
        # FIX 1: fully_shard replaces every Parameter by a DTensor Parameter; the list make_optimizer took before
        # prepare is stale (accelerate re-points the optimizer's param_groups, not sacpo's list)
        sl.params = [p for p in sl.model.parameters() if p.requires_grad]
        # FIX 2: the grad norm of DTensor grads is a (replicated) DTensor: make it a plain tensor for the checks/metrics
        clip = acc.clip_grad_norm_
        acc.clip_grad_norm_ = lambda params, max_norm, norm_type=2: _local(clip(params, max_norm, norm_type))
        return sl, raw

    loop._step_loop = _step_loop

    # FIX 3: the final model. Under FSDP2 `unwrap_model` returns the sharded module itself (fully_shard works in place),
    # its state_dict holds DTensors, and save_pretrained on the main process only fails
    # ("Cannot flatten unevenly sharded tensor ... size 257 ... mesh dimension 0 (size 2)") or would hang in a
    # collective. All processes gather a full CPU state dict (a collective), then the main process loads it into a
    # plain copy built like the policy (build_policy: same LoRA wrapping) and runs the existing save paths unchanged.
    import sacpo.train.checkpoint as ckpt
    from accelerate.utils import DistributedType

    orig_finish = loop._finish
    orig_save_final = ckpt.save_final
    box = {}

    def _finish(lp, ref, end, path, dtype, seconds):
        box["cfg"] = lp.cfg
        return orig_finish(lp, ref, end, path, dtype, seconds)

    def save_final(acc, model, tokenizer, out, lora_save=None, policy="", dtype=None):
        if acc.distributed_type != DistributedType.FSDP:
            return orig_save_final(acc, model, tokenizer, out, lora_save, policy, dtype)
        sd = acc.get_state_dict(model)  # collective: full_state_dict, cpu_offload -> full tensors on rank 0
        plain = None
        if acc.is_main_process:
            from sacpo.train.policy import build_policy

            plain = build_policy(box["cfg"])
            missing, unexpected = plain.load_state_dict(sd, strict=False)
            assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)

        class _NoUnwrap:  # hand the plain copy to the unchanged save path
            def __getattr__(self, k):
                return getattr(acc, k)

            def unwrap_model(self, m, **kw):
                return m

        return orig_save_final(_NoUnwrap(), plain, tokenizer, out, lora_save, policy, dtype)

    loop._finish = _finish
    ckpt.save_final = save_final
    loop.checkpoint.save_final = save_final

    # FIX 4: sharded checkpoints in sacpo's own pickle-free format: every process writes its local shards
    # (DTensor.to_local()) of the model and of AdamW's moments, model-rank<r> / optimizer-rank<r>, plus the mesh size;
    # resume needs the same number of processes (a different one is refused).
    orig_check = ckpt._check_supported
    orig_save_state, orig_load_state = ckpt._save_state, ckpt._load_state

    def _check_supported(acc):
        if acc.distributed_type == DistributedType.FSDP and acc.is_fsdp2:
            return
        return orig_check(acc)

    def _to_local(tree):
        if hasattr(tree, "to_local"):
            return tree.to_local()
        if isinstance(tree, dict):
            return {k: _to_local(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(_to_local(v) for v in tree)
        return tree

    def _save_state(acc, path):
        if acc.distributed_type != DistributedType.FSDP:
            return orig_save_state(acc, path)
        from sacpo.train.state import model_state, rng_state, save_tree
        from sacpo.fsutil import atomic_write_json

        r = acc.process_index
        for i, model in enumerate(acc._models):
            save_tree(path, f"{ckpt._name('model', i)}-rank{r}", _to_local(model_state(model)))
        for i, opt in enumerate(acc._optimizers):
            save_tree(path, f"{ckpt._name('optimizer', i)}-rank{r}", _to_local(opt.optimizer.state_dict()))
        if acc.is_main_process:
            for i, obj in enumerate(acc._custom_objects):
                save_tree(path, f"custom-{i}", obj.state_dict())
            atomic_write_json(path / "sharding.json", {"kind": "fsdp2", "num_processes": acc.num_processes})
        save_tree(path, f"rng-{r}", rng_state())

    def _load_state(acc, path):
        if acc.distributed_type != DistributedType.FSDP:
            return orig_load_state(acc, path)
        from torch.distributed.tensor import DTensor
        from sacpo.config import ConfigError
        from sacpo.train.state import load_tree, model_state, read_json, set_rng_state

        meta = read_json(path / "sharding.json")
        if meta["num_processes"] != acc.num_processes:
            raise ConfigError(f"cannot resume from {path}: saved by {meta['num_processes']} FSDP processes, "
                              f"resumed with {acc.num_processes}")
        r = acc.process_index
        with torch.no_grad():
            for i, model in enumerate(acc._models):
                saved = load_tree(path, f"{ckpt._name('model', i)}-rank{r}")
                live = model_state(model)
                assert set(saved) == set(live), (set(saved) ^ set(live))
                for k, t in live.items():
                    (t.to_local() if isinstance(t, DTensor) else t).copy_(saved[k])
        for i, opt in enumerate(acc._optimizers):
            raw = opt.optimizer
            sd = load_tree(path, f"{ckpt._name('optimizer', i)}-rank{r}")
            params = [p for g in raw.param_groups for p in g["params"]]
            for idx, st in sd["state"].items():  # re-wrap the local moment shards as DTensors like their params
                p = params[idx]
                for k, v in st.items():
                    if isinstance(p, DTensor) and v.dim() > 0:
                        st[k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                   shape=p.shape, stride=p.stride())
            raw.load_state_dict(sd)
        for i, obj in enumerate(acc._custom_objects):
            obj.load_state_dict(load_tree(path, f"custom-{i}"))
        set_rng_state(load_tree(path, f"rng-{r}"))

    ckpt._check_supported = _check_supported
    ckpt._save_state, ckpt._load_state = _save_state, _load_state
