"""One client for OpenAI-compatible servers (OpenAI, vLLM, `transformers serve`, llama.cpp, Ollama): bounded
concurrency, bounded retries with exponential backoff, clear errors, summed token usage.

    api = ApiClient(ApiConfig(base_url="http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-7B-Instruct"))
    texts = api.run([api.chat([{"role": "user", "content": "hi"}], max_tokens=8) for _ in range(4)])
    api.usage.as_dict()    # requests, retries, prompt/completion tokens, failures by kind

Requests go through the `openai` package's async client with its own retries off: this module retries 429 (rate
limit), 5xx, timeouts and dropped connections up to `max_retries` times, waiting
min(max_backoff, backoff·2^k)·(1 + U[0, ¼)) before retry k (k = 0, 1, …) — or the server's `Retry-After` when it
sends one (capped at max_backoff). Authentication failures (401/403), an unknown model (404) and rejected requests
(400/422) are not retried: they raise `ApiError` at once with the server's message (an unknown model also lists
the models the server reports). A request that still fails after its retries raises `ApiError` as well; `run`
lets the requests already in flight finish first, so every completed answer reaches its callback (the judge's
cache) before the error propagates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlparse

from sacpo.config import PositiveFloat, PositiveInt, config_dataclass, help_field

T = TypeVar("T")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
NO_KEY = "EMPTY"  # what local servers (vLLM, transformers serve) accept when they check no key


class ApiError(RuntimeError):
    """A request that cannot succeed (auth, unknown model, rejected) or that failed after every retry."""


class _Skipped(Exception):
    """A queued request not sent because another one of the batch failed."""


@config_dataclass
class ApiConfig:
    base_url: str = help_field(
        help="the server's OpenAI-compatible root, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1"
    )
    model: str = help_field(help="the model name the server knows (its /v1/models id)")
    api_key_env: str = help_field(
        "OPENAI_API_KEY",
        help="environment variable holding the API key; for a server on localhost an unset variable sends "
        f"{NO_KEY!r}",
    )
    concurrency: PositiveInt = help_field(8, help="requests in flight at once")
    max_retries: int = help_field(
        5, help="retries of a request on 429 / 5xx / timeout / dropped connection", ge=0
    )
    timeout: PositiveFloat = help_field(
        120.0, help="seconds before one request times out (then it is retried)"
    )
    backoff: float = help_field(1.0, help="first retry delay in seconds (doubling per retry)", ge=0)
    max_backoff: float = help_field(30.0, help="longest retry delay in seconds", ge=0)

    def __post_init__(self) -> None:
        if urlparse(self.base_url).scheme not in ("http", "https"):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")

    def identity(self) -> dict[str, str]:
        """What the answers depend on (for cache keys): the server root and the model name."""
        return {"base_url": self.base_url.rstrip("/"), "model": self.model}


@dataclasses.dataclass
class ApiUsage:
    """Counters of one client: requests sent (retries included), retries, tokens the server reported."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: Counter[str] = dataclasses.field(default_factory=Counter)  # error kind → count (retried or not)

    def add_tokens(self, usage: Any) -> None:
        if usage is not None:
            self.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
            self.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "failures": dict(sorted(self.failures.items())),
        }


def api_key(cfg: ApiConfig) -> str:
    """The key from $api_key_env; NO_KEY for a local server when unset; ApiError for a remote one."""
    key = os.environ.get(cfg.api_key_env)
    if key:
        return key
    if urlparse(cfg.base_url).hostname in LOCAL_HOSTS:
        return NO_KEY
    raise ApiError(
        f"{cfg.base_url}: the API key variable ${cfg.api_key_env} is not set (export it, or name another "
        "variable with api_key_env)"
    )


def retry_delay(cfg: ApiConfig, attempt: int, retry_after: float | None, rng: random.Random) -> float:
    """Seconds to wait before retry `attempt` (0-based): the server's Retry-After when given, else
    backoff·2^attempt with up to 25% jitter; never more than max_backoff."""
    if retry_after is not None and retry_after >= 0:
        return min(cfg.max_backoff, retry_after)
    return min(cfg.max_backoff, cfg.backoff * 2**attempt) * (1 + 0.25 * rng.random())


def _retry_after(err: Any) -> float | None:
    response = getattr(err, "response", None)
    value = None if response is None else response.headers.get("retry-after")
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


class ApiClient:
    """Async requests to one model of one server; `run` drives a batch of them from synchronous code."""

    def __init__(self, cfg: ApiConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.usage = ApiUsage()
        self._key = api_key(cfg)
        self._rng = random.Random(seed)
        self._sem: asyncio.Semaphore | None = None
        self._client: Any = None
        self._stop = False  # set when a request of the running batch failed: queued ones are not sent

    def _open(self) -> Any:
        if self._client is None:
            import openai

            self._client = openai.AsyncOpenAI(
                api_key=self._key, base_url=self.cfg.base_url, timeout=self.cfg.timeout, max_retries=0
            )
            self._sem = asyncio.Semaphore(self.cfg.concurrency)
        return self._client

    async def chat(self, messages: Sequence[dict[str, str]], **params: Any) -> Any:
        """The chat completion of one conversation (`response.choices[0].message.content` is the text)."""
        return await self._request(
            lambda c: c.chat.completions.create(model=self.cfg.model, messages=list(messages), **params)
        )

    async def complete(self, prompt: str, **params: Any) -> Any:
        """A legacy text completion of a raw prompt (`response.choices[i].text`)."""
        return await self._request(
            lambda c: c.completions.create(model=self.cfg.model, prompt=prompt, **params)
        )

    async def _request(self, call: Callable[[Any], Awaitable[Any]]) -> Any:
        client = self._open()
        assert self._sem is not None
        async with self._sem:
            if self._stop:
                raise _Skipped
            try:
                return await self._attempts(call, client)
            except ApiError:
                self._stop = True  # before the slot is released: no queued request starts after a failure
                raise

    async def _attempts(self, call: Callable[[Any], Awaitable[Any]], client: Any) -> Any:
        """One request with its retries (the module docstring's rules)."""
        import openai

        for attempt in range(self.cfg.max_retries + 1):
            self.usage.requests += 1
            try:
                response = await call(client)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                self.usage.failures["auth"] += 1
                raise ApiError(
                    f"{self.cfg.base_url}: authentication failed ({e.status_code}): {_message(e)}; check "
                    f"${self.cfg.api_key_env}"
                ) from None
            except openai.NotFoundError as e:
                self.usage.failures["not_found"] += 1
                raise ApiError(await self._not_found(e)) from None
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                self.usage.failures["rejected"] += 1
                raise ApiError(
                    f"{self.cfg.base_url}: request rejected ({e.status_code}) for model {self.cfg.model!r}: "
                    f"{_message(e)}"
                ) from None
            except (openai.RateLimitError, openai.InternalServerError, openai.APIStatusError) as e:
                kind = "rate_limit" if e.status_code == 429 else f"http_{e.status_code}"
                if e.status_code < 500 and e.status_code != 429:
                    self.usage.failures[kind] += 1
                    raise ApiError(f"{self.cfg.base_url}: HTTP {e.status_code}: {_message(e)}") from None
                await self._backoff(kind, attempt, _retry_after(e), e)
            except openai.APITimeoutError as e:
                await self._backoff("timeout", attempt, None, e)
            except openai.APIConnectionError as e:
                await self._backoff("connection", attempt, None, e)
            else:
                self.usage.add_tokens(getattr(response, "usage", None))
                return response
        raise AssertionError("unreachable")

    async def _backoff(self, kind: str, attempt: int, retry_after: float | None, err: Exception) -> None:
        self.usage.failures[kind] += 1
        if attempt >= self.cfg.max_retries:
            raise ApiError(
                f"{self.cfg.base_url}: {kind} after {attempt + 1} attempt(s) (max_retries={self.cfg.max_retries}): "
                f"{_message(err)}"
            ) from None
        self.usage.retries += 1
        await asyncio.sleep(retry_delay(self.cfg, attempt, retry_after, self._rng))

    async def _not_found(self, err: Exception) -> str:
        text = f"{self.cfg.base_url}: model {self.cfg.model!r} not found (404): {_message(err)}"
        try:
            listed = [m.id async for m in self._open().models.list()]
        except Exception:  # the listing is a courtesy; the 404 is the error
            return text
        return text + f"; the server lists: {', '.join(listed) or '(none)'}"

    def run(
        self,
        jobs: Sequence[Callable[[], Awaitable[T]]],
        on_done: Callable[[int, T], None] | None = None,
        desc: str = "requests",
        show_progress: bool = True,
    ) -> list[T]:
        """Run the jobs concurrently (at most `concurrency` requests in flight) and return their results in order.

        on_done(i, result) runs as each finishes (e.g. to write a cache entry). When a job fails, the requests in
        flight run to completion (their results still reach on_done), queued ones are not sent, and the first
        error is raised afterwards."""
        coro = self._run(jobs, on_done, desc, show_progress)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case: no event loop in this thread
            return asyncio.run(coro)
        # called from inside a running loop (a notebook, an async app): run the batch on a thread of its own
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, coro).result()

    async def _run(
        self,
        jobs: Sequence[Callable[[], Awaitable[T]]],
        on_done: Callable[[int, T], None] | None,
        desc: str,
        show_progress: bool,
    ) -> list[T]:
        from tqdm.auto import tqdm

        self._client = None  # a client is bound to the event loop that made it
        self._stop = False
        results: list[Any] = [None] * len(jobs)
        errors: list[BaseException] = []
        bar = tqdm(total=len(jobs), desc=desc, disable=not show_progress or not jobs)

        async def one(i: int) -> None:
            try:
                results[i] = await jobs[i]()
                if on_done is not None:
                    on_done(i, results[i])
            except _Skipped:
                return
            except Exception as e:
                errors.append(e)
                self._stop = True
            bar.update(1)

        try:
            await asyncio.gather(*(one(i) for i in range(len(jobs))))
        finally:
            bar.close()
            if self._client is not None:
                await self._client.close()
                self._client = None
        if errors:
            raise errors[0]
        return results


def _message(err: Exception) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        msg = inner.get("message") if isinstance(inner, dict) else inner
        if msg:
            return str(msg)[:500]
    return str(err)[:500]
