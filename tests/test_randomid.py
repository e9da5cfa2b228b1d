"""Request ids from a buffer of the OS's random bytes: right length, never repeated, and a forked
worker never hands out the ids its parent would."""

from __future__ import annotations

import os
import threading

from spendgate import randomid


def test_ids_are_hex_of_the_asked_length_and_never_repeat_across_buffers_and_threads() -> None:
    seen: list[str] = []

    def draw() -> None:
        seen.extend(randomid.token_hex(16) for _ in range(2000))

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8000 == len(set(seen))  # 8000 × 16 bytes: the 4 KiB buffer refilled ~30 times
    assert all(len(x) == 32 and int(x, 16) >= 0 for x in seen)
    assert len(randomid.token_hex(8)) == 16 and len(randomid.token_hex(5000)) == 10000


def test_a_forked_process_draws_ids_of_its_own() -> None:
    randomid.token_hex(8)  # the parent's buffer holds unread bytes now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.close(r)
        os.write(w, "".join(randomid.token_hex(8) for _ in range(4)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = f.read()
    os.waitpid(pid, 0)
    mine = "".join(randomid.token_hex(8) for _ in range(4))
    assert len(child) == len(mine) == 64 and child != mine
