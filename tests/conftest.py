"""Test tiers (as in torchtitan / OLMo-core):

- no marker: runs anywhere, CPU only; multi-rank tests spawn gloo ranks with
  `bam_megatron.testing.distributed.run_distributed`.
- ``megatron_core``: stock megatron-core on CPU through bam_megatron.platform (its CUDA call sites,
  RNG, dist_checkpointing, the distributed optimizer, its own GPT under every layout). `make test`
  (CI) runs them always; `make test-quick` (``--megatron-core-tier=changed``) only when
  bam_megatron/platform/ or setup.py changed since the last whole passing `make test` here.
- ``e2e``: long end-to-end tests; `make test-quick` leaves them out.
- ``gpu``: needs CUDA (Transformer Engine, bf16 numerics). Deselected, and reported as such,
  on machines without a GPU.

The suite runs on pytest-xdist workers, whole files each (``--dist loadfile --no-loadscope-reorder``),
the longest files handed out first (`LONGEST_FIRST`, then the other end-to-end files) so that the longest
work starts at once.
"""

import atexit
import hashlib
import os
import shutil
import tempfile

# transformers copies remote code into HF_MODULES_CACHE and puts that directory on sys.path when it
# is first imported: one directory for the whole session (every test module and every rank process
# started from it), set before any test module imports transformers, and kept out of ~/.cache.
os.environ["HF_MODULES_CACHE"] = _HF_MODULES = tempfile.mkdtemp(prefix="bam-hf-modules-")
atexit.register(shutil.rmtree, _HF_MODULES, True)

import torch  # noqa: E402

import bam_megatron  # noqa: E402,F401  (first: its import hook defers megatron-core's torch.compile decorators)
from tests.support.corpus import corpus  # noqa: E402,F401  (session fixture: tokenizer + domain datasets)
from tests.support.corpus_text import text_corpus  # noqa: E402,F401  (session fixture: generated JSONL + tokenizer)
from tests.support.paths import REPO  # noqa: E402

_TIER_CACHE_KEY = "bam/megatron_core_tier_passed"
# Files by their time on 2 cores, longest first (`make test` prints the slowest tests: keep this in step).
LONGEST_FIRST = [
    "tests/e2e/test_demo.py",
    "tests/examples/test_reproduce.py",
    "tests/e2e/test_slurm.py",
    "tests/e2e/test_docker.py",
]
MAX_WORKERS = 4  # each worker holds a forkserver with torch and megatron-core (about 0.4 GB) and its ranks


def pytest_addoption(parser):
    parser.addoption(
        "--megatron-core-tier",
        choices=("always", "changed"),
        default="always",
        help="run the megatron_core tests always (default, CI) or only when bam_megatron/platform/ or setup.py "
        "changed since the last whole passing run here (make test-quick)",
    )


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most MAX_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def _platform_fingerprint() -> str:
    """What the megatron_core tier depends on: bam_megatron/platform/ and the pins in setup.py."""
    digest = hashlib.sha256()
    paths = [os.path.join(REPO, "setup.py")]
    platform = os.path.join(REPO, "bam_megatron", "platform")
    paths += sorted(os.path.join(platform, n) for n in os.listdir(platform) if n.endswith(".py"))
    for path in paths:
        digest.update(os.path.relpath(path, REPO).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _deselect(config, items, keep) -> None:
    deselected = [item for item in items if not keep(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if keep(item)]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        _deselect(config, items, lambda item: not item.get_closest_marker("gpu"))
    if config.getoption("--megatron-core-tier") == "changed" and getattr(config, "cache", None) is not None:
        if config.cache.get(_TIER_CACHE_KEY, None) == _platform_fingerprint():
            _deselect(config, items, lambda item: not item.get_closest_marker("megatron_core"))

    # The longest files first (xdist hands out files in this order: --no-loadscope-reorder), the rest as
    # collected, so that the long end-to-end work starts at once and short files fill the gaps after it.
    def rank(item) -> int:
        name = os.path.relpath(str(item.path), REPO)
        if name in LONGEST_FIRST:
            return LONGEST_FIRST.index(name)
        return len(LONGEST_FIRST) if item.get_closest_marker("e2e") else len(LONGEST_FIRST) + 1

    ranks = {item.path: rank(item) for item in items}
    items.sort(key=lambda item: ranks[item.path])


def pytest_sessionfinish(session, exitstatus):
    """After a whole passing run with the tier (make test), remember the platform it passed on."""
    config = session.config
    if hasattr(config, "workerinput") or getattr(config, "cache", None) is None or exitstatus != 0:
        return  # xdist workers report to the controller, which decides
    whole_run = [os.path.normpath(a) for a in config.args] in ([], ["tests"]) and not config.option.markexpr
    if whole_run and not config.option.keyword and config.getoption("--megatron-core-tier") == "always":
        config.cache.set(_TIER_CACHE_KEY, _platform_fingerprint())
