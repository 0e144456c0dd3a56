"""The loss of one micro-batch (DPO / IPO / KTO) and the reduction of its metrics over micro-batches and processes.

Paired losses run chosen and rejected through the policy in one forward: as one row prompt + chosen + rejected per
pair where the model allows it (`share_prompt`, probed once per model by `PackedPairsProbe`) and the batch costs
fewer FLOPs that way (`sacpo.models.row_cost`), else as 2b padded rows. KTO runs the completions with gradient
and the mismatched completions without (its reference point z_ref).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from sacpo.data.tokenize import Encoded, pack_pairs, pad_sequences, shares_prompt
from sacpo.math.preference import get_loss, kto_reference_point, rpo_nll
from sacpo.models.logprobs import packed_pair_logps, sequence_logps, supports_packed_pairs
from sacpo.models.row_cost import RowCost, packing_pays
from sacpo.train.batches import Split
from sacpo.train.config import TrainConfig


class PackedPairsProbe:
    """`supports_packed_pairs(model)`, probed once per model object and remembered here (not on the model).

    One probe serves a stage's reference pass and its steppers; a sweep workspace keeps one across branches (they
    train the same model object). Entries hold a weak reference, so a freed model's id is never mistaken for a new
    model's."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref, bool]] = {}

    def __call__(self, model: Any) -> bool:
        hit = self._seen.get(id(model))
        if hit is not None and hit[0]() is model:
            return hit[1]
        ok = supports_packed_pairs(model)
        self._seen[id(model)] = (weakref.ref(model), ok)
        return ok


class BatchLoss:
    """Computes the loss and metrics of one micro-batch (a list of global indices, already local to a process)."""

    def __init__(
        self,
        cfg: TrainConfig,
        data: Split,
        pad_id: int,
        accelerator: Any,
        probe: PackedPairsProbe | None = None,
    ) -> None:
        self.cfg, self.data, self.pad_id, self.acc = cfg, data, pad_id, accelerator
        self.probe = probe if probe is not None else PackedPairsProbe()
        self.loss = get_loss(cfg.loss)
        self.average = cfg.resolved_average_logprobs  # length-averaged log-probs (auto: ipo only)
        self.share: bool | None = None  # shared-prompt rows allowed: decided at the first paired batch
        self.cost: RowCost | None = None  # what a batch costs each way (`sacpo.models.row_cost`)
        self.packed_batches = 0  # paired batches run as shared-prompt rows / as padded rows
        self.padded_batches = 0

    def _share_prompt(self, model: Any, pairs: list[tuple[Encoded, Encoded]]) -> bool:
        """Shared-prompt rows for this batch: cfg.share_prompt, where the model reproduces the padded log-probs
        from packed rows (probed once), every pair shares its prompt, and the rows cost fewer FLOPs than two
        padded rows per pair (`sacpo.models.row_cost.packing_pays`; without a cost model, always)."""
        if self.share is None:
            self.share = self.cfg.share_prompt and self.probe(model)
            self.cost = RowCost.of(model) if self.share else None
        if not self.share or not all(shares_prompt(x, y) for x, y in pairs):
            return False
        return packing_pays(self.cost, pairs)

    def _batch(self, seqs: list[Encoded]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.acc.device) for k, v in pad_sequences(seqs, self.pad_id).items()}

    def __call__(self, model: Any, idx: list[int], global_idx: list[int]) -> tuple[torch.Tensor, dict]:
        """(mean loss over the micro-batch, metrics as 0-d tensors)."""
        ref = self.data.ref[idx].to(self.acc.device)  # (b, 2)
        if self.loss.kind == "paired":
            return self._paired(model, idx, ref)
        return self._kto(model, idx, ref)

    def _paired(self, model: Any, idx: list[int], ref: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg, pairs = self.cfg, [self.data.pairs[i] for i in idx]
        if self._share_prompt(model, pairs):
            self.packed_batches += 1
            packed = {k: v.to(self.acc.device) for k, v in pack_pairs(pairs, self.pad_id).items()}
            logps = packed_pair_logps(model, packed, cfg.logprob_chunk, self.average)  # (2b,)
        else:
            self.padded_batches += 1
            seqs = [a for a, _ in pairs] + [b for _, b in pairs]
            logps = sequence_logps(model, self._batch(seqs), cfg.logprob_chunk, self.average)  # (2b,)
        chosen, rejected = logps.split(len(idx))  # (b,), (b,)
        kwargs = {"label_smoothing": cfg.label_smoothing} if cfg.loss == "dpo" else {}
        out = self.loss.fn(chosen, rejected, ref[:, 0], ref[:, 1], cfg.beta, **kwargs)
        losses = out.losses
        metrics = {
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/accuracy": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "rewards/margin": (out.chosen_rewards - out.rejected_rewards).mean(),
        }
        if cfg.rpo_alpha > 0:
            lengths = torch.tensor([a.response_len for a, _ in pairs], device=chosen.device)  # (b,)
            nll = rpo_nll(chosen, lengths, self.average)  # (b,)
            losses = losses + cfg.rpo_alpha * nll
            metrics["rpo/nll"] = nll.detach().mean()
        return losses.mean(), metrics

    def _kto(self, model: Any, idx: list[int], ref: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg, d = self.cfg, self.data
        completions = self._batch([d.pairs[i][0] for i in idx])
        logps = sequence_logps(model, completions, cfg.logprob_chunk, self.average)  # (b,)
        with torch.no_grad():
            mismatched = self._batch([d.pairs[i][1] for i in idx])
            kl_logps = sequence_logps(model, mismatched, cfg.logprob_chunk, self.average)  # (b,)
        # z_ref over the whole global batch (all processes), as in KTO / TRL
        z_ref = kto_reference_point(self.acc.gather(kl_logps), self.acc.gather(ref[:, 1].contiguous()))
        desirable = d.desirable[idx].to(self.acc.device)  # (b,)
        out = self.loss.fn(
            logps, ref[:, 0], desirable, cfg.beta, z_ref, cfg.desirable_weight, cfg.undesirable_weight
        )
        metrics = {"kto/z_ref": z_ref, "logps/completion": logps.detach().mean()}
        if out.chosen_rewards.numel():
            metrics["rewards/desirable"] = out.chosen_rewards.mean()
        if out.rejected_rewards.numel():
            metrics["rewards/undesirable"] = out.rejected_rewards.mean()
        return out.losses.mean(), metrics


def reduce_metrics(acc: Any, sums: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Mean of each metric over micro-batches, then over the processes that have it (a KTO micro-batch without
    desirable examples has no rewards/desirable; a metric absent everywhere is left out). The processes first
    agree on the keys, so that all of them make the same gathers in the same order."""
    keys = sorted(sums)
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        keys = sorted(set(gather_object(keys)))
    out = {}
    for k in keys:
        vals = sums.get(k, [])
        mean = torch.stack([x.detach().float().cpu() for x in vals]).mean() if vals else torch.tensor(0.0)
        local = torch.stack([mean, torch.tensor(1.0 if vals else 0.0)]).reshape(1, 2).to(acc.device)
        gathered = acc.gather(local)  # (P, 2): value, present
        out[k] = gathered[gathered[:, 1] > 0, 0].mean().item()
    return out
