"""The audit op's child process (gateway/audit_process.py): what it answers, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.audit_process import audit_store, main
from messages.errors import ErrorCode, ServiceError
from messages.events import INVENTORY_STREAM
from saga.audit import audit
from store import CODEC, NO_STREAM, open_store
from tests.test_inventory_streams import old_inventory_stream


def test_a_sqlite_store_is_audited_in_a_child_with_the_same_result(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'orders.db'}"
    with open_store(url) as store:
        events = [CODEC.encode(e) for e in old_inventory_stream()]
        store.append(INVENTORY_STREAM, events, NO_STREAM)
    with open_store(url, readonly=True) as reader:
        here = audit(reader)
        there = audit_store(reader, url)
    assert there["fences"] == here["fences"] == 1
    assert there["checks"] == here["checks"]
    assert there["ok"] is here["ok"]


def test_a_memory_store_is_audited_in_this_process() -> None:
    """Only this process can read a memory store: no child is asked."""
    with open_store("memory:audit-here") as store:
        assert audit_store(store, "memory:audit-here") == audit(store)


def test_a_store_the_child_cannot_open_is_a_clear_error(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'no-such.db'}"
    with open_store("memory:audit-missing") as store, pytest.raises(ServiceError) as raised:
        audit_store(store, missing)
    assert raised.value.code == ErrorCode.INTERNAL
    assert raised.value.message.startswith("the audit failed: ")
    assert "no-such.db" in raised.value.message


def test_the_child_needs_exactly_one_store_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
