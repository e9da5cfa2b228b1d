"""``spendgate serve --tls-cert FILE --tls-key FILE``: HTTPS, with a throwaway self-signed certificate
the clients are told to trust, through real ``serve`` processes (one and two workers)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import openai
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from spendgate import keys, ledger
from spendgate.pricing.table import PriceTable
from spendgate.providers import bedrock
from spendgate.report import SPEND_KINDS
from tests.harness import Servers, free_port
from tests.test_bedrock import MESSAGES, MODEL, PROXY_KEY, PROXY_SECRET, FakeBedrock, expected_cost
from tests.test_workers import BILLED, BILLED_NANOS, BODY


def _pem_pair(tmp: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spendgate test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


class Serve:
    """``spendgate serve`` over TLS as its own process, its upstreams chosen by the test."""

    def __init__(self, home: Path, upstreams: dict[str, str], *args: str, env: dict[str, str] | None = None
                 ) -> None:
        self.port = free_port()
        full = {**os.environ, "HOME": str(home), "SPENDGATE_HOME": str(home / ".spendgate"), **(env or {}),
                **{f"SPENDGATE_{name.upper()}_BASE_URL": url for name, url in upstreams.items()}}
        self.proc = subprocess.Popen([sys.executable, "-m", "spendgate.cli.main", "serve", "--port", str(self.port),
                                      *args], env=full, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        self.banner = self.proc.stderr.readline()  # printed once every worker listens
        assert "guarding" in self.banner, self.banner + self.proc.stderr.read()

    def stop(self) -> str:
        self.proc.terminate()
        code = self.proc.wait(timeout=60)
        assert self.proc.stderr is not None
        said = self.proc.stderr.read()
        assert code == 0, said
        return said

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def upstream() -> Iterator[Servers]:
    from spendgate.policy import default_policy

    s = Servers(default_policy(), "memory://")
    yield s
    s.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_openai_client_trusting_the_certificate_is_served_over_https_and_charged_exactly(
        tmp_path: Path, upstream: Servers, workers: str) -> None:
    cert, key = _pem_pair(tmp_path)
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    (tmp_path / "p.toml").write_text("defaults = false\n")
    s = Serve(tmp_path, {"openai": f"http://127.0.0.1:{upstream.upstream_port}"}, "--store", url,
              "--config", str(tmp_path / "p.toml"), "--workers", workers, "--tls-cert", str(cert),
              "--tls-key", str(key))
    try:
        assert f"guarding https://127.0.0.1:{s.port} " in s.banner
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{s.port}/v1", api_key="sk-client", max_retries=0,
                               default_headers={"x-mock-usage": json.dumps(BILLED)},
                               http_client=openai.DefaultHttpxClient(verify=str(cert)))
        for _ in range(4):
            out = client.chat.completions.with_raw_response.create(**BODY)
            assert out.http_response.status_code == 200
            assert out.http_response.url.scheme == "https"
        # a client that does not trust the certificate is refused by its own TLS check
        stranger = openai.OpenAI(base_url=f"https://127.0.0.1:{s.port}/v1", api_key="sk-client", max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            stranger.chat.completions.create(**BODY)
        # plain HTTP to the TLS port is not served
        plain = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="sk-client", max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            plain.chat.completions.create(**BODY)
        for c in (client, stranger, plain):
            c.close()
        s.stop()
    finally:
        s.kill()
    store = ledger.open(url)
    try:
        assert [e.cost for e in store.events(0) if e.kind in SPEND_KINDS] == [BILLED_NANOS] * 4
    finally:
        store.close()
    assert upstream.mock.reached("/v1/chat/completions") == 4


@pytest.fixture
def fake_bedrock() -> Iterator[str]:
    from spendgate.demo.background import BackgroundLoop

    bg = BackgroundLoop()
    port = bg.serve(FakeBedrock().app())
    yield f"http://127.0.0.1:{port}"
    bg.close()


def test_boto3_over_https_signs_with_virtual_credentials_and_sends_a_bearer_token(
        tmp_path: Path, fake_bedrock: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = _pem_pair(tmp_path)
    url = f"sqlite:///{tmp_path / 'spend.db'}"
    store = ledger.open(url)
    secret, vkey = keys.create(store, user="ana")
    access_key_id, secret_access_key = keys.create_aws(store, vkey)
    store.close()
    proxy_creds = {"AWS_ACCESS_KEY_ID": PROXY_KEY, "AWS_SECRET_ACCESS_KEY": PROXY_SECRET}
    s = Serve(tmp_path, {"bedrock": fake_bedrock}, "--store", url, "--tls-cert", str(cert), "--tls-key", str(key),
              "--workers", "2", env=proxy_creds)
    endpoint = f"https://127.0.0.1:{s.port}"
    try:
        # virtual AWS credentials (SigV4) over HTTPS: served and charged from the Bedrock row
        signed = boto3.client("bedrock-runtime", endpoint_url=endpoint, region_name="us-east-1", verify=str(cert),
                              aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key)
        out = signed.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
        assert out["output"]["message"]["content"][0]["text"] == "hello"

        # a Bedrock API key (bearer token): botocore sends none to plain HTTP …
        monkeypatch.setenv(bedrock.BEARER_ENV, secret)
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(var, raising=False)
        plain = boto3.client("bedrock-runtime", endpoint_url=f"http://127.0.0.1:{s.port}", region_name="us-east-1",
                             config=Config(retries={"max_attempts": 1}))
        with pytest.raises(Exception, match="Bearer authorization requires an HTTPS endpoint"):
            plain.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
        # … and sends it over HTTPS, where spendgate takes a spendgate key as the bearer token: served
        # and charged as that key, re-signed upstream with the proxy's own AWS credentials
        bearer = boto3.client("bedrock-runtime", endpoint_url=endpoint, region_name="us-east-1", verify=str(cert),
                              config=Config(retries={"max_attempts": 1}))
        out = bearer.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
        assert out["output"]["message"]["content"][0]["text"] == "hello"
        # a bearer token that is no spendgate key is refused in AWS's shape, nothing forwarded or charged
        monkeypatch.setenv(bedrock.BEARER_ENV, "ABSKnot-a-spendgate-key")
        stranger = boto3.client("bedrock-runtime", endpoint_url=endpoint, region_name="us-east-1", verify=str(cert),
                                config=Config(retries={"max_attempts": 1}))
        with pytest.raises(ClientError) as refused:
            stranger.converse(modelId=MODEL, messages=MESSAGES, inferenceConfig={"maxTokens": 500})
        err: Any = refused.value.response
        assert err["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert "not a spendgate key" in err["Error"]["Message"]
        s.stop()
    finally:
        s.kill()
    store = ledger.open(url)
    try:
        spent = [e for e in store.events(0) if e.kind in SPEND_KINDS]
        assert [e.cost for e in spent] == [expected_cost(PriceTable.bundled())] * 2  # SigV4, then the bearer token
        assert len({e.dims["key"] for e in spent}) == 1 and spent[0].dims["key"].startswith(vkey.id)  # one key
    finally:
        store.close()


def _serve_fails(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "HOME": str(tmp_path), "SPENDGATE_HOME": str(tmp_path / ".spendgate")}
    done = subprocess.run([sys.executable, "-m", "spendgate.cli.main", "serve", "--port", str(free_port()),
                           "--store", f"sqlite:///{tmp_path / 'spend.db'}", *args], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "guarding" not in done.stderr, done.stderr
    return done.stderr


def test_each_way_the_certificate_or_key_is_wrong_is_one_line_naming_it(tmp_path: Path) -> None:
    cert, key = _pem_pair(tmp_path)
    other_cert, other_key = _pem_pair(tmp_path, "other")
    assert "--tls-cert needs --tls-key too" in _serve_fails(tmp_path, "--tls-cert", str(cert))
    assert "--tls-key needs --tls-cert too" in _serve_fails(tmp_path, "--tls-key", str(key))
    missing = tmp_path / "nope.crt"
    said = _serve_fails(tmp_path, "--tls-cert", str(missing), "--tls-key", str(key))
    assert f"--tls-cert {missing}: cannot read it: No such file or directory" in said
    said = _serve_fails(tmp_path, "--tls-cert", str(cert), "--tls-key", str(tmp_path))
    assert f"--tls-key {tmp_path}: cannot read it" in said
    if os.geteuid() != 0:  # root reads a file whatever its mode
        locked = tmp_path / "locked.key"
        locked.write_bytes(key.read_bytes())
        locked.chmod(0)
        said = _serve_fails(tmp_path, "--tls-cert", str(cert), "--tls-key", str(locked))
        assert f"--tls-key {locked}: cannot read it: Permission denied" in said
    said = _serve_fails(tmp_path, "--tls-cert", str(cert), "--tls-key", str(other_key), "--workers", "2")
    assert "not a PEM certificate and its matching private key" in said and str(other_key) in said
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    said = _serve_fails(tmp_path, "--tls-cert", str(junk), "--tls-key", str(key))
    assert f"--tls-cert {junk}" in said and "not a PEM certificate" in said
    encrypted = tmp_path / "enc.key"
    pk = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted.write_bytes(pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"pw")))
    said = _serve_fails(tmp_path, "--tls-cert", str(cert), "--tls-key", str(encrypted))
    assert "the key is encrypted" in said
    assert other_cert.exists()
