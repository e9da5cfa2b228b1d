from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from spendgate import ledger as ledger_mod
from spendgate.ledger import Ledger
from tests.redis_server import RedisServer

if TYPE_CHECKING:
    from tests.harness import Servers

BACKENDS = ["memory", "sqlite", "redis"]
T = TypeVar("T")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the run; each test gets its own key prefix on it."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def store_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return f"{server.url}?prefix={uuid.uuid4().hex[:12]}"
    return f"sqlite:///{tmp_path / 'spend.db'}"


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One ledger contract, run against every backend."""
    return store_url(request.param, tmp_path, request)


@pytest.fixture
def store(backend_url: str) -> Iterator[Ledger]:
    led = ledger_mod.open(backend_url)
    yield led
    led.close()


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read or write the developer's real ~/.spendgate; one server process per `spendgate
    serve` a test starts, unless it asks for workers (the default is one per core)."""
    monkeypatch.setenv("SPENDGATE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPENDGATE_WORKERS", "1")
    for var in ("SPENDGATE_STORE", "SPENDGATE_CONFIG"):
        monkeypatch.delenv(var, raising=False)


def race(n: int, fn: Callable[[], T]) -> list[T]:
    """Run ``fn`` on ``n`` threads released at the same instant; their results, in no order."""
    start = threading.Barrier(n)
    results: list[T] = []
    lock = threading.Lock()

    def worker() -> None:
        start.wait()
        r = fn()
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class NetworkBlocked(AssertionError):
    pass


def _refuse(*args: object, **kwargs: object) -> None:
    raise NetworkBlocked(f"network access attempted: {args!r}")


@pytest.fixture(scope="module")
def no_network() -> Iterator[None]:
    """Any attempt to open a socket fails the test (module-wide, so property tests are covered)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _refuse)
        mp.setattr(socket.socket, "connect_ex", _refuse)
        mp.setattr(socket, "create_connection", _refuse)
        mp.setattr(socket, "getaddrinfo", _refuse)
        yield


@pytest.fixture
def upstream() -> Iterator[Servers]:
    """The fake provider alone, on loopback, for tests that start ``spendgate serve`` processes
    (a test module may define its own, billing differently)."""
    from spendgate.policy import default_policy
    from tests.harness import Servers

    s = Servers(default_policy(), "memory://")  # only its fake upstream is used
    yield s
    s.close()
