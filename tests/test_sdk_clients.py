"""`spendgate.wrap()` takes any client the SDKs take: the `openai` SDK runs on httpx2 but still accepts a
legacy `httpx.Client` / `httpx.AsyncClient` as `http_client`, and the guard sits on whichever one the
client holds — sync and async, plain and streaming, exactly as many calls as the budget fits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

import spendgate
from spendgate.money import nanos_to_usd
from spendgate.policy import default_policy
from spendgate.sdk import _runtime
from tests.test_sdk import MSG, Provider, worst

N_TASKS = 20
N_FIT = 4


class LegacyProvider:
    """:class:`tests.test_sdk.Provider` answering legacy httpx requests with legacy httpx responses."""

    def __init__(self) -> None:
        self.inner = Provider()
        self.headers: list[dict[str, str]] = []
        self.fail: type[Exception] | None = None

    @property
    def calls(self) -> list[dict[str, Any]]:
        return self.inner.calls

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.fail is not None:
            raise self.fail("the provider is unreachable", request=request)
        self.headers.append(dict(request.headers))
        r = self.inner(request)  # type: ignore[arg-type]  # it reads .content and .url.path only
        return httpx.Response(r.status_code, headers=r.headers.multi_items(), content=r.content)


@pytest.fixture
def provider() -> Iterator[LegacyProvider]:
    spendgate.configure(store="memory://", policy=default_policy())
    yield LegacyProvider()
    spendgate.configure(store="memory://", policy=default_policy())


def sync_client(p: LegacyProvider, **http: Any) -> openai.OpenAI:
    return spendgate.wrap(openai.OpenAI(api_key="sk-t", max_retries=0,
                                        http_client=httpx.Client(transport=httpx.MockTransport(p), **http)))


def async_client(p: LegacyProvider, **http: Any) -> openai.AsyncOpenAI:
    return spendgate.wrap(openai.AsyncOpenAI(api_key="sk-t", max_retries=0,
                                             http_client=httpx.AsyncClient(transport=httpx.MockTransport(p), **http)))


def fits(n: int, model: str = "gpt-4o", max_tokens: int = 1000) -> tuple[Decimal, int]:
    """A budget that fits ``n`` calls' worst case and not ``n + 1``, and that worst case."""
    w = worst(model, max_tokens)
    return nanos_to_usd(n * w + w // 2), w


def charged_nanos() -> int:
    return sum(e.cost for e in _runtime.engine().ledger.events(0))


def test_wrap_keeps_the_legacy_client_type_and_does_not_double_wrap(provider: LegacyProvider) -> None:
    c = sync_client(provider)
    a = async_client(provider)
    assert type(c) is openai.OpenAI and type(a) is openai.AsyncOpenAI
    assert isinstance(c._client, httpx.Client) and not isinstance(c._client, httpx2.Client)
    assert isinstance(a._client, httpx.AsyncClient)
    assert spendgate.wrap(c) is c and spendgate.wrap(a) is a


def _sync_call(c: openai.OpenAI, stream: bool) -> None:
    if stream:
        chunks = list(c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=1000,  # type: ignore[arg-type]
                                                stream=True))
        assert [ch.choices[0].delta.content for ch in chunks] == ["hello"]
    else:
        r = c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=1000)  # type: ignore[arg-type]
        assert r.choices[0].message.content == "hello"


async def _async_call(c: openai.AsyncOpenAI, stream: bool) -> None:
    if stream:
        s = await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=1000,  # type: ignore[arg-type]
                                            stream=True)
        assert [ch.choices[0].delta.content async for ch in s] == ["hello"]
    else:
        r = await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=1000)  # type: ignore[arg-type]
        assert r.choices[0].message.content == "hello"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_20_threads_on_a_legacy_client_under_a_budget_that_fits_4_send_4(
        provider: LegacyProvider, stream: bool) -> None:
    c = sync_client(provider)
    usd, w = fits(N_FIT)
    outcomes: list[str] = []
    lock = threading.Lock()
    with spendgate.budget(usd=usd):
        start = threading.Barrier(N_TASKS)

        def call() -> None:
            start.wait()
            try:
                _sync_call(c, stream)
                outcome = "sent"
            except spendgate.BudgetExceeded as exc:
                assert isinstance(exc, openai.OpenAIError), "the SDK passes the refusal through as it is"
                outcome = "refused"
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=spendgate.bind(call)) for _ in range(N_TASKS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(outcomes) == ["refused"] * (N_TASKS - N_FIT) + ["sent"] * N_FIT
    assert len(provider.calls) == N_FIT
    assert charged_nanos() == N_FIT * w, "each call settled from its usage, the worst case here"
    if stream:
        assert all(b["stream_options"] == {"include_usage": True} for b in provider.calls)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_20_asyncio_tasks_on_a_legacy_async_client_under_a_budget_that_fits_4_send_4(
        provider: LegacyProvider, stream: bool) -> None:
    c = async_client(provider)
    usd, w = fits(N_FIT)

    async def go() -> list[str]:
        @spendgate.budget(usd=usd)
        async def burst() -> list[str]:
            async def one() -> str:
                try:
                    await _async_call(c, stream)
                    return "sent"
                except spendgate.BudgetExceeded:
                    return "refused"
            return list(await asyncio.gather(*(one() for _ in range(N_TASKS))))
        return await burst()

    outcomes = asyncio.run(go())
    assert sorted(outcomes) == ["refused"] * (N_TASKS - N_FIT) + ["sent"] * N_FIT
    assert len(provider.calls) == N_FIT
    assert charged_nanos() == N_FIT * w


@pytest.mark.parametrize("make", [sync_client, async_client], ids=["sync", "async"])
def test_the_legacy_clients_own_headers_still_reach_the_provider(
        provider: LegacyProvider, make: Callable[..., Any]) -> None:
    c = make(provider, headers={"X-Trace": "t-42"})

    async def call_async() -> None:
        await _async_call(c, stream=False)

    if isinstance(c, openai.AsyncOpenAI):
        asyncio.run(call_async())
    else:
        _sync_call(c, stream=False)
    assert provider.headers[-1]["x-trace"] == "t-42"
    assert charged_nanos() == worst("gpt-4o", 1000)


def test_a_legacy_connect_error_releases_the_hold(provider: LegacyProvider) -> None:
    """Nothing was sent, so nothing is charged and the whole budget is still there."""
    c = sync_client(provider)
    usd, _ = fits(1)
    provider.fail = httpx.ConnectError
    with spendgate.budget(usd=usd):
        with pytest.raises(openai.APIConnectionError):
            _sync_call(c, stream=False)
        provider.fail = None
        _sync_call(c, stream=False)  # fits: the failed call's hold was released
    assert charged_nanos() == worst("gpt-4o", 1000)


def test_anthropic_takes_only_httpx2_clients_so_there_is_no_legacy_client_to_guard() -> None:
    with pytest.raises(TypeError, match=r"httpx2\.Client"):
        anthropic.Anthropic(api_key="sk-a", http_client=httpx.Client())  # type: ignore[arg-type]
