"""Request ids: unique in a process (a counter), and across processes (a per-process prefix)."""

from __future__ import annotations

import os
import re

from broker.api.interceptors import RequestIds, _request_id

_SANE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def test_ids_are_unique_sane_tokens_with_a_random_prefix_per_instance() -> None:
    ids = RequestIds()
    made = [ids() for _ in range(10_000)]
    assert len(set(made)) == len(made)
    assert all(_SANE.fullmatch(i) and i.startswith(ids.prefix) for i in made)
    assert RequestIds().prefix != ids.prefix


def test_a_forked_worker_draws_a_new_prefix_so_it_never_repeats_its_parents_ids() -> None:
    ids = RequestIds()
    parent = [ids(), ids()]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as little as possible, then leave without running any cleanup
        os.write(write, f"{ids()} {ids()}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        in_child = pipe.read().split()
    assert os.waitpid(pid, 0)[1] == 0
    assert not set(in_child) & set(parent)
    assert not in_child[0].startswith(ids.prefix)


def test_a_callers_sane_request_id_is_kept_and_anything_else_replaced() -> None:
    assert _request_id((("x-request-id", "abc-1"),)) == "abc-1"
    for bad in ("", "has space", "x" * 65, "new\nline"):
        replaced = _request_id((("x-request-id", bad),))
        assert replaced != bad and _SANE.fullmatch(replaced)
    assert _SANE.fullmatch(_request_id(None))
