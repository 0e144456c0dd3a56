"""Bradley–Terry reward/cost models on a tiny GPT-2: the maths by hand, learning on the PKU fixture, saved HF
directories, scorer shapes, padding invariance, ensemble aggregation, and config validation."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from sacpo.config import ConfigError, from_dict, load_config
from sacpo.data.loaders import load_examples
from sacpo.math.reward import aggregate_scores, bradley_terry_loss, pairwise_accuracy
from sacpo.models.load import ModelLoadError
from sacpo.models.reward import sequence_scores
from sacpo.scoring.reward_model import RewardModelScorer
from sacpo.train.batches import split_indices
from sacpo.train.reward_model import RewardConfig, train_reward_model

FAST = {
    "max_steps": 24,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_ratio": 0.0,
    "max_length": 80,
    "max_prompt_length": 40,
    "eval_fraction": 0.25,
    "log_every": 8,
}


def make_cfg(model, data, out, fmt="pku_helpful", **kw) -> RewardConfig:
    fields = {
        **FAST,
        "model": str(model),
        "output_dir": str(out),
        "data": {"source": str(data), "format": fmt},
    }
    fields.update(kw)
    return from_dict(RewardConfig, fields)


@pytest.fixture(scope="module")
def reward_run(tiny_model, pku_tiny, tmp_path_factory):
    cfg = make_cfg(tiny_model, pku_tiny, tmp_path_factory.mktemp("rm") / "reward")
    return cfg, train_reward_model(cfg, show_progress=False)


@pytest.fixture(scope="module")
def cost_ensemble(tiny_model, pku_tiny, tmp_path_factory):
    cfg = make_cfg(
        tiny_model, pku_tiny, tmp_path_factory.mktemp("rm") / "cost", fmt="pku_safe", ensemble=2, max_steps=16
    )
    return cfg, train_reward_model(cfg, show_progress=False)


def heldout_pairs(cfg):
    examples = load_examples(cfg.data.source, cfg.data.format)
    _, held = split_indices(len(examples), cfg.eval_fraction, cfg.seed)
    return [examples[i] for i in held]


# ------------------------------------------------------------------------------------------------ the maths
def test_bradley_terry_loss_hand_values():
    # L = −log σ(s_w − s_l) = log(1 + e^{−(s_w − s_l)})
    chosen = torch.tensor([2.0, 0.0, -1.0, 3.5])
    rejected = torch.tensor([0.0, 0.0, 1.0, 3.5])
    expected = torch.tensor([math.log(1 + math.exp(-2)), math.log(2), math.log(1 + math.exp(2)), math.log(2)])
    assert torch.allclose(bradley_terry_loss(chosen, rejected), expected, atol=1e-6)
    # gradient wrt s_w is −σ(s_l − s_w): at a margin of 0 it is −½
    s = torch.zeros(1, requires_grad=True)
    bradley_terry_loss(s, torch.zeros(1)).sum().backward()
    assert s.grad.item() == pytest.approx(-0.5)


def test_pairwise_accuracy_counts_ties_as_half_and_is_undefined_without_pairs():
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 3.0, 3.0])) == 0.5
    assert pairwise_accuracy(torch.empty(0), torch.empty(0)) is None


def test_aggregate_scores():
    s = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 0.5]])  # (k=2, N=3)
    assert aggregate_scores(s, "mean").tolist() == [2.0, -1.0, 0.5]
    assert aggregate_scores(s, "min").tolist() == [1.0, -2.0, 0.5]
    assert aggregate_scores(s, "max").tolist() == [3.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="valid"):
        aggregate_scores(s, "median")


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"ensemble": 0}, "ensemble must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -1e-4}, "lr must be > 0"),
        ({"eval_fraction": 1.0}, r"eval_fraction must be in \[0, 1\)"),
        ({"eval_fraction": -0.1}, r"eval_fraction must be in \[0, 1\)"),
        ({"kind": "penalty"}, "unknown kind"),
        ({"max_prompt_length": 80}, "max_prompt_length must be < max_length"),
        ({"fmt": "pku_safe_kto"}, "paired data"),
        ({"fmt": "nope"}, r"unknown data.format"),
        ({"lr": float("nan")}, "lr must be > 0"),
        ({"center_coef": -1.0}, "center_coef must be >= 0"),
    ],
)
def test_bad_config_is_rejected_before_any_model_loads(override, message):
    # the model directory does not exist: a ConfigError (not a ModelLoadError) proves validation came first
    with pytest.raises(ConfigError, match=message):
        make_cfg("/nonexistent/model", "/nonexistent/data.jsonl", "/nonexistent/out", **override)


def test_too_few_pairs_for_a_batch_fails_before_the_model_loads(tiny_model, pku_tiny, tmp_path, monkeypatch):
    import sacpo.train.reward_model as rm

    monkeypatch.setattr(rm, "build_reward_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match="cannot fill one batch"):
        train_reward_model(
            make_cfg(tiny_model, pku_tiny, tmp_path / "out", batch_size=64), show_progress=False
        )
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- one model
def test_reward_model_learns_the_fixture(reward_run):
    _, result = reward_run
    m = result.metrics
    assert (m["n_pairs"], m["n_train"], m["n_heldout"]) == (48, 36, 12)
    assert m["train_accuracy"] >= 0.9  # chance is 0.5; the fixture ranks Sure > Just > Well > Sorry
    assert m["heldout_accuracy"] >= 0.75
    assert m["heldout_loss"] < math.log(2) and m["train_loss"] < math.log(2)
    assert [h["step"] for h in m["history"]] == [8, 16, 24]
    assert m["history"][-1]["loss"] < m["history"][0]["loss"]
    assert result.kind == "reward" and result.model_dirs == [result.output_dir.resolve()]


def test_artifacts_are_a_loadable_hf_directory(reward_run, tiny_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, result = reward_run
    out = result.output_dir
    assert not out.with_name(out.name + ".tmp").exists()
    assert (
        json.loads((out / "metrics.json").read_text())["heldout_accuracy"]
        == result.metrics["heldout_accuracy"]
    )
    assert load_config(RewardConfig, out / "config.yaml") == cfg
    meta = json.loads((out / "reward_model.json").read_text())
    assert meta["kind"] == "reward" and meta["max_length"] == 80 and meta["max_prompt_length"] == 40
    assert list(out.glob("*.bin")) == [] and list(out.glob("*.safetensors"))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    # backbone weights were trained starting from the causal LM
    before, after = load_file(tiny_model / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.equal(
        before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"]
    )


def test_score_matches_hf_forward_on_an_unpadded_sequence(reward_run):
    # parity with the reference implementation: HF pools the last token when pad_token_id is None (batch of 1)
    from transformers import AutoModelForSequenceClassification

    _, result = reward_run
    model = AutoModelForSequenceClassification.from_pretrained(result.output_dir).eval()
    ids = torch.tensor([[72, 105, 10, 83, 117, 114, 101, 256]])  # (1, T), ends with EOS
    with torch.no_grad():
        ours = sequence_scores(model, ids, torch.ones_like(ids))  # (1,)
        model.config.pad_token_id = None
        theirs = model(input_ids=ids).logits[:, 0]  # (1,)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_scorer_shapes_padding_invariance_and_training_parity(reward_run):
    cfg, result = reward_run
    scorer = RewardModelScorer(result.output_dir, batch_size=8, device="cpu")
    assert scorer.view == "score" and scorer.name.startswith("reward:")
    prompts = ["How do I bake bread?"] * 3 + [({"role": "user", "content": "How do I fix a bike?"},)]
    responses = [
        "Sure: first bake bread, then check it twice.",
        "Sorry, I cannot help with that.",
        "Ok",
        "Just fix a bike.",
    ]
    batched = scorer(prompts, responses)
    assert batched.shape == (4,) and batched.dtype == torch.float32
    alone = torch.cat([scorer([p], [r]) for p, r in zip(prompts, responses, strict=True)])
    assert (batched - alone).abs().max().item() < 1e-5  # padding and batch composition do not change scores
    assert batched[0] > batched[1]  # compliant beats refusal
    assert scorer([], []).shape == (0,)
    # the scorer encodes exactly as training did: it reproduces the held-out accuracy in metrics.json
    held = heldout_pairs(cfg)
    chosen = scorer([e.prompt for e in held], [e.chosen for e in held])
    rejected = scorer([e.prompt for e in held], [e.rejected for e in held])
    assert pairwise_accuracy(chosen, rejected) == result.metrics["heldout_accuracy"]


def test_scorer_refuses_a_causal_lm_directory(tiny_model):
    with pytest.raises(ModelLoadError, match="sequence-classification"):
        RewardModelScorer(tiny_model, device="cpu", max_length=80, max_prompt_length=40)


def test_training_is_seeded_and_overwrites_atomically(tiny_model, pku_tiny, tmp_path):
    cfg = make_cfg(tiny_model, pku_tiny, tmp_path / "rm", max_steps=2)
    train_reward_model(cfg, show_progress=False)
    first = load_file(tmp_path / "rm" / "model.safetensors")
    train_reward_model(
        cfg, show_progress=False
    )  # same seed, same output dir: replaced with identical weights
    second = load_file(tmp_path / "rm" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]


# ----------------------------------------------------------------------------------------------- ensembles
def test_cost_ensemble_layout_and_metrics(cost_ensemble):
    _, result = cost_ensemble
    out, m = result.output_dir, result.metrics
    assert result.kind == "cost"
    assert [p.name for p in result.model_dirs] == ["member-0", "member-1"]
    assert [json.loads((d / "reward_model.json").read_text())["seed"] for d in result.model_dirs] == [0, 1]
    assert m["ensemble"] == 2 and len(m["members"]) == 2 and len(m["member_heldout_accuracy"]) == 2
    assert m["heldout_accuracy"] > 0.5 and m["train_accuracy"] > 0.8  # safer response gets the lower cost
    assert json.loads((out / "metrics.json").read_text())["heldout_accuracy"] == m["heldout_accuracy"]
    w = [load_file(d / "model.safetensors")["score.weight"] for d in result.model_dirs]
    assert not torch.equal(w[0], w[1])  # different seeds


def test_ensemble_aggregation_equals_manual_aggregation_of_members(cost_ensemble):
    cfg, result = cost_ensemble
    held = heldout_pairs(cfg)
    prompts = [e.prompt for e in held] + [e.prompt for e in held]
    responses = [e.chosen for e in held] + [e.rejected for e in held]
    members = torch.stack(
        [RewardModelScorer(d, view="score", device="cpu")(prompts, responses) for d in result.model_dirs]
    )  # (2, N) safety scores

    mean_cost = RewardModelScorer(result.output_dir, aggregate="mean", device="cpu")
    assert mean_cost.view == "cost" and mean_cost.name.startswith("cost:") and "×2" in mean_cost.name
    assert torch.allclose(mean_cost(prompts, responses), -members.mean(0), atol=1e-6)
    assert torch.allclose(mean_cost.member_scores(prompts, responses), -members, atol=1e-6)
    worst = RewardModelScorer(result.output_dir, aggregate="pessimistic", device="cpu")
    assert worst.aggregate == "max"  # worst case of a cost: max cost = −min score
    assert torch.allclose(worst(prompts, responses), -members.min(0).values, atol=1e-6)
    min_score = RewardModelScorer(result.output_dir, aggregate="min", view="score", device="cpu")
    assert torch.allclose(min_score(prompts, responses), members.min(0).values, atol=1e-6)
    # metrics.json's ensemble accuracy is the mean-aggregated accuracy on held-out pairs
    n = len(held)
    agg = members.mean(0)
    assert pairwise_accuracy(agg[:n], agg[n:]) == result.metrics["heldout_accuracy"]


def test_dtype_saves_the_reward_model_in_it_and_it_still_scores(tiny_model, pku_tiny, tmp_path):
    """dtype=bf16: every floating tensor (backbone and the float32-trained score head) is saved as bfloat16;
    the scorer reads it back and scores as the float32 upcast of those weights."""
    from sacpo.models.dtypes import checkpoint_dtype

    out = tmp_path / "rm16"
    train_reward_model(make_cfg(tiny_model, pku_tiny, out, max_steps=2, dtype="bf16"), show_progress=False)
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.bfloat16}
    assert "score.weight" in weights and checkpoint_dtype(out) == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    scores = RewardModelScorer(out, device="cpu")(["Hi"], ["Sure, here it is."])
    assert torch.isfinite(scores).all()
    # auto on the float32 tiny model: float32, as before
    train_reward_model(make_cfg(tiny_model, pku_tiny, tmp_path / "rm32", max_steps=2), show_progress=False)
    assert checkpoint_dtype(tmp_path / "rm32") == torch.float32
