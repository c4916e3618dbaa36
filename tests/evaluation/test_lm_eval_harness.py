"""bam-eval harness: tiny checkpoints -> Hugging Face export -> lm-evaluation-harness -> table, one command.

Two tiny checkpoints made here (a dense sequential model, exported as LlamaForCausalLM, and a BAM
model, exported as remote code) go through ``tools/eval.py harness`` in a fresh process on the
local tasks (tag ``bam_local``). Then: the table's cells are lm-eval's numbers (results.json, as
lm-eval returned them, and its per-document records); every multiple-choice accuracy equals the
one computed here from the choices' log-likelihoods with plain transformers on a standalone export
of the same checkpoint; greedy generations equal transformers' ``generate``; the temporary exports
are gone, also when lm-eval fails. Bad input (unknown task, missing checkpoint, --out a file) is one
line, exit 2, no output.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from bam_megatron.testing.distributed import run_distributed
from tests.support import paths
from tests.support.hf import architecture, convert, hf_model, save_random_checkpoint

ROOT = paths.REPO
SEQ_LENGTH = 512  # the export's max_position_embeddings: room for the prompts and 48 generated tokens
MODELS = {"dense": "dense-sequential", "bam": "bam-parallel"}  # column -> tests/support/hf.py case
FORMATS = {"dense": "llama", "bam": "bam"}
MC_TASKS = ("bam_mc", "bam_legal")
GEN_TASK = "bam_gen"
LIMIT = 16  # documents per task: half of bam_mc, for the test's time (generation is the dear part)
STOP = ("Question:", "</s>", "\n\n")  # bam_gen.yaml's `until` (lm-eval adds the eos text, "</s>" here)


def _save_and_export(root: str, tokenizer: str) -> dict[str, dict[str, str]]:
    """Rank body: each model's checkpoint and a standalone export of it (for the direct checks)."""
    paths = {}
    for i, (name, case) in enumerate(MODELS.items()):
        checkpoint = os.path.join(root, name)
        save_random_checkpoint(checkpoint, architecture(case), i, (tokenizer, "SentencePieceTokenizer"), SEQ_LENGTH)
        export = os.path.join(root, f"{name}-hf")
        code, text = convert("export", "--load", checkpoint, "--save", export)
        assert code == 0, text
        paths[name] = {"checkpoint": checkpoint, "export": export}
    return paths


@pytest.fixture(scope="module")
def harness(tmp_path_factory, corpus):
    """The checkpoints, the harness's command output and files, and its temporary directory."""
    root = tmp_path_factory.mktemp("harness")
    (paths,) = run_distributed(_save_and_export, 1, args=(str(root), corpus["tokenizer"]))
    tmp, out = root / "tmp", root / "out"
    tmp.mkdir()
    loads = [a for name, p in paths.items() for a in ("--load", f"{name}={p['checkpoint']}")]
    command = [sys.executable, os.path.join(ROOT, "tools", "eval.py"), "harness", *loads, "--tasks", "bam_local"]
    command += ["--out", str(out), "--no-builtin-tasks", "--log-samples", "--tmp-dir", str(tmp), "--device", "cpu"]
    command += ["--limit", str(LIMIT)]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: a second thread only spins on a shared machine
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    samples = {
        (name, task): [json.loads(line) for line in (out / f"samples_{name}_{task}.jsonl").read_text().splitlines()]
        for name in MODELS
        for task in (*MC_TASKS, GEN_TASK)
    }
    return dict(
        paths=paths, proc=proc, out=out, tmp=tmp, results=results, samples=samples, md=(out / "results.md").read_text()
    )


@pytest.fixture(autouse=True)
def one_thread():
    """The direct transformers checks on one thread (tiny models; restored after each test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context): the whole text tokenized once, the continuation's tokens those after
    the context's (lm-eval's convention for causal models)."""
    whole = tokenizer(context + continuation)["input_ids"]
    prefix = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(logprobs[prefix - 1 + i, token].item() for i, token in enumerate(whole[prefix:]))


def _greedy(model, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    for stop in STOP:
        text = text.split(stop)[0]
    return text


def test_one_command_exports_runs_every_task_and_cleans_up(harness):
    results = harness["results"]
    assert set(results["models"]) == set(MODELS)
    for name, fmt in FORMATS.items():
        entry = results["models"][name]
        assert entry["export_format"] == fmt and entry["variant"] == architecture(MODELS[name]).variant
        assert set(entry["results"]) == {*MC_TASKS, GEN_TASK}
        assert entry["n-samples"]["bam_mc"] == {"original": 32, "effective": LIMIT}
        assert entry["n-samples"][GEN_TASK] == {"original": 30, "effective": LIMIT}
    assert results["lm_eval_version"] == "0.4.13"
    assert os.listdir(harness["tmp"]) == []  # every temporary export deleted
    assert "exported with --format bam (trust_remote_code)" in harness["proc"].stdout


def test_the_table_shows_the_harness_numbers(harness):
    rows = [line.split(" | ") for line in harness["md"].splitlines() if line.startswith("| bam_")]
    header = next(line for line in harness["md"].splitlines() if line.startswith("| task"))
    assert header.rstrip(" |").split(" | ")[-2:] == list(MODELS)
    seen = set()
    for row in rows:
        task, filt, metric = row[0].lstrip("| "), row[1], row[2]
        assert (row[3], row[4]) == ("0", str(LIMIT))  # n-shot, documents
        for name, text in zip(MODELS, row[5:]):
            entry = harness["results"]["models"][name]["results"][task]
            value, stderr = entry[f"{metric},{filt}"], entry[f"{metric}_stderr,{filt}"]
            assert text.strip(" |") == f"{value:.4f} ± {stderr:.4f}"
            # lm-eval's aggregate is the mean of its per-document scores
            docs = [s for s in harness["samples"][(name, task)] if s["filter"] == filt]
            assert value == pytest.approx(sum(s[metric] for s in docs) / len(docs), abs=1e-12)
        seen.add((task, filt, metric))
    expected = {("bam_mc", "none", "acc"), ("bam_mc", "none", "acc_norm"), ("bam_legal", "none", "acc")}
    expected |= {(GEN_TASK, "strict-match", "exact_match"), (GEN_TASK, "flexible-extract", "exact_match")}
    assert seen == expected
    assert f"--limit {LIMIT}" in harness["md"]


@pytest.mark.parametrize("name", list(MODELS))
def test_multiple_choice_accuracy_equals_transformers_loglikelihoods(harness, name):
    from transformers import AutoTokenizer

    directory = harness["paths"][name]["export"]
    model, problems = hf_model(directory)
    assert not problems
    tokenizer = AutoTokenizer.from_pretrained(directory)
    for task in MC_TASKS:
        docs = harness["samples"][(name, task)]
        correct = []
        for i, sample in enumerate(docs):
            (context, _), *_ = sample["arguments"]
            continuations = [continuation for _, continuation in sample["arguments"]]
            ours = [_loglikelihood(model, tokenizer, context, c) for c in continuations]
            correct.append(max(range(len(ours)), key=ours.__getitem__) == sample["target"])
            if i < 4:  # a few items: the harness's log-likelihoods themselves
                theirs = [ll for ll, _ in sample["filtered_resps"]]
                assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-3), (task, i)
        accuracy = harness["results"]["models"][name]["results"][task]["acc,none"]
        assert accuracy == sum(correct) / len(correct), task


@pytest.mark.parametrize("name", list(MODELS))
def test_generations_equal_transformers_greedy_decoding(harness, name):
    from transformers import AutoTokenizer

    directory = harness["paths"][name]["export"]
    model, _ = hf_model(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    strict = [s for s in harness["samples"][(name, GEN_TASK)] if s["filter"] == "strict-match"]
    for sample in strict[:3]:
        (prompt, settings), *_ = sample["arguments"]
        generated = sample["resps"][0][0]
        assert _greedy(model, tokenizer, prompt, settings["max_gen_toks"]) == generated
        match = re.search(r"#### (\-?[0-9\.\,]+)", generated)
        assert sample["filtered_resps"][0] == (match.group(1) if match else "[invalid]")
        assert sample["exact_match"] == float(sample["filtered_resps"][0] == sample["target"].split("#### ")[-1])
    assert not math.isnan(harness["results"]["models"][name]["results"][GEN_TASK]["exact_match,strict-match"])


def _harness(*argv: str) -> tuple[int, str, str]:
    """bam-eval harness in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from bam_megatron.cli.eval import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["harness", *argv])
    return code, out.getvalue(), err.getvalue()


def test_bad_input_is_one_line_and_writes_nothing(harness, tmp_path):
    checkpoint = harness["paths"]["dense"]["checkpoint"]
    out = tmp_path / "out"
    cases = {
        "unknown task nope_task": ["--load", checkpoint, "--tasks", "bam_mc,nope_task", "--no-builtin-tasks"],
        "checkpoint not found: ": ["--load", str(tmp_path / "typo"), "--tasks", "bam_mc"],
        "--limit must be >= 1": ["--load", checkpoint, "--tasks", "bam_mc", "--limit", "0"],
    }
    for expected, argv in cases.items():
        code, _, err = _harness(*argv, "--out", str(out))
        assert code == 2 and err.count("\n") == 1 and err.startswith("bam-eval harness: error: "), err
        assert expected in err and not out.exists()
    out.write_text("a file")
    code, _, err = _harness("--load", checkpoint, "--tasks", "bam_mc", "--out", str(out))
    assert code == 2 and f"--out {out} is a file" in err


def _fail_after_export(checkpoint: str, out: str, tmp: str) -> dict:
    """Rank body: bam-eval harness whose lm-eval run fails after the export; what is left on disk."""
    from bam_megatron.cli import harness

    def fail(hf_dir, *_):
        assert os.path.isfile(os.path.join(hf_dir, "config.json"))  # the export was there
        raise RuntimeError("lm-eval failed on purpose")

    harness.run_harness = fail
    try:
        harness.main(["--load", checkpoint, "--tasks", "bam_mc", "--out", out, "--tmp-dir", tmp, "--no-builtin-tasks"])
    except RuntimeError as error:
        return {"error": str(error), "out": os.path.exists(out), "tmp": os.listdir(tmp)}
    return {"error": None}


def test_a_failed_run_leaves_no_export_and_no_output(harness, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    checkpoint = harness["paths"]["dense"]["checkpoint"]
    (left,) = run_distributed(_fail_after_export, 1, args=(checkpoint, str(tmp_path / "out"), str(tmp)))
    assert left == {"error": "lm-eval failed on purpose", "out": False, "tmp": []}


@pytest.mark.e2e
def test_builtin_task_names_resolve():
    """The names docs/evaluation.md gives resolve in lm-eval's own index (about a minute to build)."""
    from bam_megatron.cli.harness import resolve_tasks

    names = ["arc_easy", "arc_challenge", "hellaswag", "mmlu", "gsm8k", "legalbench", "humaneval", "bam_mc"]
    _, tasks = resolve_tasks(names, [], builtin=True)
    assert tasks == names
