"""bam_megatron.platform.internals: every private torch / megatron-core internal the project uses is
there in the installed versions, a version other than the one the seams were written against
warns, and a missing internal is one clear error."""

from __future__ import annotations

import os
import warnings

import pytest

from bam_megatron.platform import internals
from tests.support import paths

# (module, name) of every internal a seam stands for
INTERNALS = (
    ("megatron.core.dist_checkpointing.strategies.filesystem_async", "_results_queue"),
    ("megatron.core.dist_checkpointing.strategies.torch", "_replace_state_dict_keys_with_sharded_keys"),
    ("torch.distributed._shard._utils", "narrow_tensor_by_index"),
    ("torch.distributed.checkpoint.filesystem", "_create_file_view"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch._C", "PyTorchFileReader"),
    ("megatron.core.datasets.indexed_dataset", "_INDEX_HEADER"),
)


@pytest.mark.parametrize("module,name", INTERNALS)
def test_every_internal_is_there(module, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", internals.InternalsVersionWarning)
        internals._internal(module, name)


def test_the_attention_methods_are_there():
    from megatron.core.transformer.attention import Attention

    assert callable(Attention._adjust_key_value_for_inference)
    assert callable(Attention._checkpointed_attention_forward)


def test_the_pins_are_setup_pys():
    setup = open(os.path.join(paths.REPO, "setup.py")).read()
    for package, version in internals.WRITTEN_AGAINST.items():
        assert f"{package}=={version}" in setup, package


def test_another_version_warns_once(monkeypatch):
    internals.check_versions.cache_clear()
    monkeypatch.setattr(internals, "installed_versions", lambda: {"megatron-core": "0.16.1", "torch": "2.11.0"})
    with pytest.warns(internals.InternalsVersionWarning, match=r"torch 2\.11\.0 \(written against 2\.13\.0\)"):
        internals.check_versions()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        internals.check_versions()  # once per process
    internals.check_versions.cache_clear()


def test_the_written_against_versions_do_not_warn(monkeypatch):
    internals.check_versions.cache_clear()
    monkeypatch.setattr(internals, "installed_versions", lambda: dict(internals.WRITTEN_AGAINST))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        internals.check_versions()
    internals.check_versions.cache_clear()


def test_a_missing_internal_is_one_clear_error():
    with pytest.raises(internals.InternalsError, match=r"torch\._C\._no_such_reader is missing .*written against"):
        internals._internal("torch._C", "_no_such_reader")
