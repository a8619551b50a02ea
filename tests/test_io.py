"""Atomic writes: a reader sees the old content or the whole new content, never a partial one."""

from __future__ import annotations

import pytest

from rayalign.io import atomic_directory, atomic_write_text, new_run_dir


def test_atomic_write_text_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_atomic_directory_commits_only_on_success(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v1")
        assert not target.exists(), "visible before the block finished"
    assert (target / "weights").read_text() == "v1"

    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (target / "weights").read_text() == "v1", "a failed write damaged the previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "temporary directory left behind"

    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_new_run_dirs_are_distinct(tmp_path):
    first, second = new_run_dir(tmp_path), new_run_dir(tmp_path)
    assert first != second and first.parent == tmp_path and not first.exists()
