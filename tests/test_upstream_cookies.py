"""The proxy's one upstream connection pool is shared by every client: a cookie an upstream sets
in its answer to one caller (a load balancer's, a bot-management one) must never ride along on
another caller's request. The proxy keeps no cookie jar; a client's own Cookie header still passes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from aiohttp import web

from spendgate.demo.upstream import FakeUpstream
from spendgate.policy import default_policy
from tests.harness import Servers


@pytest.fixture
def servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Servers]:
    plain = FakeUpstream.app

    def app(self: FakeUpstream) -> web.Application:
        a = plain(self)

        async def set_cookie(request: web.Request, response: web.StreamResponse) -> None:
            caller = request.headers.get("Authorization", "")[-5:]
            response.headers["Set-Cookie"] = f"lb=for-{caller}; Path=/; Max-Age=3600"

        a.on_response_prepare.append(set_cookie)
        return a

    monkeypatch.setattr(FakeUpstream, "app", app)
    s = Servers(default_policy(), f"sqlite:///{tmp_path}/c.db")
    # by a host name, as a real upstream is reached (aiohttp's jar ignores cookies of bare IP hosts)
    s.proxy.config.upstreams = {p: f"http://localhost:{s.upstream_port}" for p in s.proxy.config.upstreams}
    yield s
    s.close()


def test_an_upstream_cookie_never_reaches_another_callers_request(servers: Servers) -> None:
    for key in ("sk-alice", "sk-bobby", "sk-alice"):
        client = openai.OpenAI(base_url=f"{servers.url}/v1", api_key=key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
        assert raw.headers["set-cookie"].startswith(f"lb=for-{key[-5:]}"), "the client still gets its cookie"
    assert len(servers.mock.seen) == 3
    assert [s.headers.get("Cookie") for s in servers.mock.seen] == [None, None, None]


def test_a_clients_own_cookie_header_is_forwarded(servers: Servers) -> None:
    client = openai.OpenAI(base_url=f"{servers.url}/v1", api_key="sk-carol", max_retries=0,
                           default_headers={"Cookie": "session=mine"})
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=10)
    assert servers.mock.seen[-1].headers.get("Cookie") == "session=mine"
