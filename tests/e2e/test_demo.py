"""The CPU demo end to end: `python examples/bam_demo/run.py --quick --grow` (every stage, the real tools).

A few minutes on 2 cores: data, tokenizer, preprocessing, a dense seed, branching, three dense
experts, BAM and BTX upcycling and training, evaluation with routing heatmaps (BAM at step 0 beside
trained) and each domain's own-expert share; then the --grow
stages (a fifth domain's expert added to the trained BAM mixture, re-trained with the old experts
frozen, evaluated before and after). Then a second run finds everything done and skips every stage.
"""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.support import paths

REPO = paths.REPO
MODELS = ("seed", "code", "law", "math", "btx", "bam", "bam-step0", "bam-domain-step0")


def _run_demo(workdir, timeout):
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(REPO, "examples", "bam_demo", "run.py"),
            "--quick",
            "--grow",
            "--workdir",
            str(workdir),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the demo stops its stage's processes
        out, _ = proc.communicate(timeout=60)
        raise AssertionError(f"the demo took more than {timeout} s:\n{out[-5000:]}") from None
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.mark.e2e
def test_quick_demo_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    out = _run_demo(workdir, timeout=900)

    table = (workdir / "eval" / "perplexity.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(MODELS) <= set(rows), table
    assert "| model | general | code | law | math | average |" in table
    assert table.strip().splitlines()[-1] in out  # the demo prints the table
    for figure in ("routing_bam.png", "routing_btx.png", "routing_bam_step0_vs_trained.png"):
        path = workdir / "eval" / figure
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        assert str(path) in out
    own = [line.split(" | ") for line in out.splitlines() if " | FFN: share of tokens routed (top-1) | " in line]
    expected = ["| bam", "| bam-domain-step0", "| bam-step0", "| btx"]
    assert sorted(cells[0] for cells in own) == expected, out[-5000:]  # printed once
    assert all(cells[2] == "no expert" for cells in own)  # general: no expert of its name (the seed's is "seed")
    for expert in ("code", "law", "math"):
        assert f"the {expert} expert beats the seed on {expert}" in out
    assert "BAM beats the seed on average" in out and "Total time" in out
    assert re.search(r"\[(yes|NO )\] BAM \(domain routers\), step 0: own FFN top-1 share", out), out[-5000:]
    manifest = json.loads((workdir / "bam-domain-init" / "upcycle_manifest.json").read_text())
    assert manifest["router_init"] == "domain" and manifest["method"] == "bam"

    grown = (workdir / "grow" / "eval" / "perplexity.json").read_text()
    ppl = {name: m["perplexity"] for name, m in json.loads(grown)["models"].items()}
    assert set(ppl) == {"seed", "bio", "bam", "bam+bio (step 0)", "bam+bio"}, ppl
    assert ppl["bam+bio"]["bio"] < ppl["bam"]["bio"]  # the new domain improves
    assert "| bam+bio | " in out and "step-0 distance to mixture: KL" in out
    assert "froze experts seed, code, law, math" in (workdir / "logs" / "bam-bio.log").read_text()

    again = _run_demo(workdir, timeout=300)  # everything done: every stage skipped, same table
    units = 3 + 1 + 1 + 3 + 3 + 2 + 1  # data, tokenizer, preprocess; seed; branch; experts; upcycles; mixtures; eval
    units += 6  # grow: data, branch, expert, extend, train, eval
    assert len(re.findall(r"skipped [\w-]+: done earlier", again)) == units, again
    assert table.strip().splitlines()[-1] in again
