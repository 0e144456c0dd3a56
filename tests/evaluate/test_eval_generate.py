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


# ------------------------------------------------------------- where the log-probs come from, what is loaded
def _old_way(model_dir, ref_dir, prompts, n_samples, max_new_tokens, seed, stream, **decode):
    """The samples and log-probs as generate_samples computed them before 2026-12-07: `sample` under the stream's
    seed, then one full forward pass per sequence under the policy and under the reference."""
    from sacpo.models.generate import sample
    from sacpo.models.logprobs import batched_sequence_logps
    from sacpo.rng import torch_seeded

    tok, policy, ref = load_tokenizer(model_dir), load_model(model_dir).eval(), load_model(ref_dir).eval()
    ids = [encode_prompt(tok, p, 256) for p in prompts]
    with torch_seeded(stream_seed(seed, stream)):
        seqs = sample(policy, ids, tok.eos_token_id, tok.pad_token_id, n=n_samples, max_new_tokens=max_new_tokens,
                      **decode)  # fmt: skip
    pad = tok.pad_token_id
    return seqs, batched_sequence_logps(policy, seqs, pad), batched_sequence_logps(ref, seqs, pad)


@pytest.mark.parametrize("decode", [{}, {"temperature": 0.7, "top_p": 0.9}], ids=["t1", "t0.7-p0.9"])
def test_samples_and_logps_equal_the_old_full_passes(other_model, tiny_model, tmp_path, decode):
    """The same draws as before; log π from the sampler at temperature 1 (a forward pass otherwise) and log π_SFT
    with each prompt prefilled once equal one full pass per sequence to float rounding."""
    kw = dict(n_samples=3, max_new_tokens=6, seed=4, stream="m")
    gen = generate_samples(other_model, PROMPTS, tmp_path / "s", tiny_model, **kw, **decode)
    seqs, want_policy, want_ref = _old_way(other_model, tiny_model, PROMPTS, **kw, **decode)
    tok = load_tokenizer(other_model)
    assert [r.response_tokens for r in gen.rows] == [len(s.input_ids) - s.prompt_len for s in seqs]
    for r, s in zip(gen.rows, seqs, strict=True):
        ids = list(s.input_ids[s.prompt_len :])
        assert r.response == tok.decode(ids[:-1] if r.finished else ids, clean_up_tokenization_spaces=False)
    got_policy = torch.tensor([r.logp_policy for r in gen.rows], dtype=torch.float64)
    got_ref = torch.tensor([r.logp_ref for r in gen.rows], dtype=torch.float64)
    torch.testing.assert_close(got_policy, want_policy, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_ref, want_ref, rtol=0, atol=1e-5)
    assert (got_policy - got_ref).abs().max() > 1e-2  # two different models (the check can fail)
    meta = gen.meta
    assert meta["logp_policy_from"] == ("sampler" if not decode else "forward pass")
    assert meta["logp_ref_from"] == "forward pass"


def test_the_reference_scores_its_own_samples_once(tiny_model, tmp_path, monkeypatch):
    """The SFT policy's rows: logp_ref is its logp_policy (the same model and ids), no reference pass runs."""
    import sacpo.models.prefix_logps as prefix_logps

    monkeypatch.setattr(prefix_logps.PromptCachedLogps, "__call__", lambda *a, **k: pytest.fail("a pass ran"))
    gen = generate_samples(tiny_model, PROMPTS, tmp_path / "s", tiny_model, n_samples=2, max_new_tokens=4)
    assert all(r.logp_policy == r.logp_ref for r in gen.rows)
    assert gen.meta["logp_ref_from"] == "logp_policy (the reference itself)"


def test_cache_keys_are_those_of_samples_written_before():
    """The key did not change (2026-12-07: log-probs from the sampler, tokenizer loaded once): samples cached by
    earlier versions are still hits. Values computed with the code of commit 989105d."""
    from sacpo.evaluate.generate import samples_key

    a = samples_key("m" * 64, "r" * 64, "t" * 64, PROMPTS[:2], 2, 6, 7, 256)
    assert a == "6eaacc3ff0fc3e07b048c5a69409403865590c88d923a293431cd665fe176616"
    b = samples_key("m" * 64, "r" * 64, "t" * 64, ["Hello"], 4, 16, 1, 128, 0.7, 0.9)
    assert b == "38820c79be2d7e603eaa2f11dc6880f2fcfb3bac6407cdc311e643bc8de86a8a"


def test_a_cache_written_without_the_new_meta_fields_still_hits(
    other_model, tiny_model, tmp_path, monkeypatch
):
    kw = dict(n_samples=2, max_new_tokens=4, seed=1)
    first = generate_samples(other_model, PROMPTS, tmp_path / "s", tiny_model, **kw)
    meta_path = tmp_path / "s" / META_FILE
    meta = json.loads(meta_path.read_text())
    old = {k: v for k, v in meta.items() if k not in ("logp_policy_from", "logp_ref_from")}
    meta_path.write_text(json.dumps(old))
    import sacpo.evaluate.generate as g

    monkeypatch.setattr(g, "load_model", lambda *a, **k: pytest.fail("a cache hit must not load a model"))
    hit = generate_samples(other_model, PROMPTS, tmp_path / "s", tiny_model, **kw)
    assert hit.cached and hit.rows == first.rows


def test_an_evaluation_loads_the_reference_tokenizer_once(tiny_model, other_model, tmp_path, monkeypatch):
    """Three models with the SFT's tokenizer files: one tokenizer load in all (it was two per model), the weights
    of each model hashed once."""
    import shutil

    import sacpo.models.load as load
    from sacpo.evaluate.run import ModelSpec, evaluate_models

    third = tmp_path / "third"
    shutil.copytree(other_model, third)
    monkeypatch.setattr(load, "_TOKENIZER_FINGERPRINTS", {})
    monkeypatch.setattr(load, "_FINGERPRINTS", {})
    loads, hashed = [], []
    real_load, real_hash = load.load_tokenizer, load.hash_files
    monkeypatch.setattr(load, "load_tokenizer", lambda p, *a: loads.append(str(p)) or real_load(p, *a))
    monkeypatch.setattr(load, "hash_files", lambda files: hashed.append(files[-1].parent) or real_hash(files))
    models = {"a": ModelSpec(dir=other_model), "b": ModelSpec(dir=third)}
    kw = dict(n_samples=2, max_new_tokens=3, show_progress=False, n_boot=10)
    results = evaluate_models(models, tiny_model, PROMPTS, None, None, 0.0, tmp_path / "e", **kw)
    assert [m.name for m in results] == ["sft", "a", "b"]
    assert loads == [str(tiny_model)]
    assert sorted(map(str, hashed)) == sorted(map(str, [tiny_model, other_model, third]))
