"""One policy, its AdamW moments and its tokenizer, kept across the branches of a sweep.

The branches of a β/λ sweep start from the same parent weights. Built one by one, each branch pays a model load,
the shared-prompt probe and a tokenizer load, and on the CPU its first step also pays for fresh memory: the AdamW
moments (two fp32 copies of the trainable weights) and the gradients are page-faulted in. On SmolLM2-135M the first
optimizer step of a branch took 1.7–2.8 s against 0.1 s for the next ones (benchmarks/RESULTS.md).

`SweepWorkspace` builds the policy once (and keeps its shared-prompt probe, `PackedPairsProbe`), and for every
later branch restores its trainable tensors as they were before training and zeroes the AdamW moments and step
counters in place. A fresh AdamW starts from exactly that state (zero moments, step 0), so each branch trains as it
would from a fresh build: the tests check bit-identical trained weights. Only single-process runs reuse.

Where the initial tensors come from: when every trainable tensor is on the CPU and stored byte for byte in the
parent directory's safetensors (full fine-tuning of a dense model: `sacpo.models.weights_file.file_source`,
checked once at the build), each restore reads them back from those files into the parameters, and no copy is
kept (on SmolLM2-135M that copy was 540 MB, the peak of a full-fine-tuning sweep's resident set). Otherwise (LoRA
adapters, which are not in the parent; CUDA; an adapter-chain parent) a CPU copy of the trainable tensors is kept,
and dropped as soon as the last branch has restored it (`last_branch`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from sacpo.models.load import is_adapter_dir, model_files
from sacpo.models.weights_file import Region, file_source, read_into
from sacpo.train.step import PackedPairsProbe

log = logging.getLogger("sacpo.train")


def policy_key(cfg: Any) -> tuple:
    """What the built policy depends on: the parent directory and its files' identity (`model_files`), and the
    settings `build_policy` applies (remote code, gradient checkpointing, LoRA). The fused SwiGLU forward is not
    part of it: `train` applies it to the policy it gets and takes it off again before returning."""
    p, _, state = model_files(cfg.policy)
    options = (cfg.trust_remote_code, cfg.gradient_checkpointing)
    lora = {k: v for k, v in asdict(cfg.lora).items() if k != "save"}  # save: the output format only
    return (str(p.resolve()), state, options, json.dumps(lora, sort_keys=True))


class SweepWorkspace:
    """Reusable policy for consecutive `train()` calls on the same parent (see the module docstring).

    `train(cfg, workspace=ws)` asks for the tokenizer, the policy and the optimizer's buffers, and hands them back with
    `keep` after its final save. Anything with another `policy_key` releases what the workspace holds first.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._initial: dict[str, torch.Tensor] = {}  # trainable tensors before training, on the CPU
        self._source: dict[str, Region] | None = None  # or where the parent's files hold them
        self.last_branch = (
            False  # set by the caller: the next policy() is the last reuse (its copy is dropped)
        )
        self._moments: dict[torch.Tensor, dict[str, Any]] = {}  # AdamW state of the last branch, by parameter
        self.probe = PackedPairsProbe()  # supports_packed_pairs of the kept policy, probed once
        self.reuses = 0  # branches that started from the kept policy

    @property
    def holds_policy(self) -> bool:
        return self._model is not None

    def clear(self) -> None:
        """Release the policy, its initial copy, the optimizer moments and the tokenizer."""
        self._key, self._model, self._tokenizer = None, None, None
        self._initial, self._source, self._moments = {}, None, {}
        self.probe = PackedPairsProbe()

    def release_unless(self, cfg: Any) -> None:
        """Release everything unless it was built for this policy and these settings."""
        if self._key is not None and self._key != policy_key(cfg):
            self.clear()

    def tokenizer(self, cfg: Any, load: Callable[[str, bool], Any]) -> Any:
        self.release_unless(cfg)
        if self._tokenizer is None:
            self._tokenizer = load(cfg.policy, cfg.trust_remote_code)
        return self._tokenizer

    def policy(self, cfg: Any, build: Callable[[Any], Any]) -> Any:
        """The parent policy: built (and its trainable tensors copied) the first time, then restored in place."""
        self.release_unless(cfg)
        if self._model is not None and self._source is None and not self._initial:
            self.clear()  # its initial tensors were dropped after the branch announced as the last
        if self._model is None:
            model = build(cfg)
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            if not is_adapter_dir(cfg.policy):
                self._source = file_source(model_files(cfg.policy)[1], trainable)
            if self._source is None:
                self._initial = {n: p.detach().to("cpu", copy=True) for n, p in trainable.items()}
            self._key, self._model = policy_key(cfg), model
            return model
        trainable = {n: p for n, p in self._model.named_parameters() if p.requires_grad}
        for p in trainable.values():
            p.grad = None
        if self._source is not None:
            read_into(self._source, trainable)
        else:
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(self._initial[n])
            if self.last_branch:
                self._initial = {}  # no later branch restores it
        self.reuses += 1
        log.info("sweep workspace: policy restored to %s in place (branch %d)", cfg.policy, self.reuses + 1)
        return self._model

    def reuse_moments(self, optimizer: torch.optim.AdamW) -> None:
        """Give a new AdamW (no step taken yet) the previous branch's moment buffers, zeroed in place."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = self._moments.get(p)
                if (
                    state
                ):  # step, exp_avg, exp_avg_sq (max_exp_avg_sq with amsgrad): all zero in a fresh AdamW
                    for v in state.values():
                        if isinstance(v, torch.Tensor):
                            v.zero_()
                    optimizer.state[p] = state
        self._moments = {}

    def keep(self, model: Any, optimizer: torch.optim.Optimizer) -> None:
        """Take back the trained policy (unwrapped, without accelerate's precision wrapper) and its optimizer
        state, for the next branch to overwrite."""
        self._model = model
        self._moments = {p: s for p, s in optimizer.state.items() if isinstance(s, dict) and s}
