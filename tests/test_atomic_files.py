"""The one atomic writer every result, cache and checkpoint goes through."""

import json
import os

import pytest

from util.atomic_files import atomic_path, write_text_atomic


def test_success_replaces_the_file_with_shared_permissions(tmp_path):
    target = tmp_path / "sub" / "result.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and not tmp.exists()
        tmp.write_text(json.dumps({"a": 1}))
    assert json.loads(target.read_text()) == {"a": 1}
    assert target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_a_failing_writer_leaves_the_old_content_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the ne")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_writer_that_writes_nothing_is_an_error_not_an_empty_file(tmp_path):
    target = tmp_path / "result.json"
    with pytest.raises(FileNotFoundError, match="result.json"):
        with atomic_path(target):
            pass
    assert not target.exists()


def test_mode_none_keeps_the_umask_permissions(tmp_path):
    umask = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "shared.txt", "x", mode=None)
    finally:
        os.umask(umask)
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o640
