"""sacpo.math.merging: linear interpolation of state dicts and of dense LoRA updates."""

import pytest
import torch

from sacpo.math.merging import (
    MergeError,
    add_deltas,
    check_compatible,
    concat_lora,
    linear_merge,
    lora_delta,
    lora_scaling,
    merge_lora_deltas,
)


def state_dicts(dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = {
        "embed.weight": torch.randn(10, 4, generator=g).to(dtype),
        "layer.weight": torch.randn(4, 4, generator=g).to(dtype),
        "layer.bias": torch.randn(4, generator=g).to(dtype),
        "position_ids": torch.arange(8),
    }
    b = {
        k: (torch.randn(v.shape, generator=g).to(dtype) if v.is_floating_point() else v.clone())
        for k, v in a.items()
    }
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_endpoints_are_exact(dtype):
    a, b = state_dicts(dtype)
    m0, m1 = linear_merge(a, b, 0.0), linear_merge(a, b, 1.0)
    for k in a:
        assert torch.equal(m0[k], a[k]), k
        assert torch.equal(m1[k], b[k]), k


def test_midpoint_and_quarter_by_hand():
    a = {"w": torch.tensor([[0.0, 2.0], [-4.0, 1.0]])}
    b = {"w": torch.tensor([[2.0, 6.0], [4.0, 1.0]])}
    assert linear_merge(a, b, 0.5)["w"].tolist() == [[1.0, 4.0], [0.0, 1.0]]
    assert linear_merge(a, b, 0.25)["w"].tolist() == [[0.5, 3.0], [-2.0, 1.0]]  # (1−q)·a + q·b


@pytest.mark.parametrize("q", [0.1, 0.37, 0.5, 0.9])
def test_formula_matches_explicit_combination(q):
    a, b = state_dicts()
    merged = linear_merge(a, b, q)
    for k in ("embed.weight", "layer.weight", "layer.bias"):
        torch.testing.assert_close(merged[k], (1 - q) * a[k] + q * b[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_and_shape_preserved(dtype):
    a, b = state_dicts(dtype)
    merged = linear_merge(a, b, 0.3)
    assert set(merged) == set(a)
    for k in a:
        assert merged[k].dtype == a[k].dtype, k
        assert merged[k].shape == a[k].shape, k


def test_low_precision_merge_is_computed_in_float32_then_rounded():
    a, b = state_dicts(torch.bfloat16)
    merged = linear_merge(a, b, 0.3)
    expected = torch.lerp(a["layer.weight"].float(), b["layer.weight"].float(), 0.3).to(torch.bfloat16)
    assert torch.equal(merged["layer.weight"], expected)


def test_integer_buffers_copied_and_outputs_do_not_alias_inputs():
    a, b = state_dicts()
    merged = linear_merge(a, b, 0.0)
    assert torch.equal(merged["position_ids"], a["position_ids"])
    assert merged["position_ids"].dtype == torch.int64
    for k in a:
        assert merged[k].data_ptr() != a[k].data_ptr(), k
    before = a["layer.weight"].clone()
    merged["layer.weight"].add_(1.0)
    assert torch.equal(a["layer.weight"], before)


def test_differing_integer_buffers_raise():
    a, b = state_dicts()
    b["position_ids"] = b["position_ids"] + 1
    with pytest.raises(MergeError, match="position_ids"):
        linear_merge(a, b, 0.5)


def test_inputs_not_modified():
    a, b = state_dicts()
    a_copy = {k: v.clone() for k, v in a.items()}
    b_copy = {k: v.clone() for k, v in b.items()}
    linear_merge(a, b, 0.4)
    for k in a:
        assert torch.equal(a[k], a_copy[k]) and torch.equal(b[k], b_copy[k])


def test_vocab_size_mismatch_names_key_and_shapes():
    a, b = state_dicts()
    b["embed.weight"] = torch.randn(12, 4)
    with pytest.raises(MergeError) as excinfo:
        linear_merge(a, b, 0.5)
    msg = str(excinfo.value)
    assert "'embed.weight'" in msg
    assert "(10, 4)" in msg and "(12, 4)" in msg
    with pytest.raises(MergeError, match=r"embed\.weight"):
        check_compatible(a, b)


def test_key_mismatch_names_keys():
    a, b = state_dicts()
    b["lm_head.weight"] = b.pop("layer.bias")
    with pytest.raises(MergeError) as excinfo:
        linear_merge(a, b, 0.5)
    msg = str(excinfo.value)
    assert "layer.bias" in msg and "lm_head.weight" in msg
    assert "only in a" in msg and "only in b" in msg


def test_key_mismatch_message_truncated_after_five():
    a = {f"k{i}": torch.zeros(1) for i in range(8)}
    with pytest.raises(MergeError) as excinfo:
        check_compatible(a, {})
    msg = str(excinfo.value)
    assert "k0" in msg and "k4" in msg and "k7" not in msg and "…" in msg


def test_dtype_mismatch_raises():
    a, b = state_dicts()
    b["layer.weight"] = b["layer.weight"].to(torch.bfloat16)
    with pytest.raises(MergeError, match=r"layer\.weight.*dtype"):
        linear_merge(a, b, 0.5)


def test_merge_error_is_value_error():
    assert issubclass(MergeError, ValueError)


@pytest.mark.parametrize("q", [-0.01, 1.01, 2.0, float("nan"), float("inf")])
def test_q_outside_unit_interval_raises(q):
    a, b = state_dicts()
    with pytest.raises(MergeError, match="q"):
        linear_merge(a, b, q)
    with pytest.raises(MergeError, match="q"):
        merge_lora_deltas(a, b, q)


def test_check_compatible_accepts_identical_structures():
    a, b = state_dicts()
    check_compatible(a, b)
    check_compatible({}, {})
    assert linear_merge({}, {}, 0.5) == {}


# ------------------------------------------------------------------------------------------------------- LoRA


def lora_factors(r: int = 3, d_in: int = 5, d_out: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)


def test_lora_delta_matches_explicit_matmul():
    lora_a, lora_b = lora_factors()
    delta = lora_delta(lora_a, lora_b, scaling=2.0)
    assert delta.shape == (4, 5)
    torch.testing.assert_close(delta, 2.0 * torch.matmul(lora_b, lora_a))
    # Entry by entry: ΔW[i, j] = s·Σ_k B[i, k]·A[k, j].
    i, j = 2, 3
    by_hand = 2.0 * sum(lora_b[i, k].item() * lora_a[k, j].item() for k in range(3))
    assert delta[i, j].item() == pytest.approx(by_hand, rel=1e-5)


def test_lora_delta_scaling_alpha_over_r_and_float32_output():
    lora_a, lora_b = lora_factors()
    alpha, r = 16, 3
    delta = lora_delta(lora_a.to(torch.bfloat16), lora_b.to(torch.bfloat16), scaling=alpha / r)
    assert delta.dtype == torch.float32
    expected = (alpha / r) * (lora_b.to(torch.bfloat16).float() @ lora_a.to(torch.bfloat16).float())
    torch.testing.assert_close(delta, expected)


def test_lora_delta_rank_mismatch_raises():
    lora_a, _ = lora_factors(r=3)
    _, lora_b = lora_factors(r=2)
    with pytest.raises(MergeError, match="ranks"):
        lora_delta(lora_a, lora_b, scaling=1.0)


def test_merge_lora_deltas_is_dense_interpolation_not_factorwise():
    q = 0.3
    a1, b1 = lora_factors(seed=1)
    a2, b2 = lora_factors(seed=2)
    da, db = {"q_proj": lora_delta(a1, b1, 0.5)}, {"q_proj": lora_delta(a2, b2, 0.5)}
    merged = merge_lora_deltas(da, db, q)["q_proj"]
    torch.testing.assert_close(merged, (1 - q) * 0.5 * (b1 @ a1) + q * 0.5 * (b2 @ a2))
    factorwise = 0.5 * (((1 - q) * b1 + q * b2) @ ((1 - q) * a1 + q * a2))
    assert not torch.allclose(merged, factorwise, atol=1e-3)


def test_merged_deltas_on_shared_base_equal_linear_merge_of_models():
    q = 0.65
    g = torch.Generator().manual_seed(3)
    base = {"q_proj": torch.randn(4, 5, generator=g), "v_proj": torch.randn(4, 5, generator=g)}
    da = {k: lora_delta(*lora_factors(seed=10 + i), scaling=2.0) for i, k in enumerate(base)}
    db = {k: lora_delta(*lora_factors(seed=20 + i), scaling=2.0) for i, k in enumerate(base)}
    merged_delta = merge_lora_deltas(da, db, q)
    merged_models = linear_merge({k: base[k] + da[k] for k in base}, {k: base[k] + db[k] for k in base}, q)
    for k in base:
        torch.testing.assert_close(base[k] + merged_delta[k], merged_models[k], rtol=1e-5, atol=1e-5)


def test_merge_lora_deltas_mismatched_modules_raise():
    lora_a, lora_b = lora_factors()
    d = lora_delta(lora_a, lora_b, 1.0)
    with pytest.raises(MergeError, match="k_proj"):
        merge_lora_deltas({"q_proj": d}, {"k_proj": d}, 0.5)
    with pytest.raises(MergeError, match=r"\(4, 5\).*\(4, 6\)"):
        merge_lora_deltas({"q_proj": d}, {"q_proj": torch.zeros(4, 6)}, 0.5)


def test_lora_delta_fan_in_fan_out_is_the_transpose_and_matches_peft_conv1d():
    """GPT-2's Conv1D stores W as (in, out): peft's merged update is (B·A)ᵀ·s, which lora_delta gives bit for bit."""
    lora_a, lora_b = lora_factors(r=3, d_in=5, d_out=4)
    delta = lora_delta(lora_a, lora_b, scaling=0.5, fan_in_fan_out=True)
    assert delta.shape == (5, 4)
    assert torch.equal(delta, lora_delta(lora_a, lora_b, scaling=0.5).T)
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Conv1D(4, 5)  # nf=out, nx=in: weight (5, 4)

    model = get_peft_model(
        One(), LoraConfig(r=3, lora_alpha=1.5, target_modules=["proj"], fan_in_fan_out=True)
    )
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    assert torch.equal(layer.get_delta_weight("default"), delta)


def test_add_deltas_applies_updates_in_order_and_keeps_the_dtype():
    w = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    d1, d2 = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.25, 0.25]])
    out = add_deltas(w, [d1, d2])
    assert out.dtype == torch.bfloat16
    assert out.float().tolist() == [[1.75, 1.25]]
    with pytest.raises(MergeError, match="shape"):
        add_deltas(w, [torch.zeros(2, 1)])


def test_concat_lora_is_the_weighted_sum_of_updates():
    """B·A of the block factors = Σ c_i·B_i·A_i (ranks 3 and 2 → 5): by hand for one entry, and in full."""
    a1, b1 = lora_factors(r=3, seed=1)
    a2, b2 = lora_factors(r=2, seed=2)
    a, b = concat_lora([(0.7, a1, b1), (0.3, a2, b2)])
    assert a.shape == (5, 5) and b.shape == (4, 5)
    torch.testing.assert_close(b @ a, 0.7 * b1 @ a1 + 0.3 * b2 @ a2)
    by_hand = sum(0.7 * b1[1, k].item() * a1[k, 2].item() for k in range(3)) + sum(
        0.3 * b2[1, k].item() * a2[k, 2].item() for k in range(2)
    )
    assert (b @ a)[1, 2].item() == pytest.approx(by_hand, rel=1e-5)
    with pytest.raises(MergeError, match="no LoRA"):
        concat_lora([])


def test_lora_scaling_alpha_over_r_or_sqrt_r():
    assert lora_scaling(16, 4) == 4.0
    assert lora_scaling(16, 4, rslora=True) == 8.0
    with pytest.raises(MergeError, match="rank"):
        lora_scaling(16, 0)
