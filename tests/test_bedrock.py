"""AWS Bedrock: its prices, its Converse wire format, virtual AWS credentials and a stock boto3 client."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from spendgate import keys, providers
from spendgate import ledger as ledger_mod
from spendgate.cli.main import main
from spendgate.errors import BadRequest
from spendgate.policy import default_policy, parse
from spendgate.pricing.table import PriceTable
from spendgate.providers import bedrock
from spendgate.proxy.app import ProxyConfig
from spendgate.report import SPEND_KINDS
from spendgate.usage import UnreadableUsage, read_usage
from tests.harness import Servers


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.bundled()


@pytest.mark.parametrize(("model", "row", "input_usd"), [
    ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "regional.anthropic.claude-sonnet-4-5-20250929-v1:0", "3.3"),
    ("eu.anthropic.claude-sonnet-4-5-20250929-v1:0", "regional.anthropic.claude-sonnet-4-5-20250929-v1:0", "3.3"),
    ("apac.anthropic.claude-sonnet-4-5-20250929-v1:0", "regional.anthropic.claude-sonnet-4-5-20250929-v1:0", "3.3"),
    ("anthropic.claude-sonnet-4-5-20250929-v1:0", "regional.anthropic.claude-sonnet-4-5-20250929-v1:0", "3.3"),
    ("global.anthropic.claude-sonnet-4-5-20250929-v1:0", "global.anthropic.claude-sonnet-4-5-20250929-v1:0", "3"),
    ("eu.anthropic.claude-haiku-4-5-20251001-v1:0", "regional.anthropic.claude-haiku-4-5-20251001-v1:0", "1.1"),
    ("amazon.nova-pro-v1:0", "amazon.nova-pro-v1:0", "0.8"),
    ("bedrock/us.anthropic.claude-sonnet-4-5-20250929-v1:0", "regional.anthropic.claude-sonnet-4-5-20250929-v1:0",
     "3.3"),
])
def test_bedrock_ids_resolve_to_bedrock_rows(table: PriceTable, model: str, row: str, input_usd: str) -> None:
    for provider in (None, "bedrock", "anthropic", "google"):
        found = table.resolve(model, provider)
        assert found is not None
        assert (found.price.provider, found.price.model) == ("bedrock", row)
        assert found.price.input.base == Decimal(input_usd)
        assert found.price.source.startswith("genai-prices")


def test_an_unknown_bedrock_id_is_unpriced_never_another_providers(table: PriceTable) -> None:
    assert table.resolve("us.anthropic.claude-nonexistent-v1:0") is None
    assert table.resolve("us.anthropic.claude-nonexistent-v1:0", "anthropic") is None
    assert table.dearest("bedrock").provider == "bedrock"


def test_bedrock_rows_are_not_borrowed_by_other_ids(table: PriceTable) -> None:
    found = table.resolve("claude-sonnet-4-5-20250929")
    assert found is not None and found.price.provider == "anthropic"
    found = table.resolve("gpt-6-astra-law")
    assert found is not None and found.price.provider == "openai"


# -- through the proxy, with a stock boto3 bedrock-runtime client -------------------------------------

MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
ROUTE = "/model/{modelId}/converse"
#: the upstream's usage: uncached input, cache reads, cache writes, output
USAGE = {"inputTokens": 1200, "outputTokens": 345, "totalTokens": 1200 + 345 + 400 + 60,
         "cacheReadInputTokens": 400, "cacheWriteInputTokens": 60}
#: the same usage as an Anthropic body reports it (InvokeModel)
ANTHROPIC_USAGE = {"input_tokens": 1200, "output_tokens": 345, "cache_read_input_tokens": 400,
                   "cache_creation_input_tokens": 60}
PROXY_KEY, PROXY_SECRET = "AKIDSPENDGATEPROXY01", "proxy-secret-access-key"


def expected_cost(table: PriceTable, usage: Mapping[str, int] = USAGE) -> int:
    """Nano-dollars from the Bedrock row: USD per Mtok x 1000 is nano-dollars per token."""
    p = table.resolve(MODEL, "bedrock")
    assert p is not None and p.price.cache_read is not None and p.price.cache_write is not None
    r = p.price
    # the regional Claude Sonnet 4.5 row: AWS's regional (+10 %) rates
    assert (r.input.base, r.output.base) == (Decimal("3.3"), Decimal("16.5"))
    total = (usage["inputTokens"] * r.input.base + usage["outputTokens"] * r.output.base
             + usage["cacheReadInputTokens"] * r.cache_read.base + usage["cacheWriteInputTokens"] * r.cache_write.base)
    return int(total * 1000)


class FakeBedrock:
    """Bedrock's runtime on loopback: Converse JSON and a ConverseStream event stream, checking that
    each request arrives signed with the proxy's own credentials (never the client's)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.usage: dict[str, int] = dict(USAGE)
        self.cut = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/model/{modelId}/converse", self.converse)
        app.router.add_post("/model/{modelId}/converse-stream", self.stream)
        app.router.add_post("/model/{modelId}/invoke", self.invoke)
        app.router.add_post("/model/{modelId}/invoke-with-response-stream", self.invoke_stream)
        return app

    async def invoke(self, request: web.Request) -> web.Response:
        await self._check(request)
        return web.json_response({"id": "msg_1", "type": "message", "role": "assistant",
                                  "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn",
                                  "usage": ANTHROPIC_USAGE})

    async def invoke_stream(self, request: web.Request) -> web.StreamResponse:
        await self._check(request)
        resp = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
        await resp.prepare(request)
        start_usage = {**ANTHROPIC_USAGE, "output_tokens": 1}
        events = [{"type": "message_start", "message": {"id": "msg_1", "role": "assistant", "usage": start_usage}},
                  {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                  {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hello"}},
                  {"type": "content_block_stop", "index": 0},
                  {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                   "usage": {"output_tokens": ANTHROPIC_USAGE["output_tokens"]}},
                  {"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 1200}}]
        for e in events:
            payload = json.dumps({"bytes": base64.b64encode(json.dumps(e).encode()).decode()}).encode()
            await resp.write(bedrock.event_message({":message-type": "event", ":event-type": "chunk",
                                                    ":content-type": "application/json"}, payload))
        await resp.write_eof()
        return resp

    async def _check(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        auth = request.headers["Authorization"]
        assert auth.startswith(f"AWS4-HMAC-SHA256 Credential={PROXY_KEY}/"), auth
        signed = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
        region, service = auth.split("Credential=")[1].split(",")[0].split("/")[2:4]
        expected = bedrock._signature(request.method, f"http://{request.host}{request.raw_path}",
                                      {n: request.headers.get(n, "") for n in signed}, raw, PROXY_KEY, PROXY_SECRET,
                                      region, service, request.headers["X-Amz-Date"])
        assert auth.endswith(f"Signature={expected}")
        assert (region, service) == ("us-east-1", "bedrock")
        body: dict[str, Any] = json.loads(raw)
        self.seen.append((request.raw_path, body))
        return body

    async def converse(self, request: web.Request) -> web.Response:
        await self._check(request)
        return web.json_response({"output": {"message": {"role": "assistant", "content": [{"text": "hello"}]}},
                                  "stopReason": "end_turn", "usage": self.usage, "metrics": {"latencyMs": 12}})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        await self._check(request)
        resp = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
        await resp.prepare(request)

        def event(kind: str, payload: dict[str, Any]) -> bytes:
            return bedrock.event_message({":message-type": "event", ":event-type": kind,
                                          ":content-type": "application/json"}, json.dumps(payload).encode())

        frames = [event("messageStart", {"role": "assistant"}),
                  event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "hello"}}),
                  event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": " there"}}),
                  event("contentBlockStop", {"contentBlockIndex": 0}),
                  event("messageStop", {"stopReason": "end_turn"}),
                  event("metadata", {"usage": self.usage, "metrics": {"latencyMs": 12}})]
        if self.cut:  # the upstream breaks off after the first text
            await resp.write(b"".join(frames[:3]))
            request.transport.close()  # type: ignore[union-attr]
            return resp
        data = b"".join(frames)
        for i in range(0, len(data), 7):  # frames split across reads
            await resp.write(data[i:i + 7])
        await resp.write_eof()
        return resp


@pytest.fixture
def proxy_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", PROXY_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PROXY_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv(bedrock.BEARER_ENV, raising=False)
    bedrock._session.cache_clear()
    yield
    bedrock._session.cache_clear()


@pytest.fixture
def servers_for(proxy_credentials: None, tmp_path: Path) -> Iterator[Any]:
    made: list[tuple[Servers, FakeBedrock]] = []

    def make(policy: dict[str, Any] | None = None, store: str = "memory://") -> tuple[Servers, FakeBedrock]:
        s = Servers(parse(policy) if policy is not None else default_policy(), store)
        fake = FakeBedrock()
        port = s.bg.serve(fake.app())
        s.proxy.config.upstreams["bedrock"] = f"http://127.0.0.1:{port}"
        made.append((s, fake))
        return s, fake

    yield make
    for s, _ in made:
        s.close()


def aws_key(s: Servers, user: str = "ana") -> tuple[str, str]:
    _, key = keys.create(s.store, user=user)
    return keys.create_aws(s.store, key)


def client(s: Servers, creds: tuple[str, str], **config: Any) -> Any:
    return boto3.client("bedrock-runtime", endpoint_url=s.url, region_name="us-east-1",
                        aws_access_key_id=creds[0], aws_secret_access_key=creds[1],
                        config=Config(**config) if config else None)


def charged(s: Servers) -> list[int]:
    s.settled()
    return [e.cost for e in s.store.events(0) if e.kind in SPEND_KINDS]


MESSAGES = [{"role": "user", "content": [{"text": "Say hello."}]}]


def test_converse_is_charged_to_the_nano_dollar_from_the_bedrock_row(servers_for: Any, table: PriceTable) -> None:
    s, fake = servers_for()
    out = client(s, aws_key(s)).converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
    assert out["output"]["message"]["content"][0]["text"] == "hello"
    assert out["usage"]["inputTokens"] == USAGE["inputTokens"]
    assert charged(s) == [expected_cost(table)]
    # the model id reaches Bedrock percent-encoded, as AWS SDKs send it; the body unchanged
    assert fake.seen[-1][0] == f"/model/{MODEL.replace(':', '%3A')}/converse"
    assert fake.seen[-1][1] == {"messages": MESSAGES, "inferenceConfig": {"maxTokens": 500}}
    event = next(e for e in s.store.events(0) if e.kind in SPEND_KINDS)
    assert (event.provider, event.model, event.dims.get("user")) == ("bedrock", MODEL, "ana")
    assert event.estimated is False


def test_converse_stream_is_relayed_and_charged_from_its_metadata_event(servers_for: Any, table: PriceTable) -> None:
    s, _ = servers_for()
    out = client(s, aws_key(s)).converse_stream(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
    events = list(out["stream"])
    text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
    assert text == "hello there"
    assert events[-1]["metadata"]["usage"] == USAGE
    assert charged(s) == [expected_cost(table)]


def test_a_refusal_is_a_client_error_with_spendgates_message_and_is_not_retried(servers_for: Any) -> None:
    s, fake = servers_for({"budget": [{"name": "tiny", "usd": "0.000001", "window": "day"}]})
    c = client(s, aws_key(s))
    attempts: list[str] = []
    c.meta.events.register("before-send.bedrock-runtime.Converse", lambda **kw: attempts.append("sent"))
    with pytest.raises(ClientError) as raised:
        c.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
    err = raised.value.response
    assert err["Error"]["Code"] == "SpendgateRefused"
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 402
    assert err["Error"]["Message"].startswith("spendgate")
    assert "tiny" in err["Error"]["Message"]
    assert attempts == ["sent"] and fake.seen == []


def test_a_bad_signature_is_403_in_aws_shape_and_never_forwarded(servers_for: Any) -> None:
    s, fake = servers_for()
    akid, _ = aws_key(s)
    with pytest.raises(ClientError) as raised:
        client(s, (akid, "not-the-secret")).converse(modelId=MODEL, messages=MESSAGES)
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert raised.value.response["Error"]["Code"] == "AccessDeniedException"
    assert "signature" in raised.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as raised:  # an access key id spendgate never issued
        client(s, ("AKIAUNKNOWN000000000", "x")).converse(modelId=MODEL, messages=MESSAGES)
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert fake.seen == [] and charged(s) == []


def test_unsigned_and_stale_requests_are_refused(servers_for: Any) -> None:
    s, fake = servers_for()
    akid, secret = aws_key(s)
    path = f"/model/{MODEL.replace(':', '%3A')}/converse"
    body = json.dumps({"messages": MESSAGES}).encode()
    req = urllib.request.Request(s.url + path, data=body, method="POST", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(req, timeout=30)
    assert raised.value.code == 403
    assert raised.value.headers["x-amzn-ErrorType"] == "AccessDeniedException"
    assert "spendgate keys create --aws" in json.loads(raised.value.read())["message"]
    # a signature made 20 minutes ago, otherwise good
    stale = AWSRequest(method="POST", url=s.url + path, data=body, headers={"Content-Type": "application/json"})
    then = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=20)
    stale.context["timestamp"] = then.strftime("%Y%m%dT%H%M%SZ")
    stale.headers["X-Amz-Date"] = stale.context["timestamp"]
    auth = SigV4Auth(Credentials(akid, secret), "bedrock", "us-east-1")
    names = auth.signed_headers(auth.headers_to_sign(stale))
    stale.headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={auth.scope(stale)}, SignedHeaders={names}, "
        f"Signature={auth.signature(auth.string_to_sign(stale, auth.canonical_request(stale)), stale)}")
    req = urllib.request.Request(s.url + path, data=body, method="POST", headers=dict(stale.headers.items()))
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(req, timeout=30)
    assert raised.value.code == 403
    assert "15 minutes" in json.loads(raised.value.read())["message"]
    assert fake.seen == []


def test_a_revoked_key_ends_its_aws_credentials(servers_for: Any) -> None:
    s, fake = servers_for()
    _, key = keys.create(s.store, user="bo")
    creds = keys.create_aws(s.store, key)
    c = client(s, creds)
    c.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 10})
    assert keys.revoke(s.store, key.id)
    with pytest.raises(ClientError) as raised:
        c.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 10})
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert len(fake.seen) == 1


def test_32_concurrent_calls_admit_exactly_the_ones_that_fit(servers_for: Any, tmp_path: Path) -> None:
    probe, _ = servers_for()
    body = {"messages": MESSAGES, "inferenceConfig": {"maxTokens": 1000}, "model": MODEL}
    worst = probe.engine.estimator.estimate("bedrock", ROUTE, body)
    est, n_fit = worst.cost_nanos, 7
    s, fake = servers_for({"budget": [{"name": "b", "usd": str(Decimal(est * n_fit + est // 2) / 10**9),
                                       "window": "day"}]}, store=f"sqlite:///{tmp_path}/q.db")
    # each admitted call bills its full worst case, so no capture frees room for a late request
    fake.usage = {"inputTokens": worst.input_tokens, "outputTokens": 1000}
    c = client(s, aws_key(s), max_pool_connections=32, retries={"max_attempts": 1})

    def one(_: int) -> int:
        try:
            c.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 1000})
            return 200
        except ClientError as e:
            return int(e.response["ResponseMetadata"]["HTTPStatusCode"])

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(one, range(32)))
    assert codes.count(200) == n_fit and codes.count(402) == 32 - n_fit
    assert len(fake.seen) == n_fit
    assert charged(s) == [est] * n_fit


def test_keys_create_aws_prints_aws_credentials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = f"sqlite:///{tmp_path}/k.db"
    assert main(["keys", "create", "--user", "ana", "--aws", "--json", "--store", store]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["aws_access_key_id"].startswith("SGAK") and len(doc["aws_access_key_id"]) == 20
    opened = ledger_mod.open(store)
    try:
        found = keys.lookup_aws(opened, doc["aws_access_key_id"], now=time.time())
        assert found is not None and found[0].user == "ana" and found[1] == doc["aws_secret_access_key"]
    finally:
        opened.close()


def test_converse_usage_is_read_strictly() -> None:
    assert read_usage({"usage": USAGE}).input == 1200
    u = read_usage({"usage": USAGE})
    assert (u.cache_read, u.cache_write_5m, u.output) == (400, 60, 345)
    for bad in ({"inputTokens": -1, "outputTokens": 1}, {"inputTokens": "5", "outputTokens": 1},
                {"inputTokens": 5}, {"inputTokens": 5, "outputTokens": 1, "cacheReadInputTokens": 1.5}):
        with pytest.raises(UnreadableUsage):
            read_usage({"usage": bad})


INVOKE_BODY = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 500, "messages": MESSAGES}


def test_invoke_model_with_an_anthropic_body_is_charged_from_its_usage(servers_for: Any, table: PriceTable) -> None:
    s, fake = servers_for()
    out = client(s, aws_key(s)).invoke_model(modelId=MODEL, body=json.dumps(INVOKE_BODY))
    assert json.loads(out["body"].read())["content"][0]["text"] == "hello"
    assert charged(s) == [expected_cost(table)]
    assert fake.seen[-1] == (f"/model/{MODEL.replace(':', '%3A')}/invoke", INVOKE_BODY)


def test_invoke_stream_is_relayed_and_charged_from_its_anthropic_events(servers_for: Any, table: PriceTable) -> None:
    s, _ = servers_for()
    out = client(s, aws_key(s)).invoke_model_with_response_stream(modelId=MODEL, body=json.dumps(INVOKE_BODY))
    events = [json.loads(e["chunk"]["bytes"]) for e in out["body"]]
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_delta",
                                           "content_block_stop", "message_delta", "message_stop"]
    assert events[2]["delta"]["text"] == "hello"
    assert charged(s) == [expected_cost(table)]


def test_invoke_with_another_familys_body_is_refused_and_never_forwarded(servers_for: Any) -> None:
    s, fake = servers_for()
    with pytest.raises(ClientError) as raised:
        client(s, aws_key(s)).invoke_model(modelId="meta.llama3-70b-instruct-v1:0",
                                           body=json.dumps({"prompt": "hi", "max_gen_len": 10}))
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert raised.value.response["Error"]["Code"] == "ValidationException"
    assert "Converse" in raised.value.response["Error"]["Message"]
    assert fake.seen == []


def test_converse_shape_bounds_output_and_asks_for_cache_writes() -> None:
    body = {"model": MODEL, "messages": MESSAGES, "inferenceConfig": {"maxTokens": 700}}
    shape = bedrock.converse(body)
    assert (shape.requested_output, shape.cache_write, shape.stream) == (700, None, False)
    cached = {**body, "system": [{"text": "You are terse."}, {"cachePoint": {"type": "default"}}]}
    assert bedrock.converse(cached, stream=True).cache_write == "5m"
    assert bedrock.converse(cached).input_tokens > shape.input_tokens
    with pytest.raises(BadRequest):
        bedrock.converse({"model": MODEL, "messages": "hi"})


def test_a_clamped_converse_body_goes_back_in_bedrocks_shape() -> None:
    p = providers.get("bedrock")
    edited = json.dumps({"model": "global.anthropic.claude-haiku-4-5-20251001-v1:0", "messages": MESSAGES,
                         "maxTokens": 100, "inferenceConfig": {"maxTokens": 900, "temperature": 0}}).encode()
    path, out = p.upstream(f"/model/{MODEL}/converse", {"modelId": MODEL}, edited, True)
    assert path == "/model/global.anthropic.claude-haiku-4-5-20251001-v1%3A0/converse"
    assert json.loads(out) == {"messages": MESSAGES, "inferenceConfig": {"maxTokens": 100, "temperature": 0}}


def test_the_upstream_base_url_comes_from_the_policy_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ProxyConfig.from_policy(default_policy()).upstreams["bedrock"] == \
        "https://bedrock-runtime.us-east-1.amazonaws.com"
    pol = parse({"upstream": {"bedrock": "https://bedrock-runtime.eu-west-1.amazonaws.com"}})
    assert ProxyConfig.from_policy(pol).upstreams["bedrock"] == "https://bedrock-runtime.eu-west-1.amazonaws.com"
    monkeypatch.setenv("SPENDGATE_BEDROCK_BASE_URL", "http://127.0.0.1:9")
    assert ProxyConfig.from_policy(pol).upstreams["bedrock"] == "http://127.0.0.1:9"
    assert bedrock._region("https://bedrock-runtime.eu-west-1.amazonaws.com/model/x/converse") == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "ap-southeast-2")
    assert bedrock._region("http://127.0.0.1:9/model/x/converse") == "ap-southeast-2"


def test_a_bedrock_api_key_signs_the_upstream_call_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bedrock.BEARER_ENV, "bedrock-api-key-1")
    url, headers = providers.get("bedrock").sign_upstream(
        "POST", "http://127.0.0.1:9/model/x%3A0/converse",
        {"Authorization": "AWS4-HMAC-SHA256 Credential=SGAK…", "X-Amz-Date": "20261203T000000Z",
         "Content-Type": "application/json"}, b"{}")
    assert headers == {"Content-Type": "application/json", "Authorization": "Bearer bedrock-api-key-1"}
    assert str(url).endswith("/model/x%3A0/converse")


def test_a_cut_stream_ends_with_an_exception_boto3_raises_and_is_charged_input_plus_output_seen(
        servers_for: Any) -> None:
    s, fake = servers_for()
    fake.cut = True
    out = client(s, aws_key(s)).converse_stream(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
    got: list[dict[str, Any]] = []
    with pytest.raises(ClientError) as raised:
        for e in out["stream"]:
            got.append(e)
    assert "broke off the stream" in str(raised.value)
    assert [e["contentBlockDelta"]["delta"]["text"] for e in got[1:]] == ["hello", " there"]
    [event] = [e for e in (s.settled(), s.store.events(0))[1] if e.kind in SPEND_KINDS]
    assert event.kind == "unknown" and event.cost > 0
    # "hello there" relayed: 2 o200k tokens, scaled up as the input counts are
    assert event.output_tokens == math.ceil(2 * s.engine.estimator.anthropic_factor)


def test_an_unknown_bedrock_route_is_refused_in_aws_shape(servers_for: Any) -> None:
    s, fake = servers_for()
    with pytest.raises(ClientError) as raised:
        client(s, aws_key(s)).apply_guardrail(guardrailIdentifier="g1", guardrailVersion="1", source="INPUT",
                                               content=[{"text": {"text": "hi"}}])
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert raised.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert "not a route spendgate can price" in raised.value.response["Error"]["Message"]
    assert fake.seen == []


def test_converse_tool_results_are_part_of_the_tool_round() -> None:
    p = providers.get("bedrock")
    assert p.is_tool_result({"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": []}}]})
    assert not p.is_tool_result({"role": "user", "content": [{"text": "hi"}]})
