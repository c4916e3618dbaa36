"""Instruction-tune a small seed model five ways and compare held-out loss: full fine-tuning,
(IA)³ and LoRA (one adapter expert), MoV and MoLoRA (E adapter experts, softly routed per token).

    python examples/peft_instruct.py                      # everything, a few minutes on 2 CPU cores
    python examples/peft_instruct.py --quick              # a smoke run (~1 minute)
    python examples/peft_instruct.py --base runs/seed --tokenizer-model tok.model   # your own seed (any variant)

Stages (the project's own entry points, as subprocesses; everything under --workdir):

1. data: a generated multi-task instruction set (reverse, sort, add, count, first/last word,
   copy), split into training and held-out pairs, and task-free pre-training text (random word
   and number sequences: the seed learns the vocabulary, not the tasks);
2. a SentencePiece tokenizer (tools/train_tokenizer.py) and the pre-training dataset
   (tools/preprocess_data.py), unless --tokenizer-model / --base are given;
3. a dense seed pre-trained briefly (pretrain_bam.py), unless --base is given;
4. the fine-tunes, two at a time: pretrain_bam.py --instruct-data-path ... --pretrained-checkpoint
   SEED, with --peft mov / molora for the adapters, each on the same pairs in the same order;
5. the table: trainable parameters and loss on the held-out pairs' response tokens, plus the
   seed itself (no fine-tuning) for reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "apple river stone cloud maple tiger violet copper harbor lantern meadow falcon pepper "
    "silver candle orbit thunder willow marble canyon ember glacier jasmine kettle"
).split()


# ---------------------------------------------------------------------------------------------
# data


def _task(rng: random.Random) -> tuple[str, str]:
    """One (prompt, response) pair of a random task."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(2, 6))]
    kind = rng.choice(("reverse", "sort", "add", "count", "first", "last", "copy"))
    if kind == "reverse":
        inp, out = " ".join(words), " ".join(reversed(words))
    elif kind == "sort":
        inp, out = " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers)))
    elif kind == "add":
        a, b = numbers[:2]
        inp, out = f"{a} + {b}", str(a + b)
    elif kind == "count":
        inp, out = " ".join(words), str(len(words))
    elif kind == "first":
        inp, out = " ".join(words), words[0]
    elif kind == "last":
        inp, out = " ".join(words), words[-1]
    else:
        inp, out = " ".join(words), " ".join(words)
    return f"Task: {kind}\nInput: {inp}\nOutput:", f" {out}"


def _document(rng: random.Random) -> str:
    """Task-free pre-training text: lines of random words and numbers."""
    lines = []
    for _ in range(rng.randint(4, 12)):
        if rng.random() < 0.5:
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))))
        else:
            lines.append(" ".join(str(rng.randint(0, 199)) for _ in range(rng.randint(3, 10))))
    return "\n".join(lines)


def write_data(workdir: str, train_pairs: int, valid_pairs: int, documents: int) -> dict[str, str]:
    """The generated files (fixed seeds: the same files every time)."""
    paths = {name: os.path.join(workdir, "data", f"{name}.jsonl") for name in ("train", "valid", "pretrain")}
    os.makedirs(os.path.dirname(paths["train"]), exist_ok=True)
    rng = random.Random(1234)
    pairs = [_task(rng) for _ in range(train_pairs + valid_pairs)]
    for name, chunk in (("train", pairs[:train_pairs]), ("valid", pairs[train_pairs:])):
        with open(paths[name], "w") as f:
            f.writelines(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in chunk)
    docs = random.Random(99)
    texts = [_document(docs) for _ in range(documents)]
    with open(paths["pretrain"], "w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    paths["tokenizer"] = os.path.join(workdir, "data", "tokenizer.txt")  # plain text: both kinds of data
    with open(paths["tokenizer"], "w") as f:
        f.writelines(text + "\n" for text in texts + [p + r for p, r in pairs[:train_pairs]])
    return paths


# ---------------------------------------------------------------------------------------------
# runs


def _run(argv: list[str], log: str, threads: int) -> float:
    """Run one stage, output to ``log``; seconds taken. A failure shows the log's tail and exits."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each stage is a world of one
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, *argv], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        sys.exit(f"{' '.join(argv[:2])} failed (exit {code}); last lines of {log}:\n{tail}")
    return time.perf_counter() - start


def _heldout_loss(path: str) -> float:
    """The last held-out loss in a run's metrics file."""
    losses = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == "valid":
                losses.append(record["loss"]["instruct"])
    if not losses:
        raise RuntimeError(f"no validation record in {path}")
    return losses[-1]


def _trainable(log: str) -> tuple[int, int]:
    """(trainable, total) from the run's first report line."""
    with open(log) as f:
        for line in f:
            if "parameters on rank 0," in line:  # "... 123,072 parameters on rank 0, 11,904 trainable (..)"
                total = int(line.split(" parameters on rank 0")[0].split()[-1].replace(",", ""))
                trainable = int(line.split("rank 0, ")[1].split()[0].replace(",", ""))
                return trainable, total
    raise RuntimeError(f"no parameter report in {log}")


def _architecture_of(base: str) -> list[str]:
    """pretrain_bam.py's architecture flags of a checkpoint (a run must repeat them to load it)."""
    sys.path.insert(0, REPO)
    from bam_megatron.checkpoint import read_meta, resolve_checkpoint

    saved = read_meta(resolve_checkpoint(base))["args"]
    flags = []
    for key in (
        "variant",
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "block_type",
        "normalization",
        "rotary_base",
    ):
        if saved.get(key) is not None:
            flags += [f"--{key.replace('_', '-')}", str(saved[key])]
    if saved["variant"] != "dense":
        flags += ["--num-experts", str(saved["num_experts"])]
    untie = saved["untie_embeddings_and_output_weights"]
    return flags + ["--untie-embeddings-and-output-weights" if untie else "--no-untie-embeddings-and-output-weights"]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "peft_instruct"))
    parser.add_argument(
        "--base", default=None, help="seed checkpoint to fine-tune (a --save directory); skips stages 2-3"
    )
    parser.add_argument("--tokenizer-model", default=None, help="the seed's tokenizer (with --base)")
    parser.add_argument("--experts", type=int, default=10, help="adapter experts of MoV and MoLoRA")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    parser.add_argument("--iters", type=int, default=200, help="fine-tuning iterations")
    parser.add_argument("--seed-iters", type=int, default=200, help="seed pre-training iterations")
    parser.add_argument("--lr-full", type=float, default=1e-3)
    parser.add_argument("--lr-adapters", type=float, default=1e-2, help="learning rate of (IA)3, LoRA, MoV, MoLoRA")
    parser.add_argument("--quick", action="store_true", help="small everything: a smoke run")
    args = parser.parse_args(argv)
    if (args.base is None) != (args.tokenizer_model is None):
        parser.error("--base and --tokenizer-model go together")
    if args.quick:
        args.iters, args.seed_iters = 30, 30

    work = os.path.abspath(args.workdir)
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    log = lambda name: os.path.join(work, "logs", f"{name}.log")  # noqa: E731
    started = time.perf_counter()
    n_train, n_valid = (400, 64) if args.quick else (4000, 256)
    data = write_data(work, n_train, n_valid, 200 if args.quick else 2000)
    print(f"data: {n_train} training and {n_valid} held-out instruction pairs, 7 tasks -> {work}/data", flush=True)

    shape = ["--seq-length", "64", "--micro-batch-size", "16"]
    if args.base is None:
        sizes = [
            "--variant",
            "dense",
            "--num-layers",
            "4",
            "--hidden-size",
            "128",
            "--num-attention-heads",
            "4",
            "--ffn-hidden-size",
            "384",
            *shape,
        ]
        tokenizer = os.path.join(work, "tok", "spm")
        _run(
            [
                "tools/train_tokenizer.py",
                "--input",
                data["tokenizer"],
                "--vocab-size",
                "400",
                "--output-prefix",
                tokenizer,
            ],
            log("tokenizer"),
            2,
        )
        tokenizer += ".model"
        prefix = os.path.join(work, "data", "pretrain")
        _run(
            [
                "tools/preprocess_data.py",
                "--input",
                data["pretrain"],
                "--tokenizer-model",
                tokenizer,
                "--output-prefix",
                prefix,
                "--append-eod",
                "--workers",
                "1",
            ],
            log("preprocess"),
            2,
        )
        base = os.path.join(work, "seed")
        seconds = _run(
            [
                "pretrain_bam.py",
                *sizes,
                "--data-path",
                prefix + "_text_document",
                "--tokenizer-model",
                tokenizer,
                "--train-iters",
                str(args.seed_iters),
                "--lr",
                "3e-3",
                "--lr-warmup-iters",
                "20",
                "--eval-iters",
                "0",
                "--log-interval",
                "50",
                "--save",
                base,
            ],
            log("seed"),
            2,
        )
        print(f"seed: pre-trained {args.seed_iters} iterations on task-free text ({seconds:.0f} s)", flush=True)
    else:
        base, tokenizer = args.base, args.tokenizer_model
        sizes = [*_architecture_of(base), *shape]

    eval_iters = math.ceil(n_valid / 16)
    common = [
        *sizes,
        "--tokenizer-model",
        tokenizer,
        "--instruct-data-path",
        data["train"],
        "--instruct-valid-path",
        data["valid"],
        "--pretrained-checkpoint",
        base,
        "--eval-iters",
        str(eval_iters),
        "--log-interval",
        "50",
    ]
    e = str(args.experts)
    lora = ["--lora-rank", str(args.rank), "--lora-alpha", str(args.alpha)]
    adapters = ["--lr", str(args.lr_adapters), "--lr-warmup-iters", "10"]
    runs = {  # log name: (table row, flags)
        "base": ("seed (no fine-tuning)", ["--lr", "0", "--min-lr", "0", "--train-iters", "1", "--eval-interval", "1"]),
        "full": ("full fine-tuning", ["--lr", str(args.lr_full), "--lr-warmup-iters", "10"]),
        "ia3": ("(IA)3", [*adapters, "--peft", "mov", "--peft-num-experts", "1"]),
        "lora": ("LoRA", [*adapters, "--peft", "molora", "--peft-num-experts", "1", *lora]),
        "mov": (f"MoV (E={e})", [*adapters, "--peft", "mov", "--peft-num-experts", e]),
        "molora": (f"MoLoRA (E={e})", [*adapters, "--peft", "molora", "--peft-num-experts", e, *lora]),
    }

    def fine_tune(item):
        key, (name, flags) = item
        metrics = os.path.join(work, "finetune", f"{key}.jsonl")
        os.makedirs(os.path.dirname(metrics), exist_ok=True)
        if os.path.exists(metrics):
            os.remove(metrics)
        iters = (
            ["--train-iters", str(args.iters), "--eval-interval", str(args.iters)]
            if "--train-iters" not in flags
            else []
        )
        seconds = _run(["pretrain_bam.py", *common, *iters, *flags, "--metrics-file", metrics], log(key), 1)
        loss = _heldout_loss(metrics)
        trainable, total = _trainable(log(key))
        print(f"  {name}: held-out loss {loss:.4f} ({seconds:.0f} s)", flush=True)
        return name, loss, trainable, total, seconds

    print(f"fine-tuning {len(runs) - 1} ways, {args.iters} iterations x 16 pairs, two at a time:", flush=True)
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(fine_tune, runs.items()))

    print(
        f"\nheld-out loss on the response tokens of {n_valid} unseen pairs "
        f"({sizes[sizes.index('--variant') + 1]} seed, "
        f"{args.iters} fine-tuning iterations):\n"
    )
    print("| method | trainable params | % of model | held-out loss | ppl |")
    print("|---|---:|---:|---:|---:|")
    for name, loss, trainable, total, _ in rows:
        shown = "0" if name.startswith("seed") else f"{trainable:,}"
        pct = "—" if name.startswith("seed") else f"{100 * trainable / total:.2f}"
        print(f"| {name} | {shown} | {pct} | {loss:.4f} | {math.exp(loss):.2f} |")
    print(f"\ntotal time {time.perf_counter() - started:.0f} s; logs in {work}/logs")


if __name__ == "__main__":
    main()
