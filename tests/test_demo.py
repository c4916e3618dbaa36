"""The CPU demo end to end: `python examples/bam_demo/run.py --quick` (every stage, the real tools).

About two minutes on 2 cores: data, tokenizer, preprocessing, a dense seed, branching, three
dense experts, BAM and BTX upcycling and training, evaluation with routing heatmaps. Then a
second run finds everything done and skips every stage.
"""

import os
import re
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("seed", "code", "law", "math", "btx", "bam")


def _run_demo(workdir, timeout):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "examples", "bam_demo", "run.py"), "--quick", "--workdir", str(workdir)],
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


def test_quick_demo_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    out = _run_demo(workdir, timeout=900)

    table = (workdir / "eval" / "perplexity.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(MODELS) <= set(rows), table
    assert "| model | general | code | law | math | average |" in table
    assert table.strip().splitlines()[-1] in out  # the demo prints the table
    for figure in ("routing_bam.png", "routing_btx.png"):
        path = workdir / "eval" / figure
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        assert str(path) in out
    for expert in ("code", "law", "math"):
        assert f"the {expert} expert beats the seed on {expert}" in out
    assert "BAM beats the seed on average" in out and "Total time" in out

    again = _run_demo(workdir, timeout=300)  # everything done: every stage skipped, same table
    units = 3 + 1 + 1 + 3 + 2 + 2 + 1  # data, tokenizer, preprocess; seed; branch; experts; upcycles; mixtures; eval
    assert len(re.findall(r"skipped [\w-]+: done earlier", again)) == units, again
    assert table.strip().splitlines()[-1] in again
