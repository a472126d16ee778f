"""Atomic writes (the target appears whole or not at all) and exclusive locks."""

import threading

import pytest

from cartridges.files import atomic_folder, atomic_write, exclusive_lock


def test_atomic_write_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "state.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    with atomic_write(target) as temporary:
        temporary.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible until the block ends
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.bin"]


def test_atomic_write_keeps_old_file_and_leaves_no_temporary_on_error(tmp_path):
    target = tmp_path / "state.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="crash"), atomic_write(target) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "v1" / "adapter"
    with pytest.raises(RuntimeError), atomic_folder(target) as temporary:
        (temporary / "a.txt").write_text("a")
        raise RuntimeError("crash")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic_folder(target) as temporary:
        (temporary / "a.txt").write_text("a")
    assert (target / "a.txt").read_text() == "a"
    assert [p.name for p in target.parent.iterdir()] == ["adapter"]


def test_a_replaced_folder_stays_whole_until_the_new_one_is(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    (target / "weights.bin").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target, replace=True) as temporary:
        (temporary / "config.json").write_text("new")
        raise RuntimeError("crash")  # mid-save: the old folder is untouched
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights.bin"]
    assert (target / "config.json").read_text() == "old"
    with atomic_folder(target, replace=True) as temporary:
        (temporary / "config.json").write_text("new")
        assert (target / "config.json").read_text() == "old"
    assert [p.name for p in target.iterdir()] == ["config.json"]  # nothing of the old one
    assert (target / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left beside


def test_an_exclusive_lock_makes_a_second_holder_wait_its_turn(tmp_path):
    lock, waiting, inside = tmp_path / "run" / ".lock", threading.Event(), threading.Event()

    def second() -> None:
        with exclusive_lock(lock, on_wait=waiting.set):
            inside.set()

    with exclusive_lock(lock):
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(timeout=30)  # it found the lock held and said so
        assert not inside.is_set()
    thread.join(timeout=30)
    assert inside.is_set()
    with exclusive_lock(lock, on_wait=pytest.fail):  # free again: no wait
        pass


def test_a_file_system_without_locks_is_not_an_error(tmp_path, monkeypatch, caplog):
    def no_locks(*args):
        raise OSError(37, "No locks available")

    monkeypatch.setattr("cartridges.files.fcntl.flock", no_locks)
    entered = False
    with exclusive_lock(tmp_path / ".lock", on_wait=pytest.fail):
        entered = True
    assert entered and "Cannot lock" in caplog.text and "No locks available" in caplog.text
