"""The LLM judge and its API client against a fault-injecting local server: retries are bounded, nothing is
lost, counts are right, the cache resumes a crashed run, and position swap gives hand-computed outcomes."""

import math
import random

import pytest
from fake_openai import FakeOpenAI, Reply, shown_first

from sacpo.config import ConfigError
from sacpo.scoring.api_client import ApiClient, ApiConfig, ApiError, api_key, retry_delay
from sacpo.scoring.judge_prompt import load_template, parse_verdict
from sacpo.scoring.llm_judge import LLMJudge


def api(server, **kw):
    kw = {"backoff": 0.0, "max_backoff": 0.0, "timeout": 5.0, "concurrency": 4, **kw}
    return ApiConfig(base_url=server.url, model="judge", **kw)


def chat_text(cfg, n=1):
    client = ApiClient(cfg)
    jobs = [lambda: client.chat([{"role": "user", "content": "hi"}], max_tokens=4) for _ in range(n)]
    out = client.run(jobs, show_progress=False)
    return [r.choices[0].message.content for r in out], client.usage


# ------------------------------------------------------------------------------------------------ verdicts
@pytest.mark.parametrize(
    "text, verdict",
    [
        ("Response A is clearer.\n[[A]]", "A"),
        ("[[B]]", "B"),
        ("equal quality [[C]]", "tie"),
        ("[[A]] ... so my final verdict: [[A]]", "A"),
        ("[[A]] or maybe [[B]]", None),  # contradictory
        ("A", "A"),
        ("**b**.", "B"),
        ("tie", "tie"),
        ("I think A is better", None),  # no tag, not a bare letter: never guessed
        ("", None),
        (None, None),
        ("[[D]]", None),
    ],
)
def test_parse_verdict_is_strict(text, verdict):
    assert parse_verdict(text) == verdict


def test_templates_builtin_and_user(tmp_path):
    t = load_template("helpfulness")
    msgs = t.messages("Q?", "resp {response_b} one", "two")
    assert msgs[0]["role"] == "system" and "HELPFULNESS" in msgs[0]["content"]
    user = msgs[1]["content"]
    assert "Q?" in user and "resp {response_b} one" in user and user.index("one") < user.index("two")
    assert load_template("harmlessness").digest != t.digest
    own = tmp_path / "mine.yaml"
    own.write_text("user: 'Q: {prompt} A: {response_a} B: {response_b}'\n")
    assert load_template(str(own)).messages("q", "a", "b") == [{"role": "user", "content": "Q: q A: a B: b"}]
    own.write_text("user: 'only {prompt}'\n")
    with pytest.raises(ConfigError, match="missing placeholder"):
        load_template(str(own))
    with pytest.raises(ConfigError, match="neither a builtin"):
        load_template("honesty")


# ------------------------------------------------------------------------------------------------ client faults
def test_retries_429_5xx_and_timeouts_then_succeeds():
    faults = {1: Reply(status=429, headers={"retry-after": "0"}), 2: Reply(status=500), 3: Reply(status=503),
              4: Reply(delay=1.5)}  # fmt: skip
    with FakeOpenAI(lambda n, body: faults.get(n, Reply(text="ok"))) as server:
        texts, usage = chat_text(api(server, timeout=0.5, concurrency=1))
    assert texts == ["ok"]
    assert usage.requests == 5 and usage.retries == 4
    assert usage.failures == {"rate_limit": 1, "http_500": 1, "http_503": 1, "timeout": 1}
    assert (
        usage.prompt_tokens == 10 and usage.completion_tokens == 2
    )  # only the answered request reports tokens


def test_retries_are_bounded():
    with FakeOpenAI(lambda n, body: Reply(status=500)) as server:
        with pytest.raises(ApiError, match=r"http_500 after 3 attempt\(s\) \(max_retries=2\)"):
            chat_text(api(server, max_retries=2, concurrency=1))
        assert server.n_requests == 3


def test_auth_failure_is_immediate_and_stops_the_batch():
    with FakeOpenAI(lambda n, body: Reply(status=401, error="bad key")) as server:
        with pytest.raises(ApiError, match=r"authentication failed.*bad key"):
            chat_text(api(server, concurrency=1), n=20)
        assert server.n_requests == 1  # no retry, and the 19 queued requests were never sent


def test_unknown_model_lists_the_servers_models():
    with FakeOpenAI(lambda n, body: Reply(), models=("judge", "other")) as server:
        with pytest.raises(ApiError, match=r"model 'gpt-9' not found.*lists: judge, other"):
            chat_text(ApiConfig(base_url=server.url, model="gpt-9"))


def test_api_key_rules(monkeypatch):
    monkeypatch.delenv("SACPO_TEST_KEY", raising=False)
    local = ApiConfig(base_url="http://127.0.0.1:1/v1", model="m", api_key_env="SACPO_TEST_KEY")
    assert api_key(local) == "EMPTY"
    with pytest.raises(ApiError, match=r"\$SACPO_TEST_KEY is not set"):
        api_key(ApiConfig(base_url="https://api.openai.com/v1", model="m", api_key_env="SACPO_TEST_KEY"))
    monkeypatch.setenv("SACPO_TEST_KEY", "sk-1")
    assert api_key(local) == "sk-1"
    with pytest.raises(ValueError, match="base_url"):
        ApiConfig(base_url="127.0.0.1:8000", model="m")


def test_retry_delay_doubles_with_jitter_and_honours_retry_after():
    cfg = ApiConfig(base_url="http://127.0.0.1:1/v1", model="m", backoff=1.0, max_backoff=10.0)
    rng = random.Random(0)
    delays = [retry_delay(cfg, k, None, rng) for k in range(5)]
    for k, d in enumerate(delays):
        assert min(10.0, 2**k) <= d <= min(10.0, 2**k) * 1.25
    assert retry_delay(cfg, 0, 3.0, rng) == 3.0 and retry_delay(cfg, 0, 99.0, rng) == 10.0


# ------------------------------------------------------------------------------------------------ the judge
PROMPTS = ["p0", "p1", "p2", "p3"]
MODEL = ["good answer 0", "bad answer 1", "good answer 2", "same"]
SFT = ["bad answer 0", "good answer 1", "bad answer 2", "same"]


def prefers_good(n, body):
    """A content judge: picks whichever shown response contains 'good' (tie when neither)."""
    first = shown_first(body)
    text = body["messages"][-1]["content"]
    second = text.split("[Response B]\n", 1)[1].split("\n[End of response B]", 1)[0]
    if ("good" in first) == ("good" in second):
        return Reply(text="Equal. [[C]]")
    return Reply(text="[[A]]" if "good" in first else "Reasoning... [[B]]")


def test_position_swap_outcomes_by_hand(tmp_path):
    with FakeOpenAI(prefers_good) as server:
        judge = LLMJudge(api(server), cache_dir=tmp_path / "c")
        pairs = judge.compare(PROMPTS, MODEL, SFT, show_progress=False)
    assert [p.outcome for p in pairs] == [1.0, 0.0, 1.0, 0.5]
    assert all(p.result.consistent for p in pairs)
    # identical responses ask the same question twice: one request serves both orders
    assert server.n_requests == 7 and judge.stats.asked == 8 and judge.stats.cached == 1


def test_always_a_judge_is_position_inconsistent(tmp_path):
    with FakeOpenAI(lambda n, body: Reply(text="[[A]]")) as server:
        judge = LLMJudge(api(server), cache_dir=tmp_path / "c")
        pairs = judge.compare(PROMPTS, MODEL, SFT, show_progress=False)
    assert [p.outcome for p in pairs] == [0.5] * 4  # disagreement between the orders is a tie
    assert not any(p.result.consistent for p in pairs)


def test_malformed_verdicts_are_retried_then_invalid(tmp_path):
    def script(n, body):
        if "p0" in body["messages"][-1]["content"]:
            return Reply(text="I cannot decide")  # always malformed
        if body.get("temperature") == 0.0 and "p1" in body["messages"][-1]["content"]:
            return Reply(text="[[A]] [[B]]")  # contradictory at first, fine when re-asked
        return Reply(text="[[A]]" if "good" in shown_first(body) else "[[B]]")

    with FakeOpenAI(script) as server:
        judge = LLMJudge(api(server), cache_dir=tmp_path / "c", verdict_retries=2)
        pairs = judge.compare(PROMPTS[:3], MODEL[:3], SFT[:3], show_progress=False)
    assert math.isnan(pairs[0].outcome) and not pairs[0].result.valid
    assert (pairs[0].ab, pairs[0].ba) == (None, None)
    assert pairs[1].outcome == 0.0 and pairs[2].outcome == 1.0
    # p0: 2 orders × 3 attempts, p1: 2 orders × 2 attempts, p2: 2 orders × 1
    assert server.n_requests == 6 + 4 + 2
    assert judge.stats.malformed == 6 + 2 and judge.stats.invalid == 2
    retried = [b for b in server.bodies if "p1" in b["messages"][-1]["content"] and b["temperature"] != 0.0]
    assert len(retried) == 2 and all(b["temperature"] == 0.7 for b in retried)


def test_cache_resumes_a_crashed_run_without_repeating_a_request(tmp_path):
    cache = tmp_path / "c"
    down_after = 5

    def flaky(n, body):  # the server dies for good after 5 answers
        return prefers_good(n, body) if n <= down_after else Reply(status=500)

    prompts = [f"q{i}" for i in range(6)]
    model = [f"good {i}" for i in range(6)]
    sft = [f"bad {i}" for i in range(6)]
    with FakeOpenAI(flaky) as server:
        judge = LLMJudge(api(server, max_retries=1, concurrency=1), cache_dir=cache)
        with pytest.raises(ApiError, match="http_500"):
            judge.compare(prompts, model, sft, show_progress=False)
        assert len(judge.cache) == down_after
        port = server.port  # the cache key names the server: the rerun reaches the same address
    with FakeOpenAI(prefers_good, port=port) as server:
        judge = LLMJudge(api(server), cache_dir=cache)
        pairs = judge.compare(prompts, model, sft, show_progress=False)
        assert server.n_requests == 12 - down_after  # only the missing answers
    assert [p.outcome for p in pairs] == [1.0] * 6
    with FakeOpenAI(prefers_good, port=port) as server:
        again = LLMJudge(api(server), cache_dir=cache)
        assert [p.outcome for p in again.compare(prompts, model, sft, show_progress=False)] == [1.0] * 6
        assert server.n_requests == 0 and again.stats.cached == 12
    # another template, temperature or model is another judge: nothing is reused
    with FakeOpenAI(prefers_good, port=port) as server:
        LLMJudge(api(server), criterion="harmlessness", cache_dir=cache).compare(
            prompts[:1], model[:1], sft[:1], show_progress=False
        )
        assert server.n_requests == 2


def test_run_works_inside_a_running_event_loop():
    """A notebook has an event loop running: `run` must not call asyncio.run on it."""
    import asyncio

    with FakeOpenAI(lambda n, body: Reply(text="ok")) as server:

        async def main():
            return chat_text(api(server))

        texts, usage = asyncio.run(main())
    assert texts == ["ok"] and usage.requests == 1
