"""``/spendgate/budgets…``, ``/spendgate/pause`` and ``/spendgate/resume``: run-time budgets over the
admin API, behind the admin token.

The same operations as ``spendgate budgets`` and ``spendgate pause`` (one validation: a body is the
``[[budget]]`` table the file would hold), kept in the store so that every instance sharing it
applies them; the instance that took the change applies it at once (``proxy.live.refresh_now()``
when the server has a live refresher). Status codes: 400 a body or field that does not parse (the
message names the field), 404 nothing of that name, 409 a name the policy file owns.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from spendgate.errors import ConfigError, StoreError
from spendgate.ledger import Event
from spendgate.money import nanos_to_usd, usd_to_nanos
from spendgate.policy import Policy, runtime
from spendgate.policy.model import Rule

if TYPE_CHECKING:
    from spendgate.proxy.app import Proxy

#: who a change through the admin API is recorded as made by
BY = "admin API"
Guard = Callable[[Any], Any]


@dataclass(frozen=True)
class _Reply:
    """What a change answers: a status and a JSON document (computed off the event loop)."""

    status: int
    doc: dict[str, Any]


def add_budget_routes(app: web.Application, proxy: Proxy, guard: Guard) -> None:
    """Register the routes; ``guard`` is :func:`spendgate.proxy.admin.add_routes`' admin-token check."""
    r = app.router
    r.add_get("/spendgate/budgets", guard(_list))
    r.add_get("/spendgate/budgets/{name}", guard(_get))
    r.add_put("/spendgate/budgets/{name}", guard(_put))
    r.add_delete("/spendgate/budgets/{name}", guard(_delete))
    r.add_put("/spendgate/budgets/{name}/limits/{scope}", guard(_put_limit))
    r.add_delete("/spendgate/budgets/{name}/limits/{scope}", guard(_delete_limit))
    r.add_post("/spendgate/budgets/{name}/topup", guard(_topup))
    r.add_post("/spendgate/pause", guard(_pause))
    r.add_post("/spendgate/resume", guard(_resume))


def _err(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def file_policy(proxy: Proxy) -> Policy:
    """The policy read from the file (built-in defaults included), without the store's rules: the
    live refresher's when the server has one, else the engine's less any rule the store keeps."""
    live = getattr(proxy, "live", None)
    policy = getattr(live, "file_policy", None)
    if isinstance(policy, Policy):
        return policy
    policy = proxy.engine.policy
    stored = set(runtime.rule_records(proxy.store))
    if not stored:
        return policy
    from dataclasses import replace

    return replace(policy, rules=tuple(r for r in policy.rules if r.name not in stored))


async def _refresh(proxy: Proxy) -> None:
    """Apply a change on this instance now rather than at its next periodic read of the store."""
    live = getattr(proxy, "live", None)
    refresh = getattr(live, "refresh_now", None)
    if refresh is None:
        return
    result = await asyncio.to_thread(refresh)  # it reads the store: not on the event loop
    if inspect.isawaitable(result):
        await result


def _emit(proxy: Proxy, store_event: Event) -> None:
    proxy.store.record(store_event)
    proxy.engine.emit(store_event)  # the audit log is one of the engine's observers


async def _body(request: web.Request, shape: str) -> dict[str, Any] | web.Response:
    try:
        doc = await request.json() if request.can_read_body else {}
    except (ValueError, RecursionError):
        return _err(400, f"body must be JSON such as {shape}")
    if not isinstance(doc, dict):
        return _err(400, f"body must be a JSON object such as {shape}, got {type(doc).__name__}")
    return doc


async def _run(proxy: Proxy, fn: Callable[[], _Reply], *, changed: bool = True) -> web.Response:
    """``fn`` off the event loop (store calls block); a reply of 2xx after a change refreshes this
    instance before it answers, so the next request here is decided under the change."""
    try:
        reply = await asyncio.to_thread(fn)
    except ConfigError as exc:
        return _err(400, str(exc))
    except StoreError as exc:
        return _err(503, f"the store failed, so nothing changed: {exc}")
    if changed and reply.status < 300:
        await _refresh(proxy)
    return web.json_response(reply.doc, status=reply.status)


def _docs(proxy: Proxy) -> list[dict[str, Any]]:
    return runtime.listing(proxy.store, file_policy(proxy))


async def _list(request: web.Request, proxy: Proxy) -> web.Response:
    return await _run(proxy, lambda: _Reply(200, {"budgets": _docs(proxy)}), changed=False)


async def _get(request: web.Request, proxy: Proxy) -> web.Response:
    name = request.match_info["name"]

    def find() -> _Reply:
        doc = next((d for d in _docs(proxy) if d["name"] == name), None)
        if doc is None:
            return _Reply(404, {"error": {"message": f'budget "{name}": no such budget'}})
        return _Reply(200, doc)

    return await _run(proxy, find, changed=False)


async def _put(request: web.Request, proxy: Proxy) -> web.Response:
    name = request.match_info["name"]
    body = await _body(request, '{"usd": "10", "window": "day", "per": "user"}')
    if isinstance(body, web.Response):
        return body
    if "name" in body and body["name"] != name:
        return _err(400, f'budget "{name}".name: the body names {body["name"]!r}; leave it out or give the same '
                         "name as the path")

    def put() -> _Reply:
        policy = file_policy(proxy)
        if any(r.name == name for r in policy.rules):
            return _Reply(409, {"error": {"message": f'budget "{name}": a budget of this name is in the policy '
                                                     "file; a run-time budget needs a name of its own"}})
        now = time.time()
        existed = runtime.get_table(proxy.store, name, now=now) is not None
        rule = runtime.put_rule(proxy.store, {**body, "name": name}, file_rules=policy.rules, by=BY,
                                default_tz=policy.timezone, now=now)
        change = "set" if existed else "add"
        _emit(proxy, runtime.change_event(change, by=BY, rule=name, now=now,
                                          amounts={"limit_usd": usd_to_nanos(rule.usd)} if rule.usd is not None
                                          else {}))
        doc = next(d for d in runtime.listing(proxy.store, policy, now=now) if d["name"] == name)
        return _Reply(200 if existed else 201, {"change": change, "budget": doc})

    return await _run(proxy, put)


async def _delete(request: web.Request, proxy: Proxy) -> web.Response:
    name = request.match_info["name"]

    def delete() -> _Reply:
        policy = file_policy(proxy)
        if any(r.name == name for r in policy.rules):
            return _Reply(409, {"error": {"message": f'budget "{name}": it is in the policy file; remove it there'}})
        if not runtime.remove_rule(proxy.store, name, file_rules=policy.rules):
            return _Reply(404, {"error": {"message": f'budget "{name}": no run-time budget of this name'}})
        _emit(proxy, runtime.change_event("remove", by=BY, rule=name))
        return _Reply(200, {"change": "remove", "removed": name})

    return await _run(proxy, delete)


def _rule(proxy: Proxy, policy: Policy, name: str) -> Rule | None:
    found = runtime.find_rule(proxy.store, name, policy.rules, default_tz=policy.timezone)
    return found[0] if found is not None else None


def _no_rule(name: str) -> _Reply:
    return _Reply(404, {"error": {"message": f'budget "{name}": no such budget in the policy file or the store'}})


async def _put_limit(request: web.Request, proxy: Proxy) -> web.Response:
    name = request.match_info["name"]
    body = await _body(request, '{"usd": "100"}')
    if isinstance(body, web.Response):
        return body
    unknown = sorted(set(body) - {"usd", "tokens", "requests"})
    if unknown:
        return _err(400, f"{unknown[0]}: unknown field; expected usd, tokens and/or requests")

    def put() -> _Reply:
        policy = file_policy(proxy)
        rule = _rule(proxy, policy, name)
        if rule is None:
            return _no_rule(name)
        scope = runtime.limit_scope(proxy.store, rule, runtime.parse_scope(request.match_info["scope"], "scope"))
        now = time.time()
        lim = runtime.set_limit(proxy.store, rule, scope, usd=body.get("usd"), tokens=body.get("tokens"),
                                requests=body.get("requests"), by=BY, now=now)
        rows = runtime.bucket_rows(proxy.store, rule, scope, now)
        _emit(proxy, runtime.change_event(
            "limit", by=BY, rule=name, scope=scope, now=now, bucket=rows[0]["bucket"] if rows else "",
            amounts={f"limit_{u}": v for u, v in (("usd", lim.usd), ("tokens", lim.tokens),
                                                  ("requests", lim.requests)) if v is not None},
            cleared="false"))
        return _Reply(200, {"change": "limit", "rule": name, "scope": scope, "cleared": False, "buckets": rows,
                            "refuses": any(r["refuses"] for r in rows)})

    return await _run(proxy, put)


async def _delete_limit(request: web.Request, proxy: Proxy) -> web.Response:
    name = request.match_info["name"]

    def delete() -> _Reply:
        policy = file_policy(proxy)
        rule = _rule(proxy, policy, name)
        if rule is None:
            return _no_rule(name)
        scope = runtime.limit_scope(proxy.store, rule, runtime.parse_scope(request.match_info["scope"], "scope"))
        if not runtime.clear_limit(proxy.store, name, scope):
            return _Reply(404, {"error": {"message": f'budget "{name}": {scope} has no limit of its own'}})
        now = time.time()
        rows = runtime.bucket_rows(proxy.store, rule, scope, now)
        _emit(proxy, runtime.change_event("limit", by=BY, rule=name, scope=scope, now=now,
                                          bucket=rows[0]["bucket"] if rows else "", cleared="true"))
        return _Reply(200, {"change": "limit", "rule": name, "scope": scope, "cleared": True, "buckets": rows,
                            "refuses": any(r["refuses"] for r in rows)})

    return await _run(proxy, delete)


async def _topup(request: web.Request, proxy: Proxy) -> web.Response:
    name = request.match_info["name"]
    body = await _body(request, '{"scope": "user=alice", "usd": "20"}')
    if isinstance(body, web.Response):
        return body
    if "usd" not in body:
        return _err(400, 'usd: missing; send the dollars to add, e.g. {"scope": "user=alice", "usd": "20"}')

    def top() -> _Reply:
        from spendgate.policy.parse import parse_usd

        policy = file_policy(proxy)
        rule = _rule(proxy, policy, name)
        if rule is None:
            return _no_rule(name)
        scope = runtime.bucket_scope(proxy.store, rule,
                                     runtime.parse_scope(str(body.get("scope", "global")), "scope"))
        nanos = usd_to_nanos(parse_usd(body["usd"], "usd"))
        now = time.time()
        rb = runtime.topup(proxy.store, rule, scope, nanos, by=BY, now=now,
                           override=runtime.get_limit(proxy.store, name, scope, now=now))
        [row] = [r for r in runtime.bucket_rows(proxy.store, rule, scope, now) if r["unit"] == "usd"]
        _emit(proxy, runtime.change_event("topup", by=BY, rule=name, scope=scope, bucket=rb.key, now=now,
                                          amounts={"topup_usd": nanos, "limit_usd": usd_to_nanos(row["limit"])}))
        return _Reply(200, {"change": "topup", "rule": name, "scope": scope, "bucket": rb.key,
                            "topup_usd": str(nanos_to_usd(nanos)), "limit_usd": row["limit"],
                            "spent_usd": row["spent"], "held_usd": row["held"], "remaining_usd": row["remaining"]})

    return await _run(proxy, top)


async def _pause(request: web.Request, proxy: Proxy) -> web.Response:
    body = await _body(request, '{"scope": "key=1a2b3c4d", "reason": "incident 42"}')
    if isinstance(body, web.Response):
        return body
    reason = body.get("reason") or ""
    if not isinstance(reason, str):
        return _err(400, f"reason: expected text, got {reason!r}")

    def pause() -> _Reply:
        scope = runtime.parse_scope(str(body.get("scope", "global")), "scope")
        now = time.time()
        p = runtime.pause(proxy.store, scope, by=BY, reason=reason, now=now)
        _emit(proxy, runtime.change_event("pause", by=BY, scope=scope, now=now, reason=reason))
        return _Reply(200, {"change": "pause", **p.as_dict()})

    return await _run(proxy, pause)


async def _resume(request: web.Request, proxy: Proxy) -> web.Response:
    body = await _body(request, '{"scope": "key=1a2b3c4d"}')
    if isinstance(body, web.Response):
        return body

    def resume() -> _Reply:
        scope = runtime.parse_scope(str(body.get("scope", "global")), "scope")
        if not runtime.resume(proxy.store, scope):
            return _Reply(404, {"error": {"message": f"{scope} is not paused"}})
        _emit(proxy, runtime.change_event("resume", by=BY, scope=scope))
        return _Reply(200, {"change": "resume", "scope": scope, "by": BY})

    return await _run(proxy, resume)
