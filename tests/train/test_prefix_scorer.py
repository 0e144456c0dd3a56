"""Training prefix value models: CD-Q targets on a hand-built case, the base top-k columns, FUDGE learning a
trivially learnable reward on the tiny GPT-2, CD-Q training, atomic save, config errors."""

import json
import math

import pytest
import torch

from sacpo.config import ConfigError, from_dict
from sacpo.data.tokenize import Encoded
from sacpo.models.load import load_model, load_tokenizer
from sacpo.models.prefix_value import PrefixScorer
from sacpo.scoring import SCORERS, FunctionScorer
from sacpo.train.prefix_rollouts import Rollout, base_topk, batch_tensors
from sacpo.train.prefix_scorer import TrainScorerConfig, scorer_targets, train_prefix_scorer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


class _IdValue:
    """A stand-in target network whose child value is the child's token id: V̄(x, y^t z) = z."""

    def child_values(self, input_ids, attention_mask, child_ids, chunk=0):
        return child_ids.float()


def test_cdq_targets_hand_built():
    # prompt (1, 2), response (3, 4, EOS=9): non-terminal prefixes at columns 1, 2, 3; terminal at column 4
    seq = Encoded((1, 2, 3, 4, 9), 2)
    top_ids = torch.tensor([[1, 2], [3, 4], [5, 6]])
    top_logp = torch.tensor([[0.5, 0.25], [0.1, 0.1], [0.3, 0.6]]).log()
    batch = batch_tensors([Rollout(seq, 7.0, top_ids, top_logp)], pad_id=0, k=2)
    assert batch["value_mask"][0].tolist() == [False, True, True, True, True]
    assert batch["terminal"][0].tolist() == [False, False, False, False, True]
    q = scorer_targets("q", batch, _IdValue())
    # Σ p̃·z: (2/3·1 + 1/3·2), (½·3 + ½·4), (⅓·5 + ⅔·6), then the reward
    assert torch.allclose(q[0, 1:], torch.tensor([4 / 3, 3.5, 17 / 3, 7.0]))
    fudge = scorer_targets("fudge", batch, None)
    assert torch.allclose(fudge[0, 1:], torch.full((4,), 7.0))


def test_cdq_targets_fewer_candidates_than_k():
    seq = Encoded((1, 2, 3, 9), 2)  # two non-terminal prefixes, one candidate each, k = 3
    rollout = Rollout(seq, -1.0, torch.tensor([[4], [5]]), torch.tensor([[-0.1], [-2.0]]))
    batch = batch_tensors([rollout], pad_id=0, k=3)
    q = scorer_targets("q", batch, _IdValue())
    assert torch.allclose(q[0, 1:], torch.tensor([4.0, 5.0, -1.0]))


def test_base_topk_columns(tiny_model, tokenizer):
    model = load_model(tiny_model).eval()
    seqs = [Encoded((70, 71, 72, 73, 74), 2), Encoded((80, 81, 82), 2)]
    tops = base_topk(model, seqs, tokenizer.pad_token_id, k=4)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seqs[0].input_ids])).logits[0]
    expect_logp, expect_ids = torch.log_softmax(logits, -1).topk(4, -1)
    ids, logp = tops[0]
    assert ids.shape == (3, 4)  # columns prompt_len−1 … len−2
    assert torch.equal(ids, expect_ids[1:4])
    assert torch.allclose(logp, expect_logp[1:4], atol=1e-5)
    assert tops[1][0].shape == (1, 4)


def _ascii_count(prompt, response):
    return float(sum(ch.isascii() and ch.isalpha() for ch in response))


def _cfg(tiny_model, tmp_path, **kw):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"train": ["hello", "a longer prompt", "xyz", "tell me"]}))
    fields = {
        "model": str(tiny_model),
        "output_dir": str(tmp_path / "scorer"),
        "prompts": str(prompts),
        "reward": "ascii-letters",
        "n_rollouts": 64,
        "max_new_tokens": 8,
        "steps": 40,
        "batch_size": 16,
        "lr": 3e-3,
        "eval_fraction": 0.25,
        "log_every": 10,
        "device": "cpu",
    }
    fields.update(kw)
    return from_dict(TrainScorerConfig, fields)


@pytest.fixture
def ascii_reward(monkeypatch):
    monkeypatch.setitem(SCORERS, "ascii-letters", lambda: FunctionScorer("letters", _ascii_count))


def test_fudge_learns_and_saves(tiny_model, tmp_path, ascii_reward):
    result = train_prefix_scorer(_cfg(tiny_model, tmp_path), show_progress=False)
    m = result.metrics
    assert m["heldout_after"]["mse_to_return"] < 0.5 * m["heldout_before"]["mse_to_return"]
    assert m["history"][-1]["loss"] < m["history"][0]["loss"]
    out = result.output_dir
    for name in ("config.json", "model.safetensors", "prefix_scorer.json", "metrics.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.json", "scorer"]  # no temporary left
    meta = json.loads((out / "prefix_scorer.json").read_text())
    assert meta["kind"] == "prefix_value" and meta["method"] == "fudge" and meta["reward"] == "ascii-letters"
    loaded = PrefixScorer.load(out, device="cpu")
    seqs = [Encoded((104, 105, 10, 97, 98), 3)]
    values = loaded.final_values(seqs, 256)
    assert values.shape == (1,) and torch.isfinite(values).all()


def test_cdq_trains(tiny_model, tmp_path, ascii_reward):
    cfg = _cfg(tiny_model, tmp_path, method="q", n_rollouts=32, steps=8, top_k=4, target_update_every=2)
    m = train_prefix_scorer(cfg, show_progress=False).metrics
    assert all(math.isfinite(h["loss"]) for h in m["history"])
    assert m["heldout_after"]["terminal_mse"] < m["heldout_before"]["terminal_mse"]
    assert json.loads((tmp_path / "scorer" / "prefix_scorer.json").read_text())["top_k"] == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"method": "sarsa"}, "unknown method"),
        ({"n_rollouts": 1}, "n_rollouts"),
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"top_k": 0}, "top_k"),
        ({"eval_fraction": 1.0}, "eval_fraction"),
    ],
)
def test_config_errors_before_loading(tmp_path, override, message):
    fields = {"model": str(tmp_path / "missing"), "output_dir": str(tmp_path / "o"), "prompts": "p.json"}
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainScorerConfig, {**fields, **override})


def test_unknown_reward_is_a_config_error(tiny_model, tmp_path):
    cfg = _cfg(tiny_model, tmp_path, reward="no-such-reward")
    with pytest.raises(ConfigError, match="toyworld-gold"):
        train_prefix_scorer(cfg, show_progress=False)
