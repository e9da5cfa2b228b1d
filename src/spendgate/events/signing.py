"""The audit log's Ed25519 key: found, or created once, before anything is written.

The default key lives in spendgate's home (``audit.key``), created on first use with mode 0600 as
unencrypted PEM PKCS8 (so ``openssl pkey -in audit.key -pubout`` reads it). An operator's key
(``audit_key = "file:/path"``) is never created: a missing or unusable key is an error, because a
server that cannot sign must not start writing a log nobody can verify.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Protocol

import nacl.signing
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from spendgate import ledger
from spendgate.errors import ConfigError

log = logging.getLogger("spendgate.audit")

KEY_FILE = "audit.key"


class AuditKeyError(ConfigError):
    """The audit key cannot be used; the message names the file and what is wrong with it."""


def default_key_path() -> Path:
    """``<spendgate home>/audit.key``."""
    return ledger.home() / KEY_FILE


def key_path(spec: str | None) -> tuple[Path, bool]:
    """The key file ``spec`` names and whether it may be created (only the default one may)."""
    if spec is None:
        return default_key_path(), True
    if not spec.startswith("file:") or len(spec) <= len("file:"):
        raise AuditKeyError(f"audit_key: expected file:/path/to/audit.key, got {spec!r}")
    rest = spec[len("file:"):]
    if rest.startswith("//"):  # file:///abs/path
        rest = rest[2:]
    return Path(rest).expanduser(), False


def load_key(spec: str | None = None, *, create: bool = True) -> Ed25519PrivateKey:
    """The signing key ``spec`` names (``file:/path``), or the default one, created if absent
    (unless ``create`` is False: a verifier reads a key, it never makes one)."""
    path, may_create = key_path(spec)
    if create and may_create and not path.exists():
        return _create(path)
    return _read(path)


def _read(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise AuditKeyError(f"audit key {path}: no such file (make one with: "
                            f"openssl genpkey -algorithm ed25519 -out {path})") from None
    except OSError as exc:
        raise AuditKeyError(f"audit key {path}: cannot read ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise AuditKeyError(f"audit key {path}: encrypted; spendgate needs an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise AuditKeyError(f"audit key {path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(f"audit key {path}: a {type(key).__name__.lstrip('_')} key; expected Ed25519")
    if os.name != "nt" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("audit key %s is readable by group or others (mode %o); chmod 600 it", path,
                    stat.S_IMODE(mode))
    return key


def _create(path: Path) -> Ed25519PrivateKey:
    """Write a new key where no process can read it half-written: a private temporary file, linked
    into place only if no other process created the key first (that one wins, and is read)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read(path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    except OSError as exc:
        raise AuditKeyError(f"audit key {path}: cannot create ({exc.strerror})") from None
    log.info("created audit key %s", path)
    return key


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The raw 32-byte public key as 64 lowercase hex (what ``spendgate audit pubkey`` prints)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def parse_public(text: str) -> Ed25519PublicKey:
    """A public key from 64 hex digits (raw Ed25519), as ``public_hex`` prints it."""
    raw = text.strip()
    try:
        data = bytes.fromhex(raw)
    except ValueError:
        data = b""
    if len(data) != 32:
        raise AuditKeyError(f"public key {text!r}: expected 64 hex digits (a raw Ed25519 public key)")
    return Ed25519PublicKey.from_public_bytes(data)


class Signer(Protocol):
    """What seals entries: an Ed25519 private key's ``sign`` (64 bytes)."""

    def sign(self, data: bytes, /) -> bytes: ...


class _Sodium:
    """The same key signing through libsodium (PyNaCl): Ed25519 signatures are deterministic, so
    the bytes are OpenSSL's, in ~20 µs instead of ~31 — and the writer signs two entries a request."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        self._key = nacl.signing.SigningKey(seed)

    def sign(self, data: bytes, /) -> bytes:
        return self._key.sign(data).signature


def fast_signer(key: Ed25519PrivateKey) -> Signer:
    """``key``'s signer for the audit writer's hot loop (see :class:`_Sodium`)."""
    return _Sodium(key)

