"""Test tiers (as in torchtitan / OLMo-core):

- no marker: runs anywhere, CPU only; multi-rank tests spawn gloo ranks with
  `bam_megatron.testing.distributed.run_distributed`.
- ``gpu``: needs CUDA (Transformer Engine, bf16 numerics). Deselected, and reported as such,
  on machines without a GPU.
"""

import atexit
import os
import shutil
import tempfile

# transformers copies remote code into HF_MODULES_CACHE and puts that directory on sys.path when it
# is first imported: one directory for the whole session (every test module and every rank process
# started from it), set before any test module imports transformers, and kept out of ~/.cache.
os.environ["HF_MODULES_CACHE"] = _HF_MODULES = tempfile.mkdtemp(prefix="bam-hf-modules-")
atexit.register(shutil.rmtree, _HF_MODULES, True)

import torch  # noqa: E402

from tests.support.corpus import corpus  # noqa: E402,F401  (session fixture: tokenizer + domain datasets)
from tests.support.corpus_text import text_corpus  # noqa: E402,F401  (session fixture: generated JSONL + tokenizer)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    deselected = [item for item in items if item.get_closest_marker("gpu")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
