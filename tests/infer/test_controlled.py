"""Controlled decoding on the tiny GPT-2: β → ∞ is base sampling, small β raises the scorer's value, the reported
KL is the sum of exact per-token KLs (recomputed here without any KV cache, two scorers combined, rows stopping
early), blockwise K = 1 is base sampling, M ≥ max_new_tokens is best-of-K, run_cd writes rows read_samples reads
and counts its cost, bad configs fail before any model loads."""

import json
import math

import pytest
import torch

from sacpo.config import ConfigError, from_dict
from sacpo.data.tokenize import Encoded, encode_prompt
from sacpo.evaluate.generate import read_samples
from sacpo.infer.cd_block import block_cd
from sacpo.infer.cd_config import CDConfig
from sacpo.infer.cd_token import token_cd
from sacpo.math.decoding import blockwise_kl_bound, blockwise_kl_estimate, tilted_step
from sacpo.models.generate import sample
from sacpo.models.load import ModelLoadError, load_model, load_tokenizer
from sacpo.models.logprobs import batched_response_token_logps, batched_sequence_logps
from sacpo.models.prefix_value import PrefixScorer
from sacpo.recipes.cd import run_cd

PROMPTS = [
    "how do i bake bread ?",
    "tell me how to plant tomatoes quickly ?",
    "fix a bike ?",
    "explain how to fix a bike ?",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def base(tiny_model):
    return load_model(tiny_model).eval()


def _scorer(tiny_model, tok, seed):
    s = PrefixScorer.from_base(tiny_model, tok, seed=seed)
    with torch.no_grad():
        s.model.score.weight.mul_(20.0)  # values spread over a few units: tilts are visible
    s.model.eval()
    return s


@pytest.fixture(scope="module")
def scorer(tiny_model, tok):
    return _scorer(tiny_model, tok, 1)


@pytest.fixture(scope="module")
def safety(tiny_model, tok):
    return _scorer(tiny_model, tok, 2)


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return [encode_prompt(tok, p, 64) for p in PROMPTS]


def test_infinite_beta_full_vocabulary_is_base_sampling(base, scorer, tok, prompt_ids):
    torch.manual_seed(0)
    v = len(tok)
    out = token_cd(base, [scorer], prompt_ids, tok.eos_token_id, tok.pad_token_id, math.inf, v, 5, trace=True)
    for i, steps in enumerate(out.traces):
        assert abs(out.kl[i]) < 1e-9 and abs(out.kl_topk[i]) < 1e-9
        assert out.logp_policy[i] == pytest.approx(out.logp_base[i], abs=1e-6)  # q = p on the path
        for s in steps:
            assert len(s["ids"]) == v  # every token is a candidate, with q(z) = p(z)
            assert torch.logsumexp(s["logp"], -1).item() == pytest.approx(0.0, abs=1e-9)
    # the incremental (KV-cache, left-padded) log-probs equal a plain forward of the sampled sequences
    expected = batched_sequence_logps(base, out.seqs, tok.pad_token_id, 64, dedup=True).tolist()
    assert out.logp_base == pytest.approx(expected, abs=1e-4)


def test_token_cd_with_a_generator_draws_as_the_seeded_global_rng_and_leaves_it_alone(
    base, scorer, tok, prompt_ids
):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(11)
    want = token_cd(base, [scorer], prompt_ids, eos, pad, 0.5, 5, 4)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    got = token_cd(
        base, [scorer], prompt_ids, eos, pad, 0.5, 5, 4, generator=torch.Generator().manual_seed(11)
    )
    assert torch.equal(torch.get_rng_state(), before)  # the caller's global RNG is untouched
    assert got.seqs == want.seqs and got.logp_policy == want.logp_policy


def test_large_beta_kl_vanishes(base, scorer, tok, prompt_ids):
    torch.manual_seed(0)
    out = token_cd(base, [scorer], prompt_ids, tok.eos_token_id, tok.pad_token_id, 1e7, len(tok), 4)
    assert max(abs(k) for k in out.kl) < 1e-5


def test_small_beta_increases_the_value(base, scorer, tok, prompt_ids):
    rows = prompt_ids * 4
    torch.manual_seed(0)
    plain = block_cd(base, [], rows, tok.eos_token_id, tok.pad_token_id, K=1, M=6, max_new_tokens=6)
    torch.manual_seed(0)
    tilted = token_cd(base, [scorer], rows, tok.eos_token_id, tok.pad_token_id, 0.05, 16, 6)
    v_plain = scorer.final_values(plain.seqs, tok.pad_token_id)
    v_tilted = scorer.final_values(tilted.seqs, tok.pad_token_id)
    se = math.sqrt((v_plain.var() + v_tilted.var()).item() / len(rows))
    assert (v_tilted.mean() - v_plain.mean()).item() > 3 * se
    assert min(tilted.kl) > 0


def _recompute(base, scorers, lam, seq, beta, k):
    """Per-step exact KLs of a decoded sequence from scratch: full forwards, no cache, no padding."""
    kls, kls_topk, logq_sum, cand = [], [], 0.0, []
    prompt = list(seq.input_ids[: seq.prompt_len])
    response = list(seq.input_ids[seq.prompt_len :])
    with torch.no_grad():
        for t, z in enumerate(response):
            prefix = prompt + response[:t]
            logits = base(input_ids=torch.tensor([prefix])).logits[0, -1]
            logp, ids = torch.log_softmax(logits.double(), -1).topk(k)
            children = [Encoded((*prefix, int(c)), len(prompt)) for c in ids]
            values = [s.final_values(children, 0).double() for s in scorers]
            v = values[0] + lam * values[1]
            step = tilted_step(logp, v, beta)
            kls.append(step.kl.item())
            kls_topk.append(step.kl_topk.item())
            logq_sum += step.logq[ids.tolist().index(z)].item()
            cand.append(sorted(ids.tolist()))
    return sum(kls), sum(kls_topk), logq_sum, cand


def test_token_kl_is_the_sum_of_exact_per_token_kls(base, scorer, safety, tok, prompt_ids):
    beta, k, lam, steps = 0.5, 5, 0.5, 6
    pad = tok.pad_token_id
    args = (beta, k, steps, lam, "safety")
    torch.manual_seed(3)
    first = token_cd(base, [scorer, safety], prompt_ids, tok.eos_token_id, pad, *args, trace=True)
    stop = first.seqs[0].input_ids[first.seqs[0].prompt_len + 1]  # a token row 0 draws at step 1 ...
    torch.manual_seed(3)  # ... made the stop token: same draws up to there, then that row ends early
    out = token_cd(base, [scorer, safety], prompt_ids, stop, pad, *args, trace=True)
    lengths = [s.response_len for s in out.seqs]
    assert min(lengths) < steps and out.seqs[0].input_ids[-1] == stop
    for i, seq in enumerate(out.seqs):
        kl, kl_topk, logq, cand = _recompute(base, [scorer, safety], lam, seq, beta, k)
        assert cand == [sorted(s["ids"].tolist()) for s in out.traces[i]]
        assert out.kl[i] == pytest.approx(kl, abs=1e-4)
        assert out.kl[i] == pytest.approx(sum(s["kl"] for s in out.traces[i]), abs=1e-9)
        assert out.kl_topk[i] == pytest.approx(kl_topk, abs=1e-4)
        assert out.logp_policy[i] == pytest.approx(logq, abs=1e-4)


def test_block_k1_full_length_is_base_sampling(base, tok, prompt_ids):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(5)
    expected = sample(base, prompt_ids, eos, pad, n=1, max_new_tokens=6, batch_size=len(prompt_ids))
    torch.manual_seed(5)
    out = block_cd(base, [], prompt_ids, eos, pad, K=1, M=50, max_new_tokens=6, batch_size=len(prompt_ids))
    assert out.seqs == expected
    assert out.kl_bound == [0.0] * len(prompt_ids) and out.cost.scorer_forward_tokens == 0


def test_block_k1_short_blocks_is_base_sampling(base, tok, prompt_ids):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    for seed, prompt in enumerate(prompt_ids):  # one row at a time: the same random draws in both
        torch.manual_seed(seed)
        expected = sample(base, [prompt], eos, pad, n=1, max_new_tokens=7)
        torch.manual_seed(seed)
        out = block_cd(base, [], [prompt], eos, pad, K=1, M=2, max_new_tokens=7)
        assert out.seqs == expected
        assert out.n_blocks == [4]  # 2 + 2 + 2 + 1 tokens


def test_full_length_block_is_best_of_k(base, scorer, tok, prompt_ids):
    eos, pad, k = tok.eos_token_id, tok.pad_token_id, 4
    torch.manual_seed(7)
    cands = sample(base, prompt_ids, eos, pad, n=k, max_new_tokens=6, batch_size=len(prompt_ids))
    best = scorer.final_values(cands, pad).view(len(prompt_ids), k).argmax(-1).tolist()
    expected = [cands[i * k + j] for i, j in enumerate(best)]
    torch.manual_seed(7)
    out = block_cd(
        base, [scorer], prompt_ids, eos, pad, K=k, M=6, max_new_tokens=6, batch_size=len(prompt_ids)
    )
    assert out.seqs == expected
    assert out.n_blocks == [1] * len(prompt_ids)
    assert out.kl_bound == pytest.approx([math.log(k) - (k - 1) / k] * len(prompt_ids))


def test_blockwise_increases_the_value_and_bounds_kl(base, scorer, tok, prompt_ids):
    rows = prompt_ids * 3
    eos, pad = tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    plain = block_cd(base, [], rows, eos, pad, K=1, M=9, max_new_tokens=9)
    torch.manual_seed(0)
    out = block_cd(base, [scorer], rows, eos, pad, K=4, M=3, max_new_tokens=9)
    assert scorer.final_values(out.seqs, pad).mean() > scorer.final_values(plain.seqs, pad).mean()
    for n_blocks, bound in zip(out.n_blocks, out.kl_bound, strict=True):
        assert bound == pytest.approx(n_blocks * (math.log(4) - 0.75))
    assert out.cost.base_sampled_tokens >= 4 * out.cost.generated_tokens - 4 * len(rows)


class _RecordingScorer:
    """Duck-typed prefix scorer for block_cd: V = a fixed pseudo-random function of the whole sequence (the
    hash of its token ids); records every call's candidates and values."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Encoded], torch.Tensor]] = []

    def final_values(self, seqs, pad_id, batch_size=32):
        values = torch.tensor([float(hash(s.input_ids) % 997) for s in seqs])  # (N,)
        self.calls.append((list(seqs), values))
        return values


def test_blockwise_appends_each_rows_best_block(base, tok, prompt_ids):
    """Audit of the selection: prompts of different lengths (left-padded in `sample`), several blocks, rows
    ending at different rounds. In every round each live row's K candidates extend exactly its own current
    prefix (candidates cut at EOS are complete responses, scored as such), and the row continues with the
    candidate of the highest value — which is where the final sequence must come from."""
    k, eos, pad = 4, tok.eos_token_id, tok.pad_token_id
    rec = _RecordingScorer()
    torch.manual_seed(3)
    out = block_cd(base, [rec], prompt_ids, eos, pad, K=k, M=2, max_new_tokens=7, batch_size=3)
    for i, seq in enumerate(out.seqs):
        current, rounds = tuple(prompt_ids[i]), 0
        for cands, values in rec.calls:
            groups = [(cands[j : j + k], values[j : j + k]) for j in range(0, len(cands), k)]
            mine = [g for g in groups if g[0][0].input_ids[: g[0][0].prompt_len] == current]
            if not mine:
                continue
            assert len(mine) == 1
            group, vals = mine[0]
            assert all(c.input_ids[: c.prompt_len] == current for c in group)  # K continuations of this row
            for c in group:  # a block stops at its first EOS (nothing after it)
                block = c.input_ids[c.prompt_len :]
                assert eos not in block[:-1] and 1 <= len(block) <= 2
            current, rounds = group[int(vals.argmax())].input_ids, rounds + 1
        assert seq.input_ids == current and out.n_blocks[i] == rounds
        assert seq.response_len <= 7 and (seq.response_len == 7 or seq.input_ids[-1] == eos)


# ------------------------------------------------------------------------------------------------------ run_cd
@pytest.fixture(scope="module")
def saved(tmp_path_factory, scorer, safety, tok):
    root = tmp_path_factory.mktemp("cd")
    (root / "prompts.json").write_text(json.dumps({"test": PROMPTS[:3], "train": PROMPTS}))
    return root, scorer.save(root / "reward", tok), safety.save(root / "safety", tok)


def _cd_cfg(tiny_model, saved, **kw) -> CDConfig:
    root, reward_dir, _ = saved
    fields = {
        "model": str(tiny_model),
        "scorer": str(reward_dir),
        "prompts": str(root / "prompts.json"),
        "output_dir": str(root / "out"),
        "n_samples": 2,
        "max_new_tokens": 5,
        "oracle": "toyworld",
        "device": "cpu",
    }
    fields.update(kw)
    return from_dict(CDConfig, fields)


def test_run_cd_token_rows_summary_and_cost(tiny_model, saved, tok):
    root, _, safety_dir = saved
    cfg = _cd_cfg(tiny_model, saved, top_k=6, beta=0.5, safety_scorer=str(safety_dir), lam=0.3)
    summary = run_cd(cfg, show_progress=False)
    rows = read_samples(root / "out" / "samples.jsonl")
    assert len(rows) == 3 * 2 and [r.sample for r in rows[:2]] == [0, 1]
    assert rows[2].prompt == PROMPTS[1] and rows[2].prompt_index == 1
    raw = [json.loads(line) for line in (root / "out" / "samples.jsonl").read_text().splitlines()]
    for r in raw:
        assert r["value"] == pytest.approx(r["value_reward"] + 0.3 * r["value_safety"], abs=1e-5)
        assert r["kl"] >= r["kl_topk"] >= -1e-9 and r["kl_bound"] is None
        assert isinstance(r["gold_reward"], float) and isinstance(r["gold_safe"], bool)
    assert (root / "out" / "summary.json").is_file() and (root / "out" / "config.yaml").is_file()
    assert not (root / "out.tmp").exists()
    assert summary["kl"]["mean"] == pytest.approx(sum(r["kl"] for r in raw) / len(raw))
    assert summary["gold_reward"]["mean"] == pytest.approx(sum(r["gold_reward"] for r in raw) / len(raw))
    # cost: prompts prefilled by the base and both scorers, k children per generated token per scorer
    cost = summary["cost"]
    prompt_tokens = sum(len(encode_prompt(tok, r.prompt, 128)) for r in rows)
    generated = sum(r.response_tokens for r in rows)
    assert cost["generated_tokens"] == generated == cost["base_sampled_tokens"]
    assert cost["scorer_forward_tokens"] == 2 * (prompt_tokens + 6 * generated)
    assert cost["base_forward_tokens"] == prompt_tokens + generated - len(rows)
    assert cost["plain_sampling_tokens"] == cost["base_forward_tokens"]
    assert cost["per_generated_token"]["scorer_forward"] == pytest.approx(
        cost["scorer_forward_tokens"] / generated
    )


def test_run_cd_block(tiny_model, saved):
    root = saved[0]
    summary = run_cd(_cd_cfg(tiny_model, saved, mode="block", K=2, M=2), show_progress=False)
    rows = read_samples(root / "out" / "samples.jsonl")
    assert len(rows) == 6 and all(r.logp_policy is None and r.logp_ref is not None for r in rows)
    assert summary["kl"]["kind"].startswith("ε-estimate per block")
    assert summary["cost"]["per_generated_token"]["base_sampled"] == pytest.approx(2.0, abs=0.5)
    raw = [json.loads(line) for line in (root / "out" / "samples.jsonl").read_text().splitlines()]
    for r in raw:  # blocks are consecutive runs of M = 2 tokens (the estimate's convention), estimate ≤ bound
        assert r["n_blocks"] == math.ceil(r["response_tokens"] / 2)
        assert 0.0 <= r["kl"] <= r["kl_bound"] + 1e-9
    assert summary["kl"]["mean"] == pytest.approx(sum(r["kl"] for r in raw) / len(raw))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"K": 0}, "K must"),
        ({"M": 0}, "M must"),
        ({"top_k": 0}, "top_k"),
        ({"lam": 1.0}, "safety_scorer"),
        ({"lam": -1.0}, "lam"),
        ({"mode": "beam"}, "unknown mode"),
        ({"oracle": "nope"}, "unknown oracle"),
        ({"combine": "max"}, "unknown combine"),
        ({"n_samples": 0}, "n_samples"),
    ],
)
def test_config_errors_before_loading(tmp_path, override, message):
    fields = {
        "model": str(tmp_path / "nope"),
        "scorer": "s",
        "prompts": "p.json",
        "output_dir": str(tmp_path),
    }
    with pytest.raises(ConfigError, match=message):
        from_dict(CDConfig, {**fields, **override})


def test_run_cd_refuses_a_plain_model_as_scorer(tiny_model, saved):
    with pytest.raises(ModelLoadError, match="not a prefix scorer"):
        run_cd(_cd_cfg(tiny_model, saved, scorer=str(tiny_model)), show_progress=False)


def test_run_cd_results_json_against_its_baseline_samples(tiny_model, saved):
    """results.json: the CD row's gold win rate is sample s vs base sample s of the same prompt (baseline.jsonl),
    its KL the exact per-token sum; the base row is at ½ with KL 0; no oracle → no results.json."""
    from sacpo.evaluate.metrics import win_rate
    from sacpo.evaluate.run import load_results

    root = saved[0]
    out = root / "out-res"
    summary = run_cd(_cd_cfg(tiny_model, saved, output_dir=str(out), beta=0.5), show_progress=False)
    base, cd = load_results(out)
    assert (base.family, base.helpful_win[0], base.kl) == ("sft", 0.5, 0.0)
    assert (cd.family, cd.param, cd.name) == ("cd-token", 0.5, "cd-token β=0.5 k=10")
    raw = [json.loads(line) for line in (out / "samples.jsonl").read_text().split("\n") if line]
    ref = [json.loads(line) for line in (out / "baseline.jsonl").read_text().split("\n") if line]
    assert [(r["prompt_index"], r["sample"]) for r in ref] == [(r["prompt_index"], r["sample"]) for r in raw]
    grid = lambda rows, k: [[r[k] for r in rows[i : i + 2]] for i in range(0, len(rows), 2)]  # noqa: E731
    want = win_rate(grid(raw, "gold_reward"), grid(ref, "gold_reward"), n_boot=1000, seed=0)
    assert cd.helpful_win == pytest.approx(want)
    assert cd.kl == pytest.approx(summary["kl"]["mean"]) and cd.n == 6 and cd.n_prompts == 3
    assert summary["baseline"]["gold_win_rate"] == pytest.approx(want[0])
    run_cd(_cd_cfg(tiny_model, saved, output_dir=str(root / "out-no"), oracle=None), show_progress=False)
    assert not (root / "out-no" / "results.json").exists()


def test_blockwise_kl_estimate_by_hand():
    # blocks of M = 2 over 5 tokens: [ln .5, ln .5] → ε = .25; [ln .8, 0] → ε = .8; [ln .5] → ε = .5
    t = torch.tensor([math.log(0.5), math.log(0.5), math.log(0.8), 0.0, math.log(0.5)])

    # KL̂(ε, 2) = (1−ε)²·(log 2 + log(1−ε) − ½) + (1 − (1−ε)²)·log((1 − (1−ε)²)/ε)
    def hand(e):
        keep = (1 - e) ** 2
        return keep * (math.log(2) + math.log(1 - e) - 0.5) + (1 - keep) * math.log((1 - keep) / e)

    assert blockwise_kl_estimate(t, 2, 2) == pytest.approx(hand(0.25) + hand(0.8) + hand(0.5))
    assert blockwise_kl_estimate(t, 2, 2) <= blockwise_kl_bound(2, 3)
    assert blockwise_kl_estimate(t, 2, 1) == 0.0  # K = 1: plain sampling
    assert blockwise_kl_estimate(torch.full((4,), -30.0), 4, 8) == pytest.approx(blockwise_kl_bound(8, 1))
    assert blockwise_kl_estimate(torch.zeros(0), 2, 4) == 0.0
    with pytest.raises(ValueError, match="M and K"):
        blockwise_kl_estimate(t, 0, 2)


def test_batched_response_token_logps_sum_to_sequence_logps(base, tok, prompt_ids):
    seqs = sample(base, prompt_ids, tok.eos_token_id, tok.pad_token_id, n=3, max_new_tokens=6)
    per_token = batched_response_token_logps(base, seqs + seqs[:2], tok.pad_token_id, batch_size=4)
    sums = batched_sequence_logps(base, seqs + seqs[:2], tok.pad_token_id)
    assert [len(t) for t in per_token] == [s.response_len for s in seqs + seqs[:2]]
    assert torch.stack([t.sum() for t in per_token]) == pytest.approx(sums, abs=1e-5)
