"""A pairwise LLM judge over an OpenAI-compatible API, asked in both orders, every answer cached on disk.

    judge = LLMJudge(ApiConfig(base_url=..., model="gpt-4o"), criterion="harmlessness", cache_dir="runs/cache")
    pairs = judge.compare(prompts, model_responses, sft_responses)   # one PairJudgment per pair
    [p.outcome for p in pairs]                                       # the model's outcome: 1, ½, 0 or NaN

For each pair (x, m, s) the judge sees two conversations from the criterion's template (`judge_prompt`): order AB
shows m as response A and s as B; order BA shows s as A and m as B. Each answer's verdict is parsed strictly
(`parse_verdict`); a malformed answer is asked again (attempt 1, 2, … up to `verdict_retries`, sampled at
`retry_temperature` so that a deterministic judge can answer differently), then recorded as invalid. The pair's
outcome combines both orders (`sacpo.math.judges.pair_outcome`: disagreement is a tie, an invalid order makes the
pair invalid). Every answer — valid or not — is written to the cache as it arrives (`JudgmentCache`), keyed by the
judge's identity (server, model, template digest, temperature, max_tokens, seed), the prompt, the two responses
in the order shown and the attempt: a rerun, or a run resumed after a crash, sends no request twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sacpo.data.records import Prompt
from sacpo.math.judges import PairOutcome, pair_outcome
from sacpo.scoring.api_client import ApiClient, ApiConfig
from sacpo.scoring.judge_cache import JudgmentCache, judgment_key
from sacpo.scoring.judge_prompt import load_template, parse_verdict


@dataclass(frozen=True)
class PairJudgment:
    ab: str | None  # verdict with the first response shown as A (None: invalid after the retries)
    ba: str | None  # verdict with the first response shown as B ("B" = the first response is better)

    @property
    def result(self) -> PairOutcome:
        """The first response's outcome (1 win, ½ tie or disagreement, 0 loss, NaN invalid)."""
        return pair_outcome(self.ab, self.ba)

    @property
    def outcome(self) -> float:
        return self.result.outcome


@dataclass
class JudgeStats:
    asked: int = 0  # answers needed (pairs × 2 orders × attempts used), from the cache or the server
    cached: int = 0  # of which read from the cache
    malformed: int = 0  # answers without a parsable verdict (each is retried until verdict_retries)
    invalid: int = 0  # orders still without a verdict after every retry
    usage: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "answers": self.asked,
            "from_cache": self.cached,
            "requests_sent": self.usage.get("requests", 0),
            "malformed_answers": self.malformed,
            "invalid_orders": self.invalid,
            **{k: v for k, v in self.usage.items() if k != "requests"},
        }


class LLMJudge:
    """Pairwise judge; `compare` judges a batch of pairs in both orders (see the module docstring)."""

    def __init__(
        self,
        api: ApiConfig,
        criterion: str = "helpfulness",
        cache_dir: str | Path = "judge_cache",
        temperature: float = 0.0,
        max_tokens: int = 512,
        verdict_retries: int = 2,
        retry_temperature: float = 0.7,
        seed: int | None = None,
    ) -> None:
        if verdict_retries < 0 or max_tokens < 1 or temperature < 0 or retry_temperature < 0:
            raise ValueError("need verdict_retries ≥ 0, max_tokens ≥ 1 and temperatures ≥ 0")
        self.api = api
        self.template = load_template(criterion)
        self.criterion = criterion
        self.temperature, self.max_tokens = temperature, max_tokens
        self.verdict_retries, self.retry_temperature, self.seed = verdict_retries, retry_temperature, seed
        self.cache = JudgmentCache(cache_dir)
        self.client = ApiClient(api, seed=0 if seed is None else seed)
        self.stats = JudgeStats()
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def identity(self) -> dict[str, Any]:
        """Everything an answer depends on besides the texts (the cache key's judge part)."""
        return {
            **self.api.identity(),
            "template": self.template.digest,
            "temperature": self.temperature,
            "retry_temperature": self.retry_temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }

    async def _verdict(self, prompt: Prompt, first: str, second: str) -> str | None:
        identity = self.identity()
        for attempt in range(self.verdict_retries + 1):
            key = judgment_key(identity, prompt, first, second, attempt)
            self.stats.asked += 1
            record = self.cache.get(key)
            if record is None and key in self._pending:  # the same question is in flight: share its answer
                record = await self._pending[key]
                self.stats.cached += 1
            elif record is None:
                params: dict[str, Any] = {
                    "temperature": self.temperature if attempt == 0 else self.retry_temperature,
                    "max_tokens": self.max_tokens,
                }
                if self.seed is not None:
                    params["seed"] = self.seed + attempt
                task = asyncio.ensure_future(
                    self._ask(key, self.template.messages(prompt, first, second), params)
                )
                self._pending[key] = task
                try:
                    record = await task
                finally:
                    self._pending.pop(key, None)
            else:
                self.stats.cached += 1
            verdict = parse_verdict(record.get("text"))
            if verdict is not None:
                return verdict
            self.stats.malformed += 1
        self.stats.invalid += 1
        return None

    async def _ask(self, key: str, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
        response = await self.client.chat(messages, **params)
        choice = response.choices[0] if response.choices else None
        text = None if choice is None else choice.message.content
        record = {"text": text, "params": params, "finish_reason": getattr(choice, "finish_reason", None)}
        self.cache.put(key, record)  # at once: a crash after this line never asks again
        return record

    def compare(
        self,
        prompts: Sequence[Prompt],
        first: Sequence[str],
        second: Sequence[str],
        show_progress: bool = True,
        desc: str = "judge",
    ) -> list[PairJudgment]:
        """Judge every pair (prompts[i], first[i], second[i]) in both orders; outcomes are first[i]'s."""
        if not len(prompts) == len(first) == len(second):
            raise ValueError(f"{len(prompts)} prompts, {len(first)} and {len(second)} responses")
        jobs = []
        for x, a, b in zip(prompts, first, second, strict=True):
            jobs.append(lambda x=x, a=a, b=b: self._verdict(x, a, b))  # order AB: `first` shown as A
            jobs.append(lambda x=x, a=a, b=b: self._verdict(x, b, a))  # order BA: `first` shown as B
        try:
            verdicts = self.client.run(jobs, desc=desc, show_progress=show_progress)
        finally:
            self.stats.usage = self.client.usage.as_dict()
        return [PairJudgment(verdicts[2 * i], verdicts[2 * i + 1]) for i in range(len(prompts))]
