"""sacpo.evaluate.generate on the tiny GPT-2: seeded samples, exact log-probs of the sampled ids, the cache."""

import json

import pytest
import torch

from sacpo.data.tokenize import Encoded, encode_prompt, pad_sequences
from sacpo.evaluate.generate import (
    META_FILE,
    SAMPLES_FILE,
    SampleRow,
    generate_samples,
    read_samples,
    stream_seed,
)
from sacpo.models.load import load_model, load_tokenizer
from sacpo.models.logprobs import sequence_logps

PROMPTS = ["Hello", ({"role": "user", "content": "How are you?"},), "Tell me a joke"]


def test_samples_rows_logps_and_identity_kl(tiny_model, tmp_path):
    gen = generate_samples(tiny_model, PROMPTS, tmp_path / "s", tiny_model, n_samples=2, max_new_tokens=6)
    assert not gen.cached and gen.path == tmp_path / "s" / SAMPLES_FILE
    rows = gen.rows
    assert len(rows) == 6
    assert [(r.prompt_index, r.sample) for r in rows] == [(p, s) for p in range(3) for s in range(2)]
    assert rows[2].prompt == PROMPTS[1]  # conversations survive as tuples of messages
    for r in rows:
        assert 1 <= r.response_tokens <= 6
        assert r.logp_policy == r.logp_ref  # policy == reference: the log-ratio is exactly 0
        assert r.logp_policy < 0
    # the file holds the same rows (JSON), with the documented fields
    assert read_samples(gen.path) == rows
    first = json.loads(gen.path.read_text().splitlines()[0])
    assert {"prompt", "response", "sample", "logp_policy", "logp_ref"} <= set(first)
    assert json.loads((tmp_path / "s" / META_FILE).read_text())["n_samples"] == 2


def test_logps_are_those_of_the_roundtripping_text(tiny_model, tmp_path):
    """For a response whose text re-encodes to the sampled ids, scoring the text gives the recorded log-prob.

    The random byte-level model often samples bytes that are not valid UTF-8 (text ≠ ids: roundtrip false), so
    one-token responses give both kinds."""
    gen = generate_samples(tiny_model, PROMPTS, tmp_path, tiny_model, n_samples=4, max_new_tokens=1)
    assert not all(r.roundtrip for r in gen.rows)
    tok, model = load_tokenizer(tiny_model), load_model(tiny_model).eval()
    checked = 0
    for r in gen.rows:
        if not r.roundtrip:
            continue
        p_ids = encode_prompt(tok, r.prompt, 256)
        ids = tok(r.response, add_special_tokens=False)["input_ids"] + (
            [tok.eos_token_id] if r.finished else []
        )
        batch = pad_sequences([Encoded(tuple(p_ids + ids), len(p_ids))], tok.pad_token_id)
        with torch.no_grad():
            assert sequence_logps(model, batch).item() == pytest.approx(r.logp_policy, abs=1e-4)
        checked += 1
    assert checked > 0


def test_seeded_and_cached(tiny_model, other_model, tmp_path, monkeypatch):
    kw = dict(n_samples=2, max_new_tokens=5, seed=1)
    a = generate_samples(other_model, PROMPTS, tmp_path / "a", tiny_model, **kw)
    b = generate_samples(other_model, PROMPTS, tmp_path / "b", tiny_model, **kw)
    assert [r.response for r in a.rows] == [r.response for r in b.rows]  # same seed, same samples
    assert any(r.logp_policy != r.logp_ref for r in a.rows)  # a different model than the reference
    c = generate_samples(other_model, PROMPTS, tmp_path / "c", tiny_model, **{**kw, "seed": 2})
    assert [r.response for r in c.rows] != [r.response for r in a.rows]

    import sacpo.evaluate.generate as g

    def no_load(*args, **kwargs):
        raise AssertionError("a cache hit must not load a model")

    monkeypatch.setattr(g, "load_model", no_load)
    hit = generate_samples(other_model, PROMPTS, tmp_path / "a", tiny_model, **kw)
    assert hit.cached and hit.rows == a.rows
    with pytest.raises(AssertionError, match="must not load"):  # another key (more tokens): regenerates
        generate_samples(other_model, PROMPTS, tmp_path / "a", tiny_model, **{**kw, "max_new_tokens": 6})


def test_stream_seed_is_a_stable_sha256():
    import hashlib

    want = int.from_bytes(hashlib.sha256(b"0:safe-lam1").digest()[:8], "big") & (2**63 - 1)
    assert stream_seed(0, "safe-lam1") == want
    assert len({stream_seed(s, n) for s in (0, 1) for n in ("sft", "helpful", "safe")}) == 6
    assert 0 <= stream_seed(7, "x") < 2**63


def test_stream_draws_its_own_samples_and_is_recorded(other_model, tiny_model, tmp_path):
    kw = dict(n_samples=2, max_new_tokens=5, seed=1)
    plain = generate_samples(other_model, PROMPTS, tmp_path / "p", tiny_model, **kw)
    s = generate_samples(other_model, PROMPTS, tmp_path / "s", tiny_model, **kw, stream="m")
    again = generate_samples(other_model, PROMPTS, tmp_path / "s2", tiny_model, seed=stream_seed(1, "m"),
                             n_samples=2, max_new_tokens=5)  # fmt: skip
    assert [r.response for r in s.rows] == [r.response for r in again.rows]  # = the derived seed
    assert [r.response for r in s.rows] != [r.response for r in plain.rows]
    meta = json.loads((tmp_path / "s" / META_FILE).read_text())
    assert (meta["seed"], meta["stream"], meta["sampling_seed"]) == (1, "m", stream_seed(1, "m"))
    assert json.loads((tmp_path / "p" / META_FILE).read_text())["stream"] is None


def test_sample_row_json_and_errors(tmp_path):
    row = SampleRow(({"role": "user", "content": "hi"},), "yo", 0, float("nan"), -1.0)
    d = row.to_json()
    assert d["prompt"] == [{"role": "user", "content": "hi"}] and d["logp_policy"] is None
    assert SampleRow.from_json({"prompt": "x", "response": "y", "sample": 1}).logp_ref is None
    with pytest.raises(ValueError, match="lacks"):
        SampleRow.from_json({"prompt": "x"})
    with pytest.raises(ValueError):
        generate_samples(tmp_path, [], tmp_path, tmp_path)


def test_generate_samples_leaves_the_global_rng_alone(tiny_model, tmp_path):
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    generate_samples(tiny_model, PROMPTS[:1], tmp_path / "s", tiny_model, n_samples=2, max_new_tokens=3)
    assert torch.equal(torch.random.get_rng_state(), before)
