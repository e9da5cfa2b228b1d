"""OpenAI-compatible upstreams and Azure OpenAI, added by ``[upstreams.NAME]`` tables: the official
``openai`` clients through the proxy against fake upstreams on loopback, priced from the named
price table provider's rows only."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from aiohttp import web

from spendgate import keys, ledger, providers
from spendgate.demo.upstream import FakeUpstream
from spendgate.engine import Engine
from spendgate.errors import ConfigError
from spendgate.estimate import Estimator
from spendgate.policy import parse
from spendgate.pricing.table import PriceTable
from spendgate.proxy.app import Proxy, ProxyConfig
from spendgate.report import SPEND_KINDS
from tests.harness import COMPLETION_TOKENS, PROMPT_TOKENS, Servers

MSG = [{"role": "user", "content": "hi"}]
# the fake upstream's usage at each model's published rate, in nano-dollars per token
MISTRAL_LARGE = PROMPT_TOKENS * 2_000 + COMPLETION_TOKENS * 6_000      # mistral/mistral-large: $2 / $6 per Mtok
MISTRAL_DEAREST = PROMPT_TOKENS * 2_700 + COMPLETION_TOKENS * 8_100    # mistral-medium-2312: $2.7 / $8.1
GPT_4O = PROMPT_TOKENS * 2_500 + COMPLETION_TOKENS * 10_000            # openai/gpt-4o: $2.5 / $10
GPT_4O_MINI = PROMPT_TOKENS * 150 + COMPLETION_TOKENS * 600            # openai/gpt-4o-mini: $0.15 / $0.60

POLICY = """
defaults = false
[upstreams.mistral]
base_url = "https://api.mistral.ai"
api = "openai"
prices = "mistral"
key_env = "MISTRAL_API_KEY"
free = ["my-local-*"]

[upstreams.azure]
base_url = "https://myres.openai.azure.com"
api = "azure"
deployments = { "my-gpt4o" = "gpt-4o", "my-mini" = "gpt-4o-mini", "my-embed" = "text-embedding-3-small" }
key_env = "AZURE_OPENAI_API_KEY"
"""


class Upstreams:
    """spendgate over a policy with configured upstreams: the harness's fake answers the Mistral
    prefix (spendgate drops the prefix), a second fake answers Azure's paths."""

    def __init__(self, extra: str = "", head: str = "") -> None:
        self.servers = Servers(parse(tomllib.loads(head + POLICY + extra)), "memory://")
        self.azure = FakeUpstream()
        app = web.Application()
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self.azure.chat)
        app.router.add_post("/openai/deployments/{deployment}/embeddings", self.azure.embeddings)
        app.router.add_post("/openai/v1/chat/completions", self.azure.chat)
        azure_port = self.servers.bg.serve(app)
        ups = self.servers.proxy.config.upstreams
        ups["mistral"] = f"http://127.0.0.1:{self.servers.upstream_port}"
        ups["azure"] = f"http://127.0.0.1:{azure_port}"
        self.url = self.servers.url

    @property
    def mistral(self) -> FakeUpstream:
        return self.servers.mock

    def spend(self) -> list[tuple[str, str, int]]:
        self.servers.settled()
        return [(e.provider, e.model, e.cost) for e in self.servers.store.events(0) if e.kind in SPEND_KINDS]


@pytest.fixture
def ups() -> Iterator[Any]:
    made: list[Upstreams] = []

    def make(extra: str = "", head: str = "") -> Upstreams:
        u = Upstreams(extra, head)
        made.append(u)
        return u

    yield make
    for u in made:
        u.servers.close()


def mistral_client(u: Upstreams) -> openai.OpenAI:
    return openai.OpenAI(base_url=u.url + "/mistral/v1", api_key="mistral-client-key", max_retries=0)


def azure_client(u: Upstreams) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(azure_endpoint=u.url, api_version="2024-10-21", api_key="azure-client-key",
                              max_retries=0)


# -- an OpenAI-compatible upstream under its prefix -------------------------------------------------


def test_openai_client_on_a_configured_prefix_is_forwarded_without_it_and_priced_from_its_table(ups: Any) -> None:
    u = ups()
    client = mistral_client(u)
    out = client.chat.completions.create(model="mistral-large-latest", messages=MSG, max_tokens=20)
    assert out.choices[0].message.content == "hello"
    chunks = list(client.chat.completions.create(model="mistral-large-latest", messages=MSG, max_tokens=20,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello there"
    seen = u.mistral.seen
    assert [s.path for s in seen] == ["/v1/chat/completions", "/v1/chat/completions"]
    assert seen[0].headers["authorization"] == "Bearer mistral-client-key"
    assert seen[1].json["stream_options"] == {"include_usage": True}
    assert u.spend() == [("mistral", "mistral-large-latest", MISTRAL_LARGE)] * 2


def test_a_model_the_named_table_lacks_is_its_dearest_never_another_providers_row(ups: Any) -> None:
    u = ups()
    # gpt-4o has an OpenAI row, deepseek-chat a DeepSeek one: neither is Mistral's price
    for model in ("gpt-4o", "deepseek-chat"):
        raw = mistral_client(u).chat.completions.with_raw_response.create(model=model, messages=MSG, max_tokens=5)
        assert raw.parse().choices[0].message.content == "hello"
    assert u.spend() == [("mistral", "gpt-4o", MISTRAL_DEAREST), ("mistral", "deepseek-chat", MISTRAL_DEAREST)]


def test_unpriced_block_refuses_a_model_the_named_table_lacks_before_sending(ups: Any) -> None:
    u = ups(head='unpriced = "block"\n')
    with pytest.raises(openai.APIStatusError) as exc:
        mistral_client(u).chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=5)
    assert exc.value.status_code == 402 and "gpt-4o" in exc.value.message
    assert u.mistral.seen == []
    mistral_client(u).chat.completions.create(model="mistral-large-latest", messages=MSG, max_tokens=5)
    assert u.spend() == [("mistral", "mistral-large-latest", MISTRAL_LARGE)]


def test_free_globs_price_only_the_models_they_name(ups: Any) -> None:
    u = ups()
    client = mistral_client(u)
    client.chat.completions.create(model="my-local-llama", messages=MSG, max_tokens=5)
    client.chat.completions.create(model="mistral-large-latest", messages=MSG, max_tokens=5)
    assert u.spend() == [("mistral", "my-local-llama", 0), ("mistral", "mistral-large-latest", MISTRAL_LARGE)]


def test_nothing_is_free_by_default() -> None:
    doc = tomllib.loads('[upstreams.local]\nbase_url = "http://127.0.0.1:8000/v1"\nprices = "mistral"\n')
    providers.configure(parse(doc).upstreams)
    est = Estimator(PriceTable.bundled())
    got = est.estimate("local", "/v1/chat/completions", {"model": "my-local-llama", "messages": MSG,
                                                          "max_tokens": 10})
    assert got.price.how == "dearest" and got.price.price.provider == "mistral" and got.cost_nanos > 0


def test_a_downgrade_to_a_free_model_is_free_but_a_free_model_never_prices_a_paid_one(ups: Any) -> None:
    u = ups("""
[[budget]]
name = "per-call"
usd = 0.0001
window = "request"
action = "downgrade"
downgrade = { "mistral-large-latest" = "my-local-small" }
""")
    client = mistral_client(u)
    # over the per-call cap: downgraded to the free local model, which is what is sent and priced
    client.chat.completions.create(model="mistral-large-latest", messages=MSG, max_tokens=1000)
    assert u.mistral.seen[-1].json["model"] == "my-local-small"
    # a paid model sent by the client is priced as itself, whatever free model it resembles
    client.chat.completions.create(model="mistral-large-latest", messages=MSG, max_tokens=5)
    assert u.spend() == [("mistral", "my-local-small", 0), ("mistral", "mistral-large-latest", MISTRAL_LARGE)]


# -- Azure OpenAI ---------------------------------------------------------------------------------


def test_azure_client_on_a_deployment_is_priced_as_the_mapped_model(ups: Any) -> None:
    u = ups()
    client = azure_client(u)
    out = client.chat.completions.create(model="my-gpt4o", messages=MSG, max_tokens=20)
    assert out.choices[0].message.content == "hello"
    chunks = list(client.chat.completions.create(model="my-mini", messages=MSG, max_tokens=20, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello there"
    seen = u.azure.seen
    assert [s.path for s in seen] == ["/openai/deployments/my-gpt4o/chat/completions",
                                      "/openai/deployments/my-mini/chat/completions"]
    assert all(s.query == "api-version=2024-10-21" for s in seen)
    assert seen[0].headers["api-key"] == "azure-client-key"
    assert u.mistral.seen == []
    assert u.spend() == [("azure", "gpt-4o", GPT_4O), ("azure", "gpt-4o-mini", GPT_4O_MINI)]


def test_azure_unknown_deployment_is_refused_naming_it_and_never_forwarded(ups: Any) -> None:
    u = ups()
    with pytest.raises(openai.NotFoundError) as exc:
        azure_client(u).chat.completions.create(model="their-gpt5", messages=MSG, max_tokens=5)
    assert "'their-gpt5'" in exc.value.message and "my-embed, my-gpt4o, my-mini" in exc.value.message
    assert u.azure.seen == [] and u.spend() == []


def test_azure_v1_api_prices_the_deployment_named_in_the_body(ups: Any) -> None:
    u = ups()
    client = openai.OpenAI(base_url=u.url + "/openai/v1", api_key="azure-client-key", max_retries=0)
    client.chat.completions.create(model="my-gpt4o", messages=MSG, max_tokens=5)
    assert u.azure.seen[-1].path == "/openai/v1/chat/completions"
    assert u.azure.seen[-1].json["model"] == "my-gpt4o"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=5)
    assert len(u.azure.seen) == 1
    assert u.spend() == [("azure", "gpt-4o", GPT_4O)]


def test_azure_downgrade_goes_to_the_deployment_serving_the_cheaper_model(ups: Any) -> None:
    u = ups("""
[[budget]]
name = "per-call"
usd = 0.001
window = "request"
action = "downgrade"
downgrade = { "gpt-4o" = "gpt-4o-mini" }
""")
    azure_client(u).chat.completions.create(model="my-gpt4o", messages=MSG, max_tokens=1000)
    seen = u.azure.seen[-1]
    assert seen.path == "/openai/deployments/my-mini/chat/completions" and seen.json["model"] == "my-mini"
    assert seen.query == "api-version=2024-10-21"
    assert u.spend() == [("azure", "gpt-4o-mini", GPT_4O_MINI)]


# -- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("toml", "where"), [
    ('[upstreams.mistral]\nbase_url = "https://api.mistral.ai"\nxyz = 1', "upstreams.mistral.xyz: unknown key"),
    ('[upstreams.mistral]\nbase_url = "https://api.mistral.ai"\napi = "soap"', "upstreams.mistral.api:"),
    ('[upstreams.mistral]\nbase_url = "api.mistral.ai"', "upstreams.mistral.base_url:"),
    ('[upstreams.mistral]\napi = "openai"', "upstreams.mistral.base_url: missing"),
    ('[upstreams.openai]\nbase_url = "https://x.example"', "upstreams.openai: 'openai' is a built-in provider"),
    ('[upstreams.spendgate]\nbase_url = "https://x.example"', "upstreams.spendgate: 'spendgate' is a route prefix"),
    ('[upstreams.v1beta]\nbase_url = "https://x.example"', "upstreams.v1beta: 'v1beta' is a route prefix"),
    ('[upstreams.m]\nbase_url = "https://x.example"\nfree = "yes"', "upstreams.m.free:"),
    ('[upstreams.m]\nbase_url = "https://x.example"\ndeployments = { a = "gpt-4o" }', "upstreams.m.deployments:"),
    ('[upstreams.az]\nbase_url = "https://x.example"\napi = "azure"', "upstreams.az.deployments:"),
])
def test_a_bad_upstreams_table_is_refused_naming_the_key(toml: str, where: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(tomllib.loads(toml))
    assert str(exc.value).startswith(where), str(exc.value)


def test_a_price_provider_the_table_lacks_stops_the_server() -> None:
    pol = parse(tomllib.loads('[upstreams.m]\nbase_url = "https://x.example"\nprices = "nosuch"\n'))
    store = ledger.open("memory://")
    try:
        with pytest.raises(ConfigError, match=r"upstreams\.m\.prices: the price table has no provider 'nosuch'"):
            Proxy(Engine(pol, store), ProxyConfig())
    finally:
        store.close()


def test_free_true_makes_every_model_of_that_upstream_free() -> None:
    pol = parse(tomllib.loads('[upstreams.vllm]\nbase_url = "http://127.0.0.1:8000"\nprices = "mistral"\n'
                              'free = true\n'))
    assert pol.upstreams["vllm"].free == ("*",)
    assert pol.upstreams["vllm"].key_env == "VLLM_API_KEY"


def test_a_virtual_key_is_swapped_for_the_key_env_of_the_upstream(ups: Any, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    monkeypatch.setenv("MISTRAL_API_KEY", "real-mistral-key")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "real-azure-key")
    u = ups()
    secret, _ = keys.create(u.servers.store, user="ana")
    openai.OpenAI(base_url=u.url + "/mistral/v1", api_key=secret, max_retries=0).chat.completions.create(
        model="mistral-large-latest", messages=MSG, max_tokens=5)
    openai.AzureOpenAI(azure_endpoint=u.url, api_version="2024-10-21", api_key=secret,
                       max_retries=0).chat.completions.create(model="my-gpt4o", messages=MSG, max_tokens=5)
    assert u.mistral.seen[-1].headers["authorization"] == "Bearer real-mistral-key"
    sent = u.azure.seen[-1].headers
    assert sent["api-key"] == "real-azure-key" and "authorization" not in sent
    u.servers.settled()
    assert [(e.provider, e.dims.get("user"), e.cost) for e in u.servers.store.events(0) if e.kind in SPEND_KINDS] == [
        ("mistral", "ana", MISTRAL_LARGE), ("azure", "ana", GPT_4O)]


def test_a_free_first_choice_with_paid_fallbacks_is_held_and_charged_at_the_dearest(ups: Any) -> None:
    u = ups()
    mistral_client(u).chat.completions.create(model="my-local-llama", messages=MSG, max_tokens=5,
                                              extra_body={"models": ["my-local-llama", "mistral-large-latest"]})
    assert u.mistral.seen[-1].json["model"] == "my-local-llama"
    assert u.spend() == [("mistral", "my-local-llama", MISTRAL_LARGE)]


def test_azure_embeddings_deployment_is_priced_as_the_mapped_embedding_model(ups: Any) -> None:
    u = ups()
    out = azure_client(u).embeddings.create(model="my-embed", input="hello")
    assert out.data[0].embedding == [0.1, 0.2]
    assert u.azure.seen[-1].path == "/openai/deployments/my-embed/embeddings"
    assert u.spend() == [("azure", "text-embedding-3-small", PROMPT_TOKENS * 20)]  # $0.02 per Mtok
