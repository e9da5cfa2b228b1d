"""``spendgate.wrap`` of a boto3 ``bedrock-runtime`` client: the guard in-process, on botocore's own
event hooks, against the fake Bedrock upstream (which checks each request's SigV4 signature)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

import spendgate
from spendgate.policy import default_policy, parse
from spendgate.pricing.table import PriceTable
from spendgate.report import SPEND_KINDS
from spendgate.sdk import _runtime
from tests.harness import Servers
from tests.test_bedrock import (
    INVOKE_BODY,
    MESSAGES,
    MODEL,
    PROXY_KEY,
    PROXY_SECRET,
    ROUTE,
    USAGE,
    FakeBedrock,
    expected_cost,
    proxy_credentials,
    servers_for,
    table,
)

__all__ = ["proxy_credentials", "servers_for", "table"]  # the fixtures, shared with the proxy's tests

STREAM_ROUTE = "/model/{modelId}/converse-stream"


@pytest.fixture
def fake(servers_for: Any) -> Iterator[tuple[Servers, FakeBedrock]]:
    """The fake Bedrock, reached straight from a wrapped client (the proxy is not in the path)."""
    spendgate.configure(store="memory://", policy=default_policy())
    yield servers_for()
    spendgate.configure(store="memory://", policy=default_policy())


def bedrock_client(s: Servers, **config: Any) -> Any:
    """A stock client signing with the upstream's credentials, as a service calling Bedrock does."""
    return boto3.client("bedrock-runtime", endpoint_url=s.proxy.config.upstreams["bedrock"], region_name="us-east-1",
                        aws_access_key_id=PROXY_KEY, aws_secret_access_key=PROXY_SECRET,
                        config=Config(**config) if config else None)


def events() -> list[Any]:
    return [e for e in _runtime.engine().ledger.events(0) if e.kind in SPEND_KINDS]


def test_wrap_returns_the_same_client_and_charges_converse_to_the_nano_dollar(
        fake: tuple[Servers, FakeBedrock], table: PriceTable) -> None:
    s, upstream = fake
    raw = bedrock_client(s)
    c = spendgate.wrap(raw)
    assert c is raw and spendgate.wrap(c) is c
    out = c.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
    assert out["output"]["message"]["content"][0]["text"] == "hello"
    assert [e.cost for e in events()] == [expected_cost(table)]
    [event] = events()
    assert (event.provider, event.model, event.estimated) == ("bedrock", MODEL, False)
    # sent as boto3 sends it: the model id percent-encoded, the body unchanged
    assert upstream.seen == [(f"/model/{MODEL.replace(':', '%3A')}/converse",
                              {"messages": MESSAGES, "inferenceConfig": {"maxTokens": 500}})]


def test_converse_stream_is_charged_from_its_metadata_event(fake: tuple[Servers, FakeBedrock],
                                                            table: PriceTable) -> None:
    s, _ = fake
    c = spendgate.wrap(bedrock_client(s))
    out = c.converse_stream(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
    assert events() == [], "charged as the stream is read"
    got = list(out["stream"])
    assert "".join(e["contentBlockDelta"]["delta"]["text"] for e in got if "contentBlockDelta" in e) == "hello there"
    assert got[-1]["metadata"]["usage"] == USAGE
    assert [e.cost for e in events()] == [expected_cost(table)]
    out["stream"].close()
    assert len(events()) == 1, "settled once"


def test_invoke_model_and_its_stream_are_charged_from_the_anthropic_usage(fake: tuple[Servers, FakeBedrock],
                                                                         table: PriceTable) -> None:
    s, upstream = fake
    c = spendgate.wrap(bedrock_client(s))
    # a file-like body is read once and sent as it was
    out = c.invoke_model(modelId=MODEL, body=io.BytesIO(json.dumps(INVOKE_BODY).encode()))
    assert json.loads(out["body"].read())["content"][0]["text"] == "hello"
    assert upstream.seen[-1] == (f"/model/{MODEL.replace(':', '%3A')}/invoke", INVOKE_BODY)
    streamed = c.invoke_model_with_response_stream(modelId=MODEL, body=json.dumps(INVOKE_BODY))
    assert [json.loads(e["chunk"]["bytes"])["type"] for e in streamed["body"]][-1] == "message_stop"
    assert [e.cost for e in events()] == [expected_cost(table)] * 2


def test_a_refusal_is_a_client_error_and_budget_exceeded_and_nothing_is_sent(
        fake: tuple[Servers, FakeBedrock]) -> None:
    s, upstream = fake
    spendgate.configure(store="memory://", policy=parse({"budget": [{"name": "tiny", "usd": 0.000001,
                                                                       "window": "day"}]}))
    c = spendgate.wrap(bedrock_client(s))
    for call in (c.converse, c.converse_stream):
        with pytest.raises(ClientError) as err:
            call(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
        assert isinstance(err.value, spendgate.BudgetExceeded)
        assert 'budget "tiny"' in str(err.value)
        assert err.value.response["Error"]["Code"] == "SpendgateRefused"
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 402
    assert upstream.seen == []
    assert events() == []


def test_32_concurrent_calls_admit_exactly_the_ones_that_fit(fake: tuple[Servers, FakeBedrock]) -> None:
    s, upstream = fake
    body = {"messages": MESSAGES, "inferenceConfig": {"maxTokens": 1000}, "model": MODEL}
    worst = _runtime.engine().estimator.estimate("bedrock", ROUTE, body)
    est, n_fit = worst.cost_nanos, 7
    spendgate.configure(store="memory://", policy=parse({"budget": [
        {"name": "b", "usd": str(Decimal(est * n_fit + est // 2) / 10**9), "window": "day"}]}))
    # each admitted call bills its whole worst case, so no capture frees room for a late one
    upstream.usage = {"inputTokens": worst.input_tokens, "outputTokens": 1000}
    c = spendgate.wrap(bedrock_client(s, max_pool_connections=32, retries={"max_attempts": 1}))

    def one(_: int) -> int:
        try:
            c.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 1000})
            return 200
        except ClientError as e:
            assert isinstance(e, spendgate.BudgetExceeded)
            return int(e.response["ResponseMetadata"]["HTTPStatusCode"])

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(one, range(32)))
    assert codes.count(200) == n_fit and codes.count(402) == 32 - n_fit
    assert len(upstream.seen) == n_fit
    assert [e.cost for e in events()] == [est] * n_fit


def test_a_stream_closed_early_is_charged_for_what_was_produced(fake: tuple[Servers, FakeBedrock]) -> None:
    s, upstream = fake
    upstream.cut = True  # the upstream sends its first text events, then nothing more
    c = spendgate.wrap(bedrock_client(s))
    out = c.converse_stream(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
    stream = out["stream"]
    got = [next(iter(stream)), next(iter(stream))]
    assert got[1]["contentBlockDelta"]["delta"]["text"] == "hello"
    stream.close()
    [event] = events()
    factor = _runtime.engine().estimator.anthropic_factor
    # "hello there" reached the client's buffer: 2 o200k tokens, scaled up as the input counts are
    assert (event.kind, event.estimated, event.output_tokens) == ("unknown", True, math.ceil(2 * factor))
    worst = _runtime.engine().estimator.estimate(
        "bedrock", STREAM_ROUTE, {"messages": MESSAGES, "inferenceConfig": {"maxTokens": 500}, "model": MODEL})
    assert 0 < event.cost < worst.cost_nanos


def test_a_stream_broken_off_is_charged_input_plus_output_relayed(fake: tuple[Servers, FakeBedrock]) -> None:
    s, upstream = fake
    upstream.cut = True
    c = spendgate.wrap(bedrock_client(s))
    out = c.converse_stream(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
    got: list[dict[str, Any]] = []
    with pytest.raises(Exception):  # noqa: B017 - urllib3's, as boto3 raises a dropped connection
        for e in out["stream"]:
            got.append(e)
    assert [e["contentBlockDelta"]["delta"]["text"] for e in got[1:]] == ["hello", " there"]
    [event] = events()
    factor = _runtime.engine().estimator.anthropic_factor
    assert (event.kind, event.output_tokens) == ("unknown", math.ceil(2 * factor))


def test_a_clamp_is_written_before_the_request_is_signed(fake: tuple[Servers, FakeBedrock]) -> None:
    s, upstream = fake
    spendgate.configure(store="memory://", policy=parse({"budget": [
        {"name": "small", "usd": 0.005, "window": "request", "action": "clamp", "min_output": 16}]}))
    c = spendgate.wrap(bedrock_client(s, retries={"max_attempts": 1}))
    c.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 60000})
    # the fake verified the signature over the clamped body
    [(path, sent)] = upstream.seen
    assert path == f"/model/{MODEL.replace(':', '%3A')}/converse"
    assert set(sent) == {"messages", "inferenceConfig"}
    assert 16 <= sent["inferenceConfig"]["maxTokens"] < 60000
    [clamp] = [e for e in _runtime.engine().ledger.events(0) if e.kind == "clamp"]
    assert clamp.output_tokens == sent["inferenceConfig"]["maxTokens"]


def test_a_failure_after_the_hold_releases_it(fake: tuple[Servers, FakeBedrock], table: PriceTable) -> None:
    s, upstream = fake
    body = {"messages": MESSAGES, "inferenceConfig": {"maxTokens": 500}, "model": MODEL}
    est = _runtime.engine().estimator.estimate("bedrock", ROUTE, body).cost_nanos
    spendgate.configure(store="memory://", policy=parse({"budget": [
        {"name": "one", "usd": str(Decimal(est + est // 2) / 10**9), "window": "day"}]}))
    c = spendgate.wrap(bedrock_client(s, retries={"max_attempts": 1}))

    def refuse_to_send(**_: Any) -> None:
        raise RuntimeError("no network here")

    c.meta.events.register("before-send.bedrock-runtime.Converse", refuse_to_send, unique_id="t-refuse")
    with pytest.raises(RuntimeError, match="no network here"):
        c.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
    c.meta.events.unregister("before-send.bedrock-runtime.Converse", unique_id="t-refuse")
    # the upstream refuses the call (a signature it cannot verify): an error status, nothing billed
    bad = spendgate.wrap(boto3.client("bedrock-runtime", endpoint_url=s.proxy.config.upstreams["bedrock"],
                                      region_name="us-east-1", aws_access_key_id=PROXY_KEY,
                                      aws_secret_access_key="wrong", config=Config(retries={"max_attempts": 1})))
    with pytest.raises(ClientError) as err:
        bad.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
    assert not isinstance(err.value, spendgate.BudgetExceeded)
    assert upstream.seen == [] and events() == []
    # both holds were released: the one call the budget fits is admitted
    c.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
    assert [e.cost for e in events()] == [expected_cost(table)]


def test_only_the_wrapped_client_is_guarded_and_other_services_are_refused(
        fake: tuple[Servers, FakeBedrock], table: PriceTable) -> None:
    s, _ = fake
    spendgate.wrap(bedrock_client(s))
    bedrock_client(s).converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
    assert events() == [], "another client of the same session carries no handlers"
    s3 = boto3.client("s3", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    with pytest.raises(TypeError, match="bedrock-runtime"):
        spendgate.wrap(s3)
