"""Sharded training (FSDP2, DeepSpeed) as the user's `accelerate launch --config_file` asks for it.

On an accelerator device (CUDA) accelerate turns the launcher's FSDP / DeepSpeed settings into a sharded run by
itself and nothing here changes that. On CPU (the gloo backend) accelerate 1.16 silently ignores them:

- state.py:947-974 (`AcceleratorState.__init__`) switches to `DistributedType.FSDP` only inside the branch for
  MULTI_GPU, MULTI_MLU, ..., MULTI_NEURON; MULTI_CPU is not in that list, so an FSDP config runs as plain DDP;
- state.py:935 enables DeepSpeed only `and not cpu`, so a DeepSpeed config on CPU also runs as plain DDP;
- state.py:747 (`_prepare_backend`) and commands/launch.py:1426 (`elif args.use_fsdp and not args.cpu`): with
  `cpu=False` on a machine without an accelerator every process gets `DistributedType.NO` and `num_processes=1`,
  i.e. independent single-process runs.

torch itself runs FSDP2 (`fully_shard`) over gloo correctly, and DeepSpeed has a CPU accelerator whose
collectives use gloo (deepspeed/accelerator/cpu_accelerator.py), so `make_accelerator` switches the shared
accelerate state on CPU to FSDP2 (`force_fsdp2_on_cpu`) or to DeepSpeed (`force_deepspeed_on_cpu`): two
version-guarded functions to delete once accelerate supports them there. FSDP1 is refused on CPU: torch's
`FullyShardedDataParallel` rejects the `cpu:0` device accelerate passes (torch/distributed/fsdp/_init_utils.py:1102),
and with the device forced to `cpu` its gradients are wrong.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from sacpo.config import ConfigError

log = logging.getLogger("sacpo.train")

# the accelerate versions whose state.py was read for `force_fsdp2_on_cpu` (the switch touches its internals)
FORCE_TESTED_ACCELERATE = ("1.16",)
FSDP1_ON_CPU = (
    "fsdp_version 1 is not supported on CPU: torch's FullyShardedDataParallel refuses the cpu:0 device accelerate "
    "passes ('Inconsistent compute device and device_id on rank 0: cpu vs cpu:0', "
    "torch/distributed/fsdp/_init_utils.py:1102) and with the device forced to cpu its gradients are wrong; "
    "set fsdp_version: 2 in the accelerate config (see configs/accelerate/fsdp2_cpu.yaml)"
)


def requested_sharding(env: Mapping[str, str]) -> str | None:
    """ "fsdp" or "deepspeed" when `accelerate launch --config_file` asked for it (ACCELERATE_USE_FSDP /
    ACCELERATE_USE_DEEPSPEED in the launcher's environment), else None."""
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return None


def world_size(env: Mapping[str, str]) -> int:
    """The number of processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(env.get("WORLD_SIZE", "1"))


def cpu_action(env: Mapping[str, str], distributed_type: str) -> str | None:
    """What a CPU run must do about a sharded config: "force_fsdp2", "force_deepspeed", or None (nothing asked,
    or one process).

    Raises ConfigError for the cases accelerate would silently turn into DDP or independent runs: FSDP version 1,
    or a multi-process launch that did not come up as MULTI_CPU."""
    kind = requested_sharding(env)
    if kind is None or world_size(env) <= 1:
        return None
    if kind == "fsdp" and int(env.get("FSDP_VERSION", "1")) != 2:
        raise ConfigError(FSDP1_ON_CPU)
    if distributed_type != "MULTI_CPU":
        raise ConfigError(
            f"{'an FSDP' if kind == 'fsdp' else 'a DeepSpeed'} config with WORLD_SIZE={world_size(env)} came up as "
            f"{distributed_type} on CPU, not a gloo process group: the processes would train independently"
        )
    return "force_fsdp2" if kind == "fsdp" else "force_deepspeed"


def _switch_state(what: str, distributed_type: str) -> None:
    """Write DistributedType.<distributed_type> into accelerate's shared state (`PartialState._shared_state`,
    `AcceleratorState._shared_state`), after the version guard of the CPU switches: accelerate versions other
    than FORCE_TESTED_ACCELERATE are refused."""
    import accelerate
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    version = ".".join(accelerate.__version__.split(".")[:2])
    if version not in FORCE_TESTED_ACCELERATE:
        raise ConfigError(
            f"{what} on CPU needs sacpo's workaround, which was checked against accelerate "
            f"{', '.join(FORCE_TESTED_ACCELERATE)}, not {accelerate.__version__}; use DDP on CPU (no --config_file)"
        )
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType[distributed_type]


def force_fsdp2_on_cpu(acc: Any) -> None:
    """Switch accelerate's shared state from MULTI_CPU (gloo DDP) to FSDP2, with the plugin the launcher's FSDP_*
    variables describe (`FullyShardedDataParallelPlugin()` reads them), so `acc.prepare` runs
    `fsdp2_prepare_model` (accelerate 1.16 state.py:947-974 never does this on CPU; see the module docstring).

    Version-guarded: refuses accelerate versions other than FORCE_TESTED_ACCELERATE, whose internals
    (`PartialState._shared_state`, `AcceleratorState._shared_state`) it writes."""
    import accelerate
    from accelerate.utils import FullyShardedDataParallelPlugin

    _switch_state("FSDP", "FSDP")
    plugin = FullyShardedDataParallelPlugin()
    acc.state.fsdp_plugin = plugin
    log.info(
        "FSDP on CPU: accelerate %s does not enable FSDP for CPU processes (state.py:947, it would run plain DDP); "
        "sacpo switched the %d-process gloo group to FSDP2 (fully_shard, reshard_after_forward=%s)",
        accelerate.__version__,
        acc.num_processes,
        plugin.reshard_after_forward,
    )


def force_deepspeed_on_cpu(acc: Any) -> None:
    """Switch accelerate's shared state from MULTI_CPU (gloo DDP) to DeepSpeed with the plugin the launcher's
    ACCELERATE_DEEPSPEED_* variables describe (`DeepSpeedPlugin()` reads them), so `acc.prepare` runs
    `deepspeed.initialize` (accelerate 1.16 state.py:935 enables DeepSpeed only `and not cpu`). DeepSpeed picks
    its CPU accelerator on a machine without CUDA, whose collectives are gloo's (or oneCCL's when installed).

    Version-guarded like `force_fsdp2_on_cpu`. The plugin's mixed precision is the accelerator's ("no" on CPU):
    a config with `bf16: {enabled: true}` would still train in bf16 (configs/accelerate/deepspeed_zero*_cpu.json
    are fp32)."""
    import accelerate
    from accelerate.utils import DeepSpeedPlugin

    # read before the switch: under DeepSpeed accelerate reads the mixed precision from the plugin
    mixed_precision = acc.mixed_precision
    _switch_state("DeepSpeed", "DEEPSPEED")
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(mixed_precision)
    plugin.select(_from_accelerator_state=True)
    acc.state.deepspeed_plugins = plugin
    log.info(
        "DeepSpeed on CPU: accelerate %s does not enable DeepSpeed for CPU processes (state.py:935, it would run "
        "plain DDP); sacpo switched the %d-process gloo group to DeepSpeed ZeRO-%s",
        accelerate.__version__,
        acc.num_processes,
        plugin.zero_stage,
    )


def check_sharded(acc: Any, env: Mapping[str, str]) -> None:
    """After the accelerator is set up: a multi-process FSDP / DeepSpeed config must have given an FSDP /
    DeepSpeed state (on any device); raise ConfigError instead of training as DDP or as independent runs."""
    kind = requested_sharding(env)
    if kind is None or world_size(env) <= 1:
        return
    want = "FSDP" if kind == "fsdp" else "DEEPSPEED"
    got = _type_name(acc.distributed_type)
    if got != want or acc.num_processes != world_size(env):
        raise ConfigError(
            f"the accelerate config asks for {want} over WORLD_SIZE={world_size(env)} processes, but accelerate "
            f"set up {got} with {acc.num_processes} process(es): training would not be sharded"
        )


def check_deepspeed(acc: Any, grad_accum: int, save_every: int) -> None:
    """Under DeepSpeed: refuse what sacpo's loop cannot do there, before any step. accelerate's `backward` runs
    the engine's step after every micro-batch and the engine scales the loss by its own
    gradient_accumulation_steps, so sacpo's accumulation (grad_accum) and DeepSpeed's must both be 1; periodic
    checkpoints would need the engine's (pickle-based) checkpoint format."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED:
        return
    ds_accum = acc.state.deepspeed_plugin.deepspeed_config.get("gradient_accumulation_steps", 1)
    if grad_accum != 1 or ds_accum not in (1, "auto"):
        raise ConfigError(
            f"under DeepSpeed set grad_accum: 1 (got {grad_accum}) and gradient_accumulation_steps: 1 in the "
            f"DeepSpeed config (got {ds_accum}); raise batch_size instead"
        )
    if save_every:
        raise ConfigError(
            f"save_every={save_every}: checkpoints are not supported under DeepSpeed; set save_every: 0"
        )


def setup_sharding(acc: Any, env: Mapping[str, str] | None = None) -> Any:
    """Apply the launcher's sharding request to `acc` (see the module docstring) and check it took; returns acc."""
    env = os.environ if env is None else env
    action = cpu_action(env, _type_name(acc.distributed_type)) if acc.device.type == "cpu" else None
    if action == "force_fsdp2":
        force_fsdp2_on_cpu(acc)
    elif action == "force_deepspeed":
        force_deepspeed_on_cpu(acc)
    check_sharded(acc, env)
    return acc


@contextlib.contextmanager
def plain_loads(acc: Any) -> Iterator[None]:
    """`from_pretrained` of a plain, unpartitioned model inside a ZeRO-3 run (the KL reference, the copy the final
    weights are loaded into). accelerate's DeepSpeed plugin registers its config with transformers whatever
    `zero3_init_flag` says (accelerate 1.16 utils/dataclasses.py:1367, `set_deepspeed_weakref`), and transformers 5
    then builds every model under `deepspeed.zero.Init` (modeling_utils.py:3839): its parameters are empty
    partitions ("RuntimeError: 'weight' must be 2-D" in the first forward). The registration is lifted for the
    block and restored after it; any other run: nothing changes."""
    plugin = acc.state.deepspeed_plugin if _type_name(acc.distributed_type) == "DEEPSPEED" else None
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _type_name(distributed_type: Any) -> str:
    return str(getattr(distributed_type, "value", distributed_type))


def is_sharded(acc: Any) -> bool:
    """The run shards parameters over processes (FSDP or DeepSpeed): module.state_dict() is not the full model."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def is_fsdp2(acc: Any) -> bool:
    """The run is FSDP2 (DTensor parameters)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP and acc.is_fsdp2
