import json
import os

import pytest

from megarope import files


def test_json_written_whole_or_not_at_all(tmp_path):
    path = str(tmp_path / "r.json")
    files.write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        files.write_json_atomic(path, {"a": object()})  # not JSON: the old file stays
    assert json.load(open(path)) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_atomic_files_all_or_none(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with pytest.raises(RuntimeError):
        with files.atomic_files([a, b]) as (ta, tb):
            open(ta, "w").write("x")
            raise RuntimeError("stopped half way")
    assert os.listdir(tmp_path) == []
    with files.atomic_files([a, b], mode=0o644) as (ta, tb):
        open(ta, "w").write("x")
        open(tb, "w").write("y")
    assert open(a).read() == "x" and open(b).read() == "y"
    assert os.stat(a).st_mode & 0o777 == 0o644 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_dir_replaces_or_keeps(tmp_path):
    final = str(tmp_path / "ck")
    with files.atomic_dir(final) as tmp:
        open(os.path.join(tmp, "w"), "w").write("1")
    with pytest.raises(RuntimeError):
        with files.atomic_dir(final) as tmp:
            open(os.path.join(tmp, "w"), "w").write("2")
            raise RuntimeError("crash mid-write")
    assert open(os.path.join(final, "w")).read() == "1"
    with files.atomic_dir(final) as tmp:
        open(os.path.join(tmp, "w"), "w").write("3")
    assert open(os.path.join(final, "w")).read() == "3"
    assert sorted(os.listdir(tmp_path)) == ["ck"]
