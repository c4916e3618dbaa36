"""The checkpoint directory layout (bam_megatron.checkpoint.layout): names, discovery of the latest
iteration, its atomic publishing, and that no module outside it spells the layout again."""

from __future__ import annotations

import ast
import os

import pytest

from bam_megatron.checkpoint import layout
from bam_megatron.checkpoint.meta import CheckpointError
from tests.support import paths

PACKAGE = os.path.join(paths.REPO, "bam_megatron")


def _published(root, iteration: int) -> str:
    path = layout.checkpoint_path(str(root), iteration)
    os.makedirs(path)
    open(os.path.join(path, layout.METADATA), "w").close()
    return path


def test_names_and_discovery(tmp_path):
    assert layout.iteration_name(100) == "iter_0000100"
    assert layout.latest_iteration(str(tmp_path)) is None and layout.named_by_latest(str(tmp_path)) is None
    path = _published(tmp_path, 7)
    os.makedirs(layout.in_progress_path(str(tmp_path), 8))
    assert layout.is_checkpoint(path) and not layout.is_checkpoint(str(tmp_path))
    assert layout.saved_iterations(str(tmp_path)) == ["iter_0000007"]
    layout.write_latest(str(tmp_path), "iter_0000007")
    assert (tmp_path / layout.LATEST).read_text() == "7"
    assert layout.latest_iteration(str(tmp_path)) == 7 and layout.named_by_latest(str(tmp_path)) == "iter_0000007"
    layout.remove_unfinished_saves(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["iter_0000007", layout.LATEST]


def test_release_and_bad_latest_files(tmp_path):
    layout.write_latest(str(tmp_path), layout.RELEASE)
    assert layout.named_by_latest(str(tmp_path)) == layout.RELEASE
    with pytest.raises(CheckpointError, match="weights only"):
        layout.latest_iteration(str(tmp_path))
    layout.write_latest(str(tmp_path), "iter_0000003")
    with pytest.raises(CheckpointError, match="iter_0000003 is missing"):
        layout.latest_iteration(str(tmp_path))
    with pytest.raises(ValueError, match="not a checkpoint directory name"):
        layout.write_latest(str(tmp_path), "ckpt")
    assert (tmp_path / layout.LATEST).read_text() == "3"


def test_the_latest_file_is_replaced_atomically(tmp_path, monkeypatch):
    layout.write_latest(str(tmp_path), "iter_0000001")

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        layout.write_latest(str(tmp_path), "iter_0000002")
    assert os.listdir(tmp_path) == [layout.LATEST] and (tmp_path / layout.LATEST).read_text() == "1"


def _layout_literals(path: str) -> list[str]:
    """String constants in ``path`` that spell a piece of the layout: the ``iter_`` prefix (also in an
    f-string naming an iteration), the latest file, the ``.replaced`` suffix (docstrings aside)."""
    tree = ast.parse(open(path).read(), path)
    skipped = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    skipped |= {  # an f-string's parts: the f-string is checked whole
        id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values
    }
    spelled = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped:
            text = node.value
            if text in (layout.PREFIX, layout.LATEST, layout.REPLACED):
                spelled.append(text)
        if isinstance(node, ast.JoinedStr) and any(
            isinstance(v, ast.Constant) and str(v.value).endswith("iter_") for v in node.values
        ):
            spelled.append(ast.unparse(node))
    return spelled


def test_only_the_layout_module_spells_the_layout():
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(directory, name)
            if name.endswith(".py") and path != layout.__file__ and "remote" not in directory:
                spelled = _layout_literals(path)
                if spelled:
                    found[os.path.relpath(path, PACKAGE)] = spelled
    assert found == {}


def test_the_literal_check_can_fail(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""iter_ in a docstring is fine."""\nname = f"iter_{3:07d}"\nlatest = "iter_"\n')
    assert len(_layout_literals(str(module))) == 2
