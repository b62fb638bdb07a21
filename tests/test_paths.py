"""Atomic writes (`loracast.paths.replacing`): every result, checkpoint, plot and store file is written through them."""

from __future__ import annotations

import json
import os

import pytest

from loracast.paths import TEMP_SUFFIX, replacing, write_file, write_json
from loracast.plots import figure


@pytest.mark.parametrize("durable", [False, True])
def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary(tmp_path, durable):
    path = tmp_path / "result.json"
    write_json({"run": 1}, path)
    with pytest.raises(RuntimeError), replacing(path, durable) as tmp:
        tmp.write_text('{"run": 2, "half')
        raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


@pytest.mark.parametrize("durable", [False, True])
def test_a_write_replaces_the_file_with_the_usual_permissions(tmp_path, durable):
    path = tmp_path / "deep" / "er" / "blob.bin"  # missing folders are made
    write_file(path, b"old")
    with replacing(path, durable) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".blob.bin.") and tmp.name.endswith(TEMP_SUFFIX)
        assert not tmp.exists()  # the writer creates it, so it gets the umask's permissions, not mkstemp's 0600
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["blob.bin"]


def test_a_figure_is_saved_whole_or_not_at_all(tmp_path):
    path = tmp_path / "plots" / "curve.png"
    with figure(path, 1, 2, figsize=(4, 2)) as (left, right):
        left.plot([1, 2], [3, 4])
        right.plot([1, 2], [4, 3])
    assert path.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(KeyError), figure(tmp_path / "broken.svg") as ax:
        ax.plot([1], [1])
        raise KeyError("a result the plot needs is missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]
