"""``spendgate.wrap()`` of an ``openai`` client whose URL is a configured upstream's: an
``AzureOpenAI`` / ``AsyncAzureOpenAI`` client priced through the policy's Azure ``deployments`` map,
and an ``OpenAI`` client on an OpenAI-compatible server's ``base_url`` priced from that upstream's
price table and ``free`` globs — never as OpenAI's rows. The official clients call fake upstreams
on loopback directly (no proxy in the path)."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Iterator
from decimal import Decimal

import openai
import pytest
from aiohttp import web

import spendgate
from spendgate.demo.background import BackgroundLoop
from spendgate.demo.upstream import FakeUpstream
from spendgate.errors import ConfigError
from spendgate.policy import default_policy, parse
from spendgate.report import SPEND_KINDS
from spendgate.sdk import _runtime
from tests.harness import COMPLETION_TOKENS, PROMPT_TOKENS

MSG = [{"role": "user", "content": "hi"}]
# the fake upstream's usage at each model's published rate, in nano-dollars per token
MISTRAL_LARGE = PROMPT_TOKENS * 2_000 + COMPLETION_TOKENS * 6_000      # mistral/mistral-large: $2 / $6 per Mtok
MISTRAL_DEAREST = PROMPT_TOKENS * 2_700 + COMPLETION_TOKENS * 8_100    # mistral-medium-2312: $2.7 / $8.1
GPT_4O = PROMPT_TOKENS * 2_500 + COMPLETION_TOKENS * 10_000            # openai/gpt-4o: $2.5 / $10
GPT_4O_MINI = PROMPT_TOKENS * 150 + COMPLETION_TOKENS * 600            # openai/gpt-4o-mini: $0.15 / $0.60
API_VERSION = "2024-10-21"


class Upstreams:
    """Three fake upstreams on loopback: an OpenAI-compatible server configured as ``mistral``, an
    Azure OpenAI resource configured as ``azure``, and a server no table configures."""

    def __init__(self) -> None:
        self.bg = BackgroundLoop()
        self.mistral, self.azure, self.other = FakeUpstream(), FakeUpstream(), FakeUpstream()
        app = web.Application()
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self.azure.chat)
        app.router.add_post("/openai/deployments/{deployment}/embeddings", self.azure.embeddings)
        app.router.add_post("/openai/v1/chat/completions", self.azure.chat)
        self.bare = FakeUpstream()  # an OpenAI-compatible API without /v1 in its paths
        bare = web.Application()
        bare.router.add_post("/chat/completions", self.bare.chat)
        self.bare_url = f"http://127.0.0.1:{self.bg.serve(bare)}"
        self.mistral_url = f"http://127.0.0.1:{self.bg.serve(self.mistral.app())}"
        self.azure_url = f"http://127.0.0.1:{self.bg.serve(app)}"
        self.other_url = f"http://127.0.0.1:{self.bg.serve(self.other.app())}"

    def policy(self, extra: str = "", head: str = "") -> str:
        return head + f"""
defaults = false
[upstreams.mistral]
base_url = "{self.mistral_url}/v1"
api = "openai"
prices = "mistral"
free = ["my-local-*"]

[upstreams.bare]
base_url = "{self.bare_url}"
prices = "mistral"

[upstreams.azure]
base_url = "{self.azure_url}"
api = "azure"
deployments = {{ "my-gpt4o" = "gpt-4o", "my-mini" = "gpt-4o-mini", "my-embed" = "text-embedding-3-small" }}
""" + extra

    def configure(self, extra: str = "", head: str = "") -> None:
        spendgate.configure(store="memory://", policy=parse(tomllib.loads(self.policy(extra, head))))


@pytest.fixture
def ups() -> Iterator[Upstreams]:
    u = Upstreams()
    u.configure()
    yield u
    spendgate.configure(store="memory://", policy=default_policy())
    u.bg.close()


def spend() -> list[tuple[str, str, int]]:
    return [(e.provider, e.model, e.cost) for e in _runtime.engine().ledger.events(0) if e.kind in SPEND_KINDS]


def azure(u: Upstreams) -> openai.AzureOpenAI:
    return spendgate.wrap(openai.AzureOpenAI(azure_endpoint=u.azure_url, api_version=API_VERSION,
                                             api_key="azure-client-key", max_retries=0))


def async_azure(u: Upstreams) -> openai.AsyncAzureOpenAI:
    return spendgate.wrap(openai.AsyncAzureOpenAI(azure_endpoint=u.azure_url, api_version=API_VERSION,
                                                  api_key="azure-client-key", max_retries=0))


def mistral(u: Upstreams) -> openai.OpenAI:
    return spendgate.wrap(openai.OpenAI(base_url=u.mistral_url + "/v1", api_key="mistral-key", max_retries=0))


# -- Azure OpenAI -------------------------------------------------------------------------------------


def test_azure_client_deployments_are_priced_as_the_mapped_models_to_the_nano_dollar(ups: Upstreams) -> None:
    c = azure(ups)
    assert type(c) is openai.AzureOpenAI and spendgate.wrap(c) is c
    assert c.chat.completions.create(model="my-gpt4o", messages=MSG, max_tokens=20).choices[0].message.content \
        == "hello"
    chunks = list(c.chat.completions.create(model="my-mini", messages=MSG, max_tokens=20, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "hello there"
    assert c.embeddings.create(model="my-embed", input="hello").data[0].embedding == [0.1, 0.2]
    seen = ups.azure.seen
    assert [s.path for s in seen] == ["/openai/deployments/my-gpt4o/chat/completions",
                                      "/openai/deployments/my-mini/chat/completions",
                                      "/openai/deployments/my-embed/embeddings"]
    assert all(s.query == f"api-version={API_VERSION}" for s in seen)
    assert seen[0].headers["api-key"] == "azure-client-key"
    assert seen[1].json["stream_options"] == {"include_usage": True}
    assert spend() == [("azure", "gpt-4o", GPT_4O), ("azure", "gpt-4o-mini", GPT_4O_MINI),
                       ("azure", "text-embedding-3-small", PROMPT_TOKENS * 20)]  # $0.02 per Mtok


def test_async_azure_client_32_concurrent_calls_admit_exactly_the_ones_that_fit(ups: Upstreams) -> None:
    c = async_azure(ups)
    est = _runtime.engine().estimator.estimate("azure", "/v1/chat/completions",
                                               {"model": "gpt-4o", "messages": MSG, "max_tokens": 1000}).cost_nanos
    n_fit = 6
    ups.configure(f'[[budget]]\nname = "az"\nusd = "{Decimal(est * n_fit + est // 2) / 10**9}"\nwindow = "day"\n')
    # each admitted call bills its worst case, so no capture frees room for a late one
    ups.azure.completion_tokens = 1000
    ups.azure.bill_input = lambda _: _runtime.engine().estimator.estimate(
        "azure", "/v1/chat/completions", {"model": "gpt-4o", "messages": MSG, "max_tokens": 1000}).input_tokens

    async def go() -> list[str]:
        async def one() -> str:
            try:
                await c.chat.completions.create(model="my-gpt4o", messages=MSG, max_tokens=1000)  # type: ignore[arg-type]
                return "sent"
            except spendgate.BudgetExceeded as exc:
                assert isinstance(exc, openai.OpenAIError)
                return "refused"

        return list(await asyncio.gather(*(one() for _ in range(32))))

    outcomes = asyncio.run(go())
    assert outcomes.count("sent") == n_fit and outcomes.count("refused") == 32 - n_fit
    assert ups.azure.reached("/openai/deployments/my-gpt4o/chat/completions") == n_fit
    assert spend() == [("azure", "gpt-4o", est)] * n_fit


def test_azure_over_budget_is_refused_before_sending(ups: Upstreams) -> None:
    ups.configure('[[budget]]\nname = "tiny"\nusd = 0.000001\nwindow = "day"\n')
    with pytest.raises(spendgate.BudgetExceeded) as exc:
        azure(ups).chat.completions.create(model="my-gpt4o", messages=MSG, max_tokens=20)
    assert isinstance(exc.value, openai.OpenAIError) and 'budget "tiny"' in str(exc.value)

    async def stream() -> None:
        await async_azure(ups).chat.completions.create(model="my-mini", messages=MSG, max_tokens=20, stream=True)

    with pytest.raises(spendgate.BudgetExceeded):
        asyncio.run(stream())
    assert ups.azure.seen == [] and spend() == []


def test_azure_unknown_deployment_is_refused_naming_it_and_never_sent(ups: Upstreams) -> None:
    with pytest.raises(openai.OpenAIError) as exc:
        azure(ups).chat.completions.create(model="their-gpt5", messages=MSG, max_tokens=5)
    assert "'their-gpt5'" in str(exc.value) and "my-embed, my-gpt4o, my-mini" in str(exc.value)
    assert ups.azure.seen == [] and spend() == []


def test_azure_v1_api_prices_the_deployment_named_in_the_body(ups: Upstreams) -> None:
    c = spendgate.wrap(openai.OpenAI(base_url=ups.azure_url + "/openai/v1", api_key="k", max_retries=0))
    c.chat.completions.create(model="my-mini", messages=MSG, max_tokens=5)
    assert ups.azure.seen[-1].path == "/openai/v1/chat/completions" and ups.azure.seen[-1].json["model"] == "my-mini"
    with pytest.raises(openai.OpenAIError, match="not in"):
        c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=5)
    assert len(ups.azure.seen) == 1 and spend() == [("azure", "gpt-4o-mini", GPT_4O_MINI)]


def test_azure_downgrade_goes_to_the_deployment_serving_the_cheaper_model(ups: Upstreams) -> None:
    ups.configure('[[budget]]\nname = "per-call"\nusd = 0.001\nwindow = "request"\naction = "downgrade"\n'
                  'downgrade = { "gpt-4o" = "gpt-4o-mini" }\n')
    azure(ups).chat.completions.create(model="my-gpt4o", messages=MSG, max_tokens=1000)
    seen = ups.azure.seen[-1]
    assert seen.path == "/openai/deployments/my-mini/chat/completions" and seen.json["model"] == "my-mini"
    assert seen.query == f"api-version={API_VERSION}"
    assert spend() == [("azure", "gpt-4o-mini", GPT_4O_MINI)]


def test_an_azure_client_no_table_configures_is_refused_never_priced_as_another(ups: Upstreams) -> None:
    c = spendgate.wrap(openai.AzureOpenAI(azure_endpoint=ups.other_url, api_version=API_VERSION, api_key="k",
                                          max_retries=0))
    with pytest.raises(openai.OpenAIError) as exc:
        c.chat.completions.create(model="my-gpt4o", messages=MSG, max_tokens=5)
    assert "cannot be priced, so it was not sent" in str(exc.value) and "[upstreams.NAME]" in str(exc.value)
    assert ups.other.seen == [] and spend() == []


# -- an OpenAI-compatible server ----------------------------------------------------------------------


def test_openai_client_on_a_configured_base_url_is_priced_from_its_table(ups: Upstreams) -> None:
    c = mistral(ups)
    assert c.chat.completions.create(model="mistral-large-latest", messages=MSG,
                                     max_tokens=20).choices[0].message.content == "hello"
    chunks = list(c.chat.completions.create(model="mistral-large-latest", messages=MSG, max_tokens=20,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "hello there"
    # gpt-4o has an OpenAI row: on this upstream it is priced as Mistral's dearest, never as OpenAI's
    c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=5)
    c.chat.completions.create(model="my-local-llama", messages=MSG, max_tokens=5)
    assert [s.path for s in ups.mistral.seen] == ["/v1/chat/completions"] * 4
    assert spend() == [("mistral", "mistral-large-latest", MISTRAL_LARGE)] * 2 + [
        ("mistral", "gpt-4o", MISTRAL_DEAREST), ("mistral", "my-local-llama", 0)]


def test_a_configured_api_without_v1_in_its_paths_is_priced_as_its_upstream(ups: Upstreams) -> None:
    c = spendgate.wrap(openai.OpenAI(base_url=ups.bare_url, api_key="k", max_retries=0))
    c.chat.completions.create(model="mistral-large-latest", messages=MSG, max_tokens=5)
    assert [s.path for s in ups.bare.seen] == ["/chat/completions"]
    assert spend() == [("bare", "mistral-large-latest", MISTRAL_LARGE)]


def test_the_same_client_elsewhere_is_priced_as_openai(ups: Upstreams) -> None:
    c = spendgate.wrap(openai.OpenAI(base_url=ups.other_url + "/v1", api_key="sk", max_retries=0))
    c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=5)
    c.chat.completions.create(model="my-local-llama", messages=MSG, max_tokens=5)  # free only on mistral
    [(p1, m1, c1), (p2, m2, c2)] = spend()
    assert (p1, m1, c1) == ("openai", "gpt-4o", GPT_4O)
    assert (p2, m2) == ("openai", "my-local-llama") and c2 > 0


def test_unpriced_block_refuses_a_model_the_upstreams_table_lacks_before_sending(ups: Upstreams) -> None:
    ups.configure(head='unpriced = "block"\n')

    async def go() -> None:
        c = spendgate.wrap(openai.AsyncOpenAI(base_url=ups.mistral_url + "/v1", api_key="k", max_retries=0))
        with pytest.raises(spendgate.BudgetExceeded, match="gpt-4o"):
            await c.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=5)
        await c.chat.completions.create(model="mistral-large-latest", messages=MSG, max_tokens=5)

    asyncio.run(go())
    assert [s.json["model"] for s in ups.mistral.seen] == ["mistral-large-latest"]
    assert spend() == [("mistral", "mistral-large-latest", MISTRAL_LARGE)]


def test_a_price_provider_the_table_lacks_is_refused_by_configure() -> None:
    doc = tomllib.loads('[upstreams.m]\nbase_url = "https://x.example"\nprices = "nosuch"\n')
    with pytest.raises(ConfigError, match=r"upstreams\.m\.prices: the price table has no provider 'nosuch'"):
        spendgate.configure(store="memory://", policy=parse(doc))
