"""``flat_holds``: a route spendgate cannot price, passed through under a fixed hold the config names."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from spendgate import ledger
from spendgate.engine import Engine
from spendgate.errors import ConfigError
from spendgate.money import usd_to_nanos
from spendgate.policy.parse import parse
from spendgate.proxy.app import Proxy, ProxyConfig
from spendgate.report import SPEND_KINDS
from tests.conftest import store_url
from tests.harness import Servers

PATH = "/v1/audio/transcriptions"
HOLD = usd_to_nanos("0.50")


def flat_policy(budget_usd: str | None = None, **holds: Any) -> Any:
    doc: dict[str, Any] = {"flat_holds": holds or {PATH: 0.50}, "defaults": False}
    if budget_usd is not None:
        doc["budget"] = [{"name": "total", "usd": budget_usd, "window": "total"}]
    return parse(doc)


@pytest.fixture
def servers(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    made: list[Servers] = []

    def make(policy: Any, kind: str = "memory") -> Servers:
        s = Servers(policy, store_url(kind, tmp_path, request))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def spend(s: Servers) -> list[Any]:
    s.settled()
    return [e for e in s.store.events(0) if e.kind in SPEND_KINDS]


def post(s: Servers, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(s.url + path, data=b"--x\r\n\r\naudio\r\n--x--\r\n", method="POST",
                                 headers={"Authorization": "Bearer sk-test", "Content-Type":
                                          "multipart/form-data; boundary=x", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_openai_transcription_is_charged_exactly_the_flat_amount(servers: Any, kind: str) -> None:
    s = servers(flat_policy("10"), kind)
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="sk-test", max_retries=0)
    audio = io.BytesIO(b"RIFF....WAVEfmt fake audio bytes")
    audio.name = "a.wav"
    out = client.audio.transcriptions.create(model="whisper-1", file=audio)
    assert out.text == "hello"
    [seen] = [x for x in s.mock.seen if x.path == PATH]
    assert b"fake audio bytes" in seen.body  # forwarded unchanged, multipart and all
    [event] = spend(s)
    assert (event.cost, event.estimated, event.model, event.provider) == (HOLD, True, PATH, "openai")
    [st] = s.store.states(s.store.known_buckets(), now=0)
    assert (st.spent, st.held) == (HOLD, 0)


def test_an_error_status_releases_the_hold(servers: Any) -> None:
    s = servers(flat_policy("10"))
    status, body = post(s, PATH, {"x-mock": "fail"})
    assert (status, body["error"]["message"]) == (400, "bad audio")
    assert spend(s) == []
    [st] = s.store.states(s.store.known_buckets(), now=0)
    assert (st.spent, st.held) == (0, 0)


def test_a_budget_that_fits_n_flat_holds_admits_exactly_n(servers: Any) -> None:
    s = servers(flat_policy("1.75", **{PATH: "0.25"}))  # seven holds of $0.25
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: post(s, PATH)[0], range(16)))
    assert sorted(statuses) == [200] * 7 + [402] * 9
    assert s.mock.reached(PATH) == 7
    assert sum(e.cost for e in spend(s)) == 7 * usd_to_nanos("0.25")


def test_unlisted_unknown_route_is_still_refused_and_not_forwarded(servers: Any) -> None:
    s = servers(flat_policy("10"))
    status, body = post(s, "/v1/audio/speech")
    assert status == 404
    assert body["error"]["code"] == "spendgate_unknown_route"
    assert "flat_holds" in body["error"]["message"]  # the refusal names the way through
    assert s.mock.reached("/v1/audio/speech") == 0
    assert spend(s) == []


def test_a_dry_run_prices_the_flat_hold_and_sends_nothing(servers: Any) -> None:
    s = servers(flat_policy("10"))
    status, body = post(s, PATH, {"X-Spendgate-Estimate": "1"})
    assert (status, body["allowed"]) == (200, True)
    assert body["spendgate"]["estimate_usd"] == "0.5"
    assert s.mock.reached(PATH) == 0


@pytest.mark.parametrize(("holds", "named", "says"), [
    ({"v1/audio/transcriptions": 0.5}, 'flat_holds."v1/audio/transcriptions"', "starting with"),
    ({"/v1/audio/{x}": 0.5}, 'flat_holds."/v1/audio/{x}"', "no {template}"),
    ({PATH: -1}, f'flat_holds."{PATH}"', "non-negative"),
    ({PATH: "half"}, f'flat_holds."{PATH}"', "0.50"),
    ({PATH: True}, f'flat_holds."{PATH}"', "number of dollars"),
])
def test_bad_flat_holds_name_the_key(holds: dict[str, Any], named: str, says: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse({"flat_holds": holds})
    assert str(exc.value).startswith(named + ":")
    assert says in str(exc.value)


def test_flat_holds_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match=r"^flat_holds: expected a table"):
        parse({"flat_holds": 0.5})


def test_a_priced_route_cannot_be_a_flat_hold() -> None:
    store = ledger.open("memory://")
    try:
        with pytest.raises(ConfigError, match=r'^flat_holds."/v1/chat/completions": this route is already priced'):
            Proxy(Engine(flat_policy(**{"/v1/chat/completions": 0.5}), store), ProxyConfig())
    finally:
        store.close()


def test_no_flat_holds_keeps_the_policy_hash() -> None:
    from spendgate.policy.model import policy_hash

    assert policy_hash(parse({})) == policy_hash(parse({"flat_holds": {}}))
    assert policy_hash(parse({})) != policy_hash(parse({"flat_holds": {PATH: 0.5}}))


def test_a_held_flat_request_passes_once_approved_by_id(servers: Any) -> None:
    s = servers(parse({"flat_holds": {PATH: 0.5}, "defaults": False,
                       "budget": [{"name": "soft", "usd": 0.1, "window": "request", "action": "hold"}]}))
    status, body = post(s, PATH)
    assert (status, body["spendgate"]["action"], body["spendgate"]["rule"]) == (402, "hold", "soft")
    assert s.mock.reached(PATH) == 0
    req = urllib.request.Request(f"{s.url}/spendgate/approvals/{body['spendgate']['decision_id']}", data=b"{}",
                                 method="POST", headers={"Authorization": "Bearer admin-secret"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    assert post(s, PATH)[0] == 200
    assert [e.cost for e in spend(s)] == [HOLD]
    assert post(s, PATH)[0] == 402, "approved once"
