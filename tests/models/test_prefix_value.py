"""Prefix value models: values at every position equal prefix-by-prefix forwards, tree-attention children equal
explicit children, right padding required, loading refuses a plain causal LM."""

import pytest
import torch

from sacpo.data.tokenize import Encoded, pad_sequences
from sacpo.models.load import ModelLoadError, load_tokenizer
from sacpo.models.prefix_value import PrefixScorer, naive_child_values

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def scorer(tiny_model, tokenizer):
    s = PrefixScorer.from_base(tiny_model, tokenizer, seed=3)
    s.model.eval()
    return s


def _batch(pad_id):
    seqs = [Encoded((5, 6, 7, 8, 9, 10), 2), Encoded((11, 12, 13), 1)]
    return pad_sequences(seqs, pad_id)


def test_values_at_every_position_match_prefix_forwards(scorer, tokenizer):
    batch = _batch(tokenizer.pad_token_id)
    with torch.no_grad():
        values = scorer(batch["input_ids"], batch["attention_mask"]).values  # (2, 6)
        for b, n in enumerate(batch["attention_mask"].sum(-1).tolist()):
            for t in range(n):
                ids = batch["input_ids"][b : b + 1, : t + 1]
                alone = scorer(ids, torch.ones_like(ids)).values[0, -1]
                assert values[b, t].item() == pytest.approx(alone.item(), abs=1e-5)


@pytest.mark.parametrize("chunk", [0, 2])
def test_tree_attention_children_equal_explicit_children(scorer, tokenizer, chunk):
    batch = _batch(tokenizer.pad_token_id)
    torch.manual_seed(0)
    children = torch.randint(0, 256, (2, 6, 3))
    with torch.no_grad():
        tree = scorer.child_values(batch["input_ids"], batch["attention_mask"], children, chunk=chunk)
        naive = naive_child_values(scorer, batch["input_ids"], batch["attention_mask"], children)
    valid = batch["attention_mask"].bool()
    assert torch.allclose(tree[valid], naive[valid], atol=1e-5)


def test_child_values_need_right_padding(scorer):
    ids = torch.tensor([[0, 5, 6]])
    with pytest.raises(ValueError, match="right-padded"):
        scorer.child_values(ids, torch.tensor([[0, 1, 1]]), torch.zeros(1, 3, 2, dtype=torch.long))


def test_load_refuses_a_plain_model(tiny_model):
    with pytest.raises(ModelLoadError, match="not a prefix scorer"):
        PrefixScorer.load(tiny_model)
