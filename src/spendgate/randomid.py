"""Random ids for every request (a decision's, a hold's), from the OS's CSPRNG in bulk.

Each request took two ``getrandom`` system calls (``secrets.token_hex``, ``os.urandom``), about
5 µs each on a virtual machine; reading 4 KiB at a time makes that a slice of a buffer. The bytes
are the same CSPRNG's, so the ids are as unguessable. A forked process (``serve --workers``) starts
with an empty buffer, or two workers would hand out the same ids.
"""

from __future__ import annotations

import os
import threading

#: bytes read from the OS at a time
CHUNK = 4096

_lock = threading.Lock()
_buf = b""
_at = 0


def token_hex(nbytes: int) -> str:
    """``nbytes`` random bytes as hex, like :func:`secrets.token_hex`."""
    global _buf, _at
    with _lock:
        end = _at + nbytes
        if end > len(_buf):
            _buf, _at, end = os.urandom(max(CHUNK, nbytes)), 0, nbytes
        out = _buf[_at:end]
        _at = end
    return out.hex()


def _forget() -> None:
    global _buf, _at
    _buf, _at = b"", 0


os.register_at_fork(after_in_child=_forget)
