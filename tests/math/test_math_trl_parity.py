"""Parity of sacpo.math's DPO / IPO / KTO losses with TRL's own trainer code (|Δ| ≤ 1e-5).

TRL computes these losses inside trainer methods that run model forwards, so the test calls TRL's real methods
unbound, with a `SimpleNamespace` standing in for the trainer (only the attributes the method reads) and a stub
causal LM that mimics TRL's fused LM head (`model(..., labels=labels, fused_lm_head=True).log_probs`: per-token
log-probs of the shifted labels, 0 where the label is −100). TRL's formulas are never re-implemented here.

TRL functions used (trl 1.16.0, trl/trainer/...):
  - dpo_trainer.py  DPOTrainer._compute_loss        (def at line ~1285; loss_type branches at ~1386–1515:
                                                      "sigmoid" ~1387, "ipo" ~1393, "aot" ~1447)
  - dpo_trainer.py  DPOTrainer.compute_ref_log_probs (~1243; the precompute_ref_log_probs path)
  - kto_trainer.py  KTOTrainer._compute_loss        (~1370; loss_type "kto" at ~1451 and ~1469, z_ref at ~1444)
  - kto_trainer.py  KTOTrainer._compute_kl_logps    (~1337) and KTOTrainer.compute_ref_log_probs (~1296)
Both `_compute_loss` return the batch mean of the per-sequence losses, so per-example parity is checked by calling
TRL on one-example batches (for KTO the KL batch that sets z_ref stays the full batch).
"""

from collections import defaultdict
from contextlib import nullcontext
from types import MethodType, SimpleNamespace

import pytest
import torch

from sacpo.math.logprobs import masked_mean, masked_sum, token_logprobs
from sacpo.math.preference import dpo_loss, ipo_loss, kto_loss, kto_reference_point

pytest.importorskip("trl")
dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")
DPOTrainer, KTOTrainer = dpo_trainer.DPOTrainer, kto_trainer.KTOTrainer

for _cls, _methods in (
    (DPOTrainer, ("_compute_loss", "compute_ref_log_probs")),
    (KTOTrainer, ("_compute_loss", "_compute_kl_logps", "compute_ref_log_probs")),
):
    for _m in _methods:
        if not hasattr(_cls, _m):
            pytest.skip(
                f"installed TRL has no {_cls.__name__}.{_m}; update the parity stubs", allow_module_level=True
            )

ATOL = 1e-5
V, T = 32, 10

ACCELERATOR = SimpleNamespace(
    device=torch.device("cpu"),
    gather=lambda x: x,
    gather_for_metrics=lambda x: x,
    unwrap_model=lambda m: m,
    autocast=nullcontext,
)


class StubCausalLM(torch.nn.Module):
    """A parameter-free 'model' whose logits for each input row are looked up in a table (keyed by the row's
    token ids). Called like a TRL model with the fused LM head; returns per-token log-probs of labels[:, 1:]
    (0 where the label is −100). An nn.Module because accelerate's `is_peft_model` inspects `_modules`.
    """

    is_gradient_checkpointing = False

    def __init__(self, logits_by_row: dict[tuple[int, ...], torch.Tensor]):
        super().__init__()
        self.logits_by_row = logits_by_row

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.logits_by_row[tuple(row.tolist())] for row in input_ids])  # (N, T, V)

    def forward(self, *, input_ids, labels, fused_lm_head, attention_mask=None, use_cache=None):
        assert fused_lm_head
        shift_labels = labels[:, 1:]
        mask = shift_labels != -100
        logp = torch.log_softmax(self.logits(input_ids)[:, :-1], dim=-1)
        picked = logp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        log_probs = torch.where(mask, picked, torch.zeros_like(picked))
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(
            log_probs=log_probs,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=torch.zeros_like(mask),
            aux_loss=None,
        )


def make_rows(n: int, g: torch.Generator, first_id: int):
    """n right-padded rows: prompt of 1–3 tokens, completion of ≥1 token, then padding (id 0)."""
    input_ids = torch.zeros(n, T, dtype=torch.long)
    attention_mask = torch.zeros(n, T, dtype=torch.long)
    completion_mask = torch.zeros(n, T, dtype=torch.long)
    for i in range(n):
        p = int(torch.randint(1, 4, (1,), generator=g))
        c = int(torch.randint(1, T - p + 1, (1,), generator=g))
        input_ids[i, : p + c] = torch.randint(1, V, (p + c,), generator=g)
        input_ids[i, 0] = first_id + i  # unique first token → unique lookup key
        attention_mask[i, : p + c] = 1
        completion_mask[i, p : p + c] = 1
    return input_ids, attention_mask, completion_mask


def make_models(input_ids: torch.Tensor, g: torch.Generator, ref_bump: torch.Tensor | None = None):
    """Random policy logits and reference = policy + noise (+ ref_bump on the next-token label, per row)."""
    policy, ref = {}, {}
    for i, row in enumerate(input_ids):
        key = tuple(row.tolist())
        logits = 3 * torch.randn(T, V, generator=g)
        ref_logits = logits + torch.randn(T, V, generator=g)
        if ref_bump is not None:
            ref_logits[torch.arange(T - 1), row[1:]] += ref_bump[i]
        policy[key], ref[key] = logits, ref_logits
    return StubCausalLM(policy), StubCausalLM(ref)


def our_logps(model: StubCausalLM, input_ids: torch.Tensor, completion_mask: torch.Tensor):
    """Our side: sacpo.math.token_logprobs on the same logits → (summed, length-averaged) completion log-probs."""
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    tok = token_logprobs(model.logits(input_ids)[:, :-1], labels[:, 1:], chunk_size=4)
    mask = labels[:, 1:] != -100
    return masked_sum(tok, mask), masked_mean(tok, mask)


def new_metrics():
    return defaultdict(lambda: defaultdict(list))


# --------------------------------------------------------------------------------------------------------- DPO

B_PAIRS = 5


@pytest.fixture(scope="module")
def dpo_batch():
    g = torch.Generator().manual_seed(0)
    input_ids, attention_mask, completion_mask = make_rows(2 * B_PAIRS, g, first_id=1)  # [chosen; rejected]
    policy, ref = make_models(input_ids, g)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    return policy, ref, inputs


def dpo_self(
    policy, ref, loss_type: str, beta: float, label_smoothing: float = 0.0, precompute: bool = False
):
    """The DPOTrainer attributes that DPOTrainer._compute_loss / compute_ref_log_probs read."""
    return SimpleNamespace(
        model=policy,
        ref_model=ref,
        accelerator=ACCELERATOR,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        precompute_ref_logps=precompute,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=new_metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )


def trl_dpo(policy, ref, inputs, loss_type, beta, label_smoothing=0.0, precompute=False):
    trainer = dpo_self(policy, ref, loss_type, beta, label_smoothing, precompute)
    inputs = dict(inputs)
    if precompute:
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = DPOTrainer.compute_ref_log_probs(
            trainer, ref, inputs
        )
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def pair(inputs, i: int):
    """The one-pair batch [chosen_i; rejected_i]."""
    idx = torch.tensor([i, B_PAIRS + i])
    return {k: v[idx] for k, v in inputs.items()}


def ours_dpo_inputs(policy, ref, inputs, averaged: bool):
    p_sum, p_avg = our_logps(policy, inputs["input_ids"], inputs["completion_mask"])
    r_sum, r_avg = our_logps(ref, inputs["input_ids"], inputs["completion_mask"])
    p, r = (p_avg, r_avg) if averaged else (p_sum, r_sum)
    pc, pr = p.chunk(2)
    rc, rr = r.chunk(2)
    return pc, pr, rc, rr


@pytest.mark.parametrize("precompute", [False, True], ids=["ref_forward", "precomputed_ref"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_matches_trl(dpo_batch, beta, precompute):
    policy, ref, inputs = dpo_batch
    ours = dpo_loss(*ours_dpo_inputs(policy, ref, inputs, averaged=False), beta=beta)
    loss, metrics = trl_dpo(policy, ref, inputs, "sigmoid", beta, precompute=precompute)
    assert abs(loss.item() - ours.losses.mean().item()) <= ATOL
    assert abs(metrics["rewards/chosen"][-1] - ours.chosen_rewards.mean().item()) <= ATOL
    assert abs(metrics["rewards/rejected"][-1] - ours.rejected_rewards.mean().item()) <= ATOL
    for i in range(B_PAIRS):
        loss_i, _ = trl_dpo(policy, ref, pair(inputs, i), "sigmoid", beta, precompute=precompute)
        assert abs(loss_i.item() - ours.losses[i].item()) <= ATOL, i


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_matches_trl_length_normalised(dpo_batch, beta):
    # TRL's IPO divides each sequence log-ratio by its completion length; our ipo_loss gets length-averaged logps.
    policy, ref, inputs = dpo_batch
    ours = ipo_loss(*ours_dpo_inputs(policy, ref, inputs, averaged=True), beta=beta)
    loss, _ = trl_dpo(policy, ref, inputs, "ipo", beta)
    assert abs(loss.item() - ours.losses.mean().item()) <= ATOL
    for i in range(B_PAIRS):
        loss_i, _ = trl_dpo(policy, ref, pair(inputs, i), "ipo", beta)
        assert abs(loss_i.item() - ours.losses[i].item()) <= ATOL, i


def test_ipo_summed_logps_differ_from_trl(dpo_batch):
    # Guard that the normalisation matters on this batch (completion lengths differ from 1).
    policy, ref, inputs = dpo_batch
    ours = ipo_loss(*ours_dpo_inputs(policy, ref, inputs, averaged=False), beta=0.5)
    loss, _ = trl_dpo(policy, ref, inputs, "ipo", 0.5)
    assert abs(loss.item() - ours.losses.mean().item()) > 1e-3


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_dpo_label_smoothing_matches_trl_aot_on_single_pairs(dpo_batch, eps):
    # TRL 1.16's "sigmoid" ignores label_smoothing. Its "aot" loss is the conservative-DPO formula applied to
    # sorted batch log-ratios; with a one-pair batch the sort is the identity, so it is exactly cDPO.
    policy, ref, inputs = dpo_batch
    beta = 0.3
    ours = dpo_loss(*ours_dpo_inputs(policy, ref, inputs, averaged=False), beta=beta, label_smoothing=eps)
    for i in range(B_PAIRS):
        loss_i, _ = trl_dpo(policy, ref, pair(inputs, i), "aot", beta, label_smoothing=eps)
        assert abs(loss_i.item() - ours.losses[i].item()) <= ATOL, i


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_rpo_matches_trl_sigmoid_plus_sft_on_single_pairs(dpo_batch, alpha):
    # TRL 1.16: loss_type=["sigmoid", "sft"], loss_weights=[1, α]. Its "sft" term is the mean NLL over all chosen
    # tokens of the batch; ours is per pair (Pang et al. 2024). On one-pair batches the two are the same number.
    from sacpo.math.preference import rpo_nll

    policy, ref, inputs = dpo_batch
    beta = 0.2
    pc, pr, rc, rr = ours_dpo_inputs(policy, ref, inputs, averaged=False)
    lengths = (inputs["completion_mask"][:, 1:] != 0).sum(-1).chunk(2)[0]  # (B,) chosen completion tokens
    ours = dpo_loss(pc, pr, rc, rr, beta=beta).losses + alpha * rpo_nll(pc, lengths, averaged=False)
    for i in range(B_PAIRS):
        trainer = dpo_self(policy, ref, "sigmoid", beta)
        trainer.loss_types, trainer.loss_weights = ["sigmoid", "sft"], [1.0, alpha]
        with torch.no_grad():
            loss_i = DPOTrainer._compute_loss(trainer, policy, pair(inputs, i), return_outputs=False)
        assert abs(loss_i.item() - ours[i].item()) <= ATOL, i


# --------------------------------------------------------------------------------------------------------- KTO

B_KTO = 6
DESIRABLE = torch.tensor([True, False, True, True, False, False])


def kto_batch(z_sign: float):
    """Main rows and mismatched KL rows; the reference is bumped on the KL rows' labels so that the mean KL
    log-ratio is clearly positive (z_sign = +1: reference less likely) or clamped to 0 (z_sign = −1)."""
    g = torch.Generator().manual_seed(1)
    input_ids, attention_mask, completion_mask = make_rows(B_KTO, g, first_id=1)
    kl_ids, kl_attention, kl_completion = make_rows(B_KTO, g, first_id=1 + B_KTO)
    policy, ref = make_models(input_ids, g)
    kl_policy, kl_ref = make_models(kl_ids, g, ref_bump=torch.full((B_KTO,), -0.4 * z_sign))
    policy.logits_by_row.update(kl_policy.logits_by_row)
    ref.logits_by_row.update(kl_ref.logits_by_row)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_attention,
        "KL_completion_mask": kl_completion,
        "label": DESIRABLE.clone(),
    }
    return policy, ref, inputs


def trl_kto(policy, ref, inputs, beta, desirable_weight, undesirable_weight, precompute=False):
    # The KTOTrainer attributes that KTOTrainer._compute_loss / compute_ref_log_probs read.
    trainer = SimpleNamespace(
        model=policy,
        ref_model=ref,
        accelerator=ACCELERATOR,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        precompute_ref_logps=precompute,
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        _metrics=new_metrics(),
        _total_train_tokens=0,
        _tp_size=1,
    )
    # _compute_loss calls self._compute_kl_logps(...): bind TRL's real method to the stub.
    trainer._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, trainer)
    inputs = dict(inputs)
    if precompute:
        inputs["ref_logps"], inputs["ref_KL_logps"] = KTOTrainer.compute_ref_log_probs(trainer, ref, inputs)
    with torch.no_grad():
        loss = KTOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def ours_kto(policy, ref, inputs, beta, dw, uw):
    p, _ = our_logps(policy, inputs["input_ids"], inputs["completion_mask"])
    r, _ = our_logps(ref, inputs["input_ids"], inputs["completion_mask"])
    p_kl, _ = our_logps(policy, inputs["KL_input_ids"], inputs["KL_completion_mask"])
    r_kl, _ = our_logps(ref, inputs["KL_input_ids"], inputs["KL_completion_mask"])
    z = kto_reference_point(p_kl, r_kl)
    return kto_loss(p, r, inputs["label"], beta, z, desirable_weight=dw, undesirable_weight=uw), z


@pytest.mark.parametrize("z_sign", [1.0, -1.0], ids=["z_positive", "z_clamped"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.75)], ids=["unit_weights", "weighted"])
@pytest.mark.parametrize("precompute", [False, True], ids=["ref_forward", "precomputed_ref"])
def test_kto_matches_trl(z_sign, weights, precompute):
    beta = 0.4
    dw, uw = weights
    policy, ref, inputs = kto_batch(z_sign)
    ours, z = ours_kto(policy, ref, inputs, beta, dw, uw)
    if z_sign > 0:
        assert z.item() > 0.5
    else:
        assert z.item() == 0.0

    loss, metrics = trl_kto(policy, ref, inputs, beta, dw, uw, precompute=precompute)
    assert abs(metrics["kl"][-1] - z.item()) <= ATOL
    assert abs(loss.item() - ours.losses.mean().item()) <= ATOL
    assert abs(metrics["rewards/chosen"][-1] - ours.chosen_rewards.mean().item()) <= ATOL
    assert abs(metrics["rewards/rejected"][-1] - ours.rejected_rewards.mean().item()) <= ATOL

    # Per example: a one-example main batch, the full KL batch (same z_ref).
    main_keys = ("input_ids", "attention_mask", "completion_mask", "label")
    for i in range(B_KTO):
        single = {k: (v[i : i + 1] if k in main_keys else v) for k, v in inputs.items()}
        loss_i, metrics_i = trl_kto(policy, ref, single, beta, dw, uw, precompute=precompute)
        assert abs(metrics_i["kl"][-1] - z.item()) <= ATOL
        assert abs(loss_i.item() - ours.losses[i].item()) <= ATOL, i
