"""The launcher-config decisions of sacpo.train.sharding (no processes started: the multi-process behaviour is in
test_distributed.py) and the checkpoint layout check of sacpo.train.sharded_state."""

from types import SimpleNamespace

import pytest

from sacpo.config import ConfigError
from sacpo.train.sharded_state import SHARDING, check_layout
from sacpo.train.sharding import check_sharded, cpu_action

FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}


def test_fsdp2_on_cpu_is_forced_and_nothing_else_is():
    assert cpu_action(FSDP2, "MULTI_CPU") == "force_fsdp2"
    assert cpu_action({}, "MULTI_CPU") is None  # plain DDP stays DDP
    assert cpu_action({**FSDP2, "WORLD_SIZE": "1"}, "NO") is None  # one process: nothing to shard


def test_fsdp1_on_cpu_is_refused_quoting_torch():
    with pytest.raises(ConfigError, match=r"fsdp_version 1 is not supported on CPU.*cpu vs cpu:0"):
        cpu_action({**FSDP2, "FSDP_VERSION": "1"}, "MULTI_CPU")
    with pytest.raises(ConfigError, match="fsdp_version 1"):  # accelerate's default version is 1
        cpu_action({k: v for k, v in FSDP2.items() if k != "FSDP_VERSION"}, "MULTI_CPU")


def test_deepspeed_on_cpu_is_forced_and_independent_runs_are_refused():
    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}
    assert cpu_action(deepspeed, "MULTI_CPU") == "force_deepspeed"
    assert cpu_action({**deepspeed, "WORLD_SIZE": "1"}, "NO") is None
    with pytest.raises(
        ConfigError, match=r"a DeepSpeed config with WORLD_SIZE=2 came up as NO .*independently"
    ):
        cpu_action(deepspeed, "NO")
    with pytest.raises(ConfigError, match=r"an FSDP config .*would train independently"):
        cpu_action(FSDP2, "NO")


def test_a_sharded_config_that_did_not_shard_is_refused_on_any_device():
    acc = SimpleNamespace(distributed_type="MULTI_GPU", num_processes=2)
    with pytest.raises(
        ConfigError, match="asks for FSDP over WORLD_SIZE=2 processes, but accelerate set up MULTI_GPU"
    ):
        check_sharded(acc, FSDP2)
    check_sharded(SimpleNamespace(distributed_type="FSDP", num_processes=2), FSDP2)
    check_sharded(acc, {"WORLD_SIZE": "2"})  # DDP asked, DDP got


def test_checkpoint_layout_must_match_the_run(tmp_path):
    check_layout(tmp_path, fsdp2=False, num_processes=2)  # DDP checkpoint, DDP run
    with pytest.raises(ConfigError, match="written by an unsharded"):
        check_layout(tmp_path, fsdp2=True, num_processes=2)
    (tmp_path / SHARDING).write_text('{"kind": "fsdp2", "num_processes": 2}')
    check_layout(tmp_path, fsdp2=True, num_processes=2)
    with pytest.raises(ConfigError, match="shards of 2 processes, but this run has 4"):
        check_layout(tmp_path, fsdp2=True, num_processes=4)
    with pytest.raises(ConfigError, match="same accelerate config and number of processes"):
        check_layout(tmp_path, fsdp2=False, num_processes=1)
