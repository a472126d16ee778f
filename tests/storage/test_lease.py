"""The lock on an object store (a lease) on a real S3 server: one holder, takeover, loss."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from cartridges.storage import Store, StoreConflictError, StoreLockError, open_store


@pytest.fixture
def lease(s3):
    """A store on the server and a fresh lease path in it."""
    store, path = open_store(
        f"s3://{s3.bucket}/{uuid.uuid4().hex[:12]}/.lock",
        credentials=s3.credentials,
        fs_args=s3.fs_args,
    )
    return store, path


def _stale(store: Store, path: str, seconds: float = 2.0) -> None:
    """A lease left by a killed holder: never renewed again."""
    store.put_if_absent(path, json.dumps({"owner": "killed", "seconds": seconds}).encode())


def test_of_two_processes_taking_over_one_stale_lease_only_one_holds_it(lease):
    store, path = lease
    _stale(store, path)
    held, overlaps, lock = [], [], threading.Lock()

    def hold(name: str) -> None:
        with store.lock(path, lease_seconds=2.0):
            with lock:
                if held:
                    overlaps.append((held[-1], name))
                held.append(name)
            time.sleep(2.5)  # renewed meanwhile: the other waiter must not take it over
            with lock:
                held.remove(name)

    threads = [threading.Thread(target=hold, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not overlaps
    assert not store.exists(path)  # each released it, conditionally


def test_a_lease_that_is_not_a_record_is_taken_over_after_the_waiters_lease_time(lease):
    store, path = lease
    store.put_if_absent(path, b"\x00 not json")
    started = time.monotonic()
    with store.lock(path, lease_seconds=1.0):
        waited = time.monotonic() - started
    assert 1.0 < waited < 10


def test_a_holder_whose_lease_was_taken_over_is_stopped_before_its_next_write(lease):
    store, path = lease
    with store.lock(path, lease_seconds=4.0) as held:
        held.check()  # held: nothing raised
        taken = json.dumps({"owner": "another machine", "seconds": 60}).encode()
        store.replace_if_unchanged(path, taken, store.etag(path))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the next renewal (within 1 s) finds it changed
            try:
                held.check()
            except StoreLockError as error:
                assert "another process took it over" in str(error)
                assert "rerun to resume" in str(error)
                break
            time.sleep(0.05)
        else:
            pytest.fail("the holder did not notice that its lease was taken over")
    assert store.read_bytes(path) == taken  # released without removing the new holder's lease


def test_a_lease_that_cannot_be_renewed_in_time_is_given_up(lease, monkeypatch):
    store, path = lease
    with store.lock(path, lease_seconds=2.0) as held:

        def network_down(*args, **kwargs):
            raise OSError("connection refused")

        monkeypatch.setattr(Store, "replace_if_unchanged", network_down)
        time.sleep(1.6)  # more than half the lease without a renewal
        with pytest.raises(StoreLockError, match="not renewed for"):
            held.check()
        monkeypatch.undo()
    # Given up, but nobody took it over: the release removes it (only if still at its ETag).
    assert not store.exists(path)


def test_a_renewal_and_a_takeover_are_refused_once_the_lease_changed(lease):
    store, path = lease
    first = store.put_if_absent(path, b"one")
    second = store.replace_if_unchanged(path, b"two", first)
    with pytest.raises(StoreConflictError, match="changed since it was read"):
        store.replace_if_unchanged(path, b"three", first)
    with pytest.raises(StoreConflictError, match="changed since it was read"):
        store.remove_if_unchanged(path, first)
    store.remove_if_unchanged(path, second)
    assert not store.exists(path)


def test_a_store_that_ignores_write_if_absent_cannot_be_locked(lease, monkeypatch):
    store, path = lease
    write = store.fs.pipe_file

    def ignoring_the_condition(target, data, IfNoneMatch=None, **options):  # noqa: N803
        return write(target, data, **options)

    monkeypatch.setattr(store.fs, "pipe_file", ignoring_the_condition)
    with pytest.raises(StoreLockError, match="ignores If-None-Match"), store.lock(path):
        pass


def test_a_store_without_conditional_writes_cannot_be_locked():
    store, path = open_store(f"memory://{uuid.uuid4().hex}/.lock")
    with pytest.raises(StoreLockError, match="implemented for S3"), store.lock(path):
        pass
