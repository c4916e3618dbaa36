"""The demo's stages and the flags each passes to the project's tools (see run.py for the overview).

``Settings`` holds the sizes and schedules (``QUICK``: --quick); ``Pipeline`` runs the nine stages
in order (data, tokenizer, preprocess, seed, branch, experts, upcycle, mixtures, evaluate), each
through ``runner.Stages.stage`` so finished ones are skipped; ``report`` prints the result.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from . import corpora
from .runner import (
    Console,
    EvalFilter,
    Job,
    PrefixFilter,
    Stages,
    TrainingFilter,
    Unit,
    file_hash,
    python,
    run_jobs,
    torchrun,
)

DOMAINS = ("general", "code", "law", "math")
EXPERTS = ("code", "law", "math")  # the seed is the fourth expert (the generalist)
MIXTURES = ("btx", "bam", "btx-domain", "bam-domain")
"""Every mixture the demo builds: bam-upcycle's method, with random routers (the paper's, bam-upcycle's
default) or, with the suffix ``-domain``, routers initialised from each expert's domain
(``--router-init domain``, the data each expert's run recorded)."""
STAGES = 9


def method(mixture: str) -> str:
    """bam-upcycle's --method of ``mixture`` ('bam-domain' -> 'bam')."""
    return mixture.removesuffix("-domain")


def label(mixture: str) -> str:
    """How the report names ``mixture``: 'BAM', 'BAM (domain routers)'."""
    return method(mixture).upper() + (" (domain routers)" if mixture.endswith("-domain") else "")


def step0_name(mixture: str) -> str:
    """tools/eval.py's model name for the upcycled checkpoint of ``mixture`` (routing at step 0)."""
    return f"{mixture}-step0"


@dataclass(frozen=True)
class Settings:
    """Sizes and schedules. The full demo took 9-11 minutes on 2 CPU cores shared with other jobs before the
    domain-router mixtures were added (--quick: about 2 minutes); every run gave the same table (training
    is deterministic)."""

    domain_bytes: int = 400_000  # of text per domain
    vocab_size: int = 1536
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    seq_length: int = 128
    micro_batch_size: int = 8  # x 2 data-parallel ranks
    split: str = "94,5,1"  # train, valid (evaluated), test (held out) documents of every domain
    seed_iters: int = 1200
    seed_lr: float = 3e-3
    warmup_iters: int = 50
    expert_iters: int = 500  # LR: tools/branch.py's, half the seed's
    mix_iters: int = 500
    mix_lr: float = 1e-3
    eval_iters: int = 4  # validation batches per domain at the end of each training run
    eval_samples: Optional[int] = None  # final evaluation, per domain: None = the whole valid split
    log_lines: int = 5  # iteration lines shown per training run (about)
    mixtures: tuple[str, ...] = MIXTURES  # upcycled and trained
    step0_mixtures: tuple[str, ...] = MIXTURES  # also evaluated as upcycled: the routing at step 0


QUICK = dict(
    seed_iters=30,
    expert_iters=10,
    mix_iters=10,
    warmup_iters=3,
    eval_iters=1,
    eval_samples=16,
    log_lines=2,
    mixtures=("btx", "bam"),
    step0_mixtures=("bam", "bam-domain"),  # domain routers shown at step 0 only: no training run more
)


class Pipeline(Stages):
    """The demo's stages under ``workdir``: ``nproc`` ranks per training run, up to ``jobs`` runs at once."""

    def __init__(self, workdir: str, settings: Settings, nproc: int, jobs: int, console: Console) -> None:
        super().__init__(workdir, console)
        self.s, self.nproc, self.jobs = settings, nproc, jobs

    # ----- flags shared by the training runs

    def prefix(self, domain: str) -> str:
        """The indexed dataset of ``domain`` (preprocess's output prefix)."""
        return self.path("data", "bin", f"{domain}_text_document")

    def equal_mixture(self) -> list[str]:
        """--data-path flags: the four domains, equal weights."""
        flags = ["--data-path"]
        for d in DOMAINS:
            flags += [str(1 / len(DOMAINS)), self.prefix(d)]
        return flags

    def every(self, iters: int) -> int:
        """Log interval: a round number giving about ``log_lines`` lines."""
        step = max(1, iters // self.s.log_lines)
        scale = 10 ** (len(str(step)) - 1)
        return max(m * scale for m in (1, 2, 5) if m * scale <= step)

    def schedule(self, iters: int, lr: Optional[float]) -> list[str]:
        """Iterations, LR (None: the one in the run's own flags), warmup, logging, evaluation and saving."""
        s = self.s
        flags = [] if lr is None else ["--lr", repr(lr), "--min-lr", repr(lr / 10)]
        return flags + [
            "--train-iters",
            str(iters),
            "--lr-warmup-iters",
            str(min(s.warmup_iters, iters // 2)),
            "--lr-decay-style",
            "cosine",
            "--log-interval",
            str(self.every(iters)),
            "--eval-interval",
            str(iters),
            "--eval-iters",
            str(s.eval_iters),
            "--save-interval",
            str(iters),
        ]

    def training(self, key: str, out: str, flags: list[str], iters: int) -> Callable[[], Job]:
        """A pretrain_bam.py run into OUT.tmp, renamed to OUT when it succeeded."""
        tmp = out + ".tmp"
        argv = torchrun(self.nproc, "pretrain_bam.py", *flags, "--load", tmp, "--save", tmp)
        return lambda: Job(key, argv, self.log(key), TrainingFilter(self.every(iters)), lambda: os.replace(tmp, out))

    def _rel(self, flags: Sequence[str]) -> list[str]:
        """Flags without the work directory (stamps survive moving it)."""
        return [f.replace(self.w, "W") for f in flags]

    # ----- the pipeline

    def run(self) -> None:
        """Every stage in order; a finished one is skipped."""
        for stage in (
            self.data,
            self.tokenizer,
            self.preprocess,
            self.seed,
            self.branch,
            self.experts,
            self.upcycle,
            self.mixtures,
            self.evaluate,
        ):
            stage()

    def data(self) -> None:
        """Stage 1: the four domains of text as JSONL (corpora.py)."""
        out = self.path("data", "jsonl")

        def build() -> None:
            corpora.build_corpora(out + ".tmp", self.s.domain_bytes, DOMAINS, log=self.console.line)
            os.replace(out + ".tmp", out)

        params = {"bytes": self.s.domain_bytes, "source": file_hash("examples/bam_demo/corpora.py")}
        self.stage(
            "data",
            f"data: four domains of text, about {self.s.domain_bytes // 1000} KB each",
            [Unit("data", [out], params, [], work=build)],
        )

    def jsonl(self, domain: str) -> str:
        """The JSONL file of ``domain``."""
        return self.path("data", "jsonl", f"{domain}.jsonl")

    def spm(self) -> str:
        """The SentencePiece model."""
        return self.path("data", "tokenizer", "spm.model")

    def tokenizer(self) -> None:
        """Stage 2: one SentencePiece model for all domains (tools/train_tokenizer.py)."""
        out = os.path.dirname(self.spm())

        def job() -> Job:
            os.makedirs(out + ".tmp")
            argv = python(
                "tools/train_tokenizer.py",
                "--input",
                *map(self.jsonl, DOMAINS),
                "--vocab-size",
                str(self.s.vocab_size),
                "--output-prefix",
                os.path.join(out + ".tmp", "spm"),
                "--workers",
                str(self.nproc),
            )
            return Job("tokenizer", argv, self.log("tokenizer"), on_success=lambda: os.replace(out + ".tmp", out))

        self.stage(
            "tokenizer",
            f"tokenizer: SentencePiece BPE, {self.s.vocab_size} pieces, on all four domains",
            [Unit("tokenizer", [out], {"vocab": self.s.vocab_size}, ["data"], job=job)],
        )

    def preprocess(self) -> None:
        """Stage 3: JSONL -> indexed datasets, one per domain (tools/preprocess_data.py)."""
        out = os.path.dirname(self.prefix("general"))

        def work() -> None:
            os.makedirs(out + ".tmp")
            jobs = [
                Job(
                    d,
                    python(
                        "tools/preprocess_data.py",
                        "--input",
                        self.jsonl(d),
                        "--tokenizer-model",
                        self.spm(),
                        "--output-prefix",
                        os.path.join(out + ".tmp", d),
                        "--append-eod",
                        "--workers",
                        "1",
                    ),
                    self.log(f"preprocess-{d}"),
                    PrefixFilter("wrote"),
                )
                for d in DOMAINS
            ]
            # one process each: as many at once as a training stage runs (jobs x ranks)
            run_jobs(self.console, "preprocess", jobs, parallel=self.jobs * self.nproc)
            os.replace(out + ".tmp", out)

        self.stage(
            "preprocess",
            "preprocess: JSONL -> megatron-core indexed datasets, one per domain",
            [Unit("preprocess", [out], {}, ["tokenizer"], work=work)],
        )

    def architecture(self) -> list[str]:
        """The seed's architecture; every later run takes it from the checkpoint it starts from."""
        s = self.s
        return [
            "--variant",
            "dense",
            "--num-layers",
            str(s.num_layers),
            "--hidden-size",
            str(s.hidden_size),
            "--ffn-hidden-size",
            str(s.ffn_hidden_size),
            "--num-attention-heads",
            str(s.num_attention_heads),
            "--num-query-groups",
            str(s.num_attention_heads),
            "--seq-length",
            str(s.seq_length),
        ]

    def common(self) -> list[str]:
        """Tokenizer, data split and batch: the same for every training run."""
        s = self.s
        return [
            "--tokenizer-model",
            self.spm(),
            "--split",
            s.split,
            "--micro-batch-size",
            str(s.micro_batch_size),
        ]

    def seed(self) -> None:
        """Stage 4: the dense seed on the equal mixture (pretrain_bam.py --variant dense)."""
        s, out = self.s, self.path("seed")
        flags = [*self.architecture(), *self.common(), *self.equal_mixture(), *self.schedule(s.seed_iters, s.seed_lr)]
        self.stage(
            "seed",
            f"phase 1: dense seed on an equal mixture of the four domains, {s.seed_iters} iterations",
            [
                Unit(
                    "seed",
                    [out],
                    {"flags": self._rel(flags)},
                    ["preprocess"],
                    job=self.training("seed", out, flags, s.seed_iters),
                )
            ],
        )

    def expert_dir(self, expert: str) -> str:
        """The branch of ``expert``: tools/branch.py's copy of the seed and its phase2.args."""
        return self.path("experts", expert)

    def branch(self) -> None:
        """Stage 5: three copies of the seed with their phase-2 flags (tools/branch.py)."""
        argv = python(
            "tools/branch.py",
            "--seed-checkpoint",
            self.path("seed"),
            "--output-dir",
            self.path("experts"),
            "--experts",
            *EXPERTS,
            "--domain-data",
            *[f"{e}={self.prefix(e)}" for e in EXPERTS],
            "--general-data",
            self.prefix("general"),
        )
        outputs = [self.path("experts"), *[os.path.join(self.expert_dir(e), "phase2.args") for e in EXPERTS]]
        self.stage(
            "branch",
            f"phase 1: branch the seed into {', '.join(EXPERTS)} experts",
            [Unit("branch", outputs, {}, ["seed"], job=lambda: Job("branch", argv, self.log("branch")))],
        )

    def experts(self) -> None:
        """Stage 6: each expert continues on its domain (pretrain_bam.py @phase2.args)."""
        units = []
        for e in EXPERTS:  # tools/branch.py's flags (data mixture, LR), then the schedule
            out = os.path.join(self.expert_dir(e), "ckpt")
            flags = [f"@{os.path.join(self.expert_dir(e), 'phase2.args')}", *self.schedule(self.s.expert_iters, None)]
            units.append(
                Unit(
                    f"expert-{e}",
                    [out],
                    {"flags": self._rel(flags)},
                    ["branch"],
                    job=self.training(e, out, flags, self.s.expert_iters),
                )
            )
        self.stage(
            "experts",
            f"phase 2: each expert continues on 90% its domain + 10% general, {self.s.expert_iters} iterations",
            units,
            parallel=self.jobs,
        )

    def sources(self) -> dict[str, str]:
        """The dense models, in expert order: the seed first."""
        return {"seed": self.path("seed"), **{e: os.path.join(self.expert_dir(e), "ckpt") for e in EXPERTS}}

    def upcycle_argv(self, method: str, sources: dict[str, str], out: str, *extra: str) -> list[str]:
        """tools/upcycle.py: ``sources`` (name -> dense checkpoint, in expert order) into a ``method`` mixture."""
        experts = [x for n, p in sources.items() for x in ("--expert", f"{n}={p}")]
        return python("tools/upcycle.py", *experts, "--method", method, "--save", out, *extra)

    def upcycled(self) -> list[str]:
        """The mixtures upcycled: those trained and those evaluated at step 0, in ``MIXTURES`` order."""
        return [m for m in MIXTURES if m in self.s.mixtures or m in self.s.step0_mixtures]

    def upcycle(self) -> None:
        """Stage 7: seed + experts -> 4-expert BAM and BTX checkpoints (tools/upcycle.py), with random
        routers and with domain routers."""
        units = []
        for m in self.upcycled():
            out = self.path(f"{m}-init")
            extra = ["--router-init", "domain"] if m != method(m) else []
            argv = self.upcycle_argv(method(m), self.sources(), out, *extra)
            units.append(
                Unit(
                    f"upcycle-{m}",
                    [out],
                    {},
                    ["seed", *[f"expert-{e}" for e in EXPERTS]],
                    job=lambda m=m, argv=argv: Job(m, argv, self.log(f"upcycle-{m}")),
                )
            )
        self.stage(
            "upcycle",
            f"phase 3: upcycle seed + experts into 4-expert mixtures: {', '.join(map(label, self.upcycled()))}",
            units,
            parallel=self.jobs,  # one process each: --jobs of them share the cores
        )

    def mixture_flags(self, init: str, iters: int) -> list[str]:
        """Phase-3 training of the upcycled checkpoint ``init`` on the equal mixture for ``iters`` iterations
        (no architecture flags: pretrain_bam.py reads it from the checkpoint)."""
        return [
            *self.common(),
            *self.equal_mixture(),
            *self.schedule(iters, self.s.mix_lr),
            "--pretrained-checkpoint",
            init,
        ]

    def mixtures(self) -> None:
        """Stage 8: the mixtures trained on the equal mixture (their architecture from the upcycled checkpoints)."""
        s, units = self.s, []
        for m in s.mixtures:
            flags = self.mixture_flags(self.path(f"{m}-init"), s.mix_iters)
            units.append(
                Unit(
                    m,
                    [self.path(m)],
                    {"flags": self._rel(flags)},
                    [f"upcycle-{m}"],
                    job=self.training(m, self.path(m), flags, s.mix_iters),
                )
            )
        self.stage(
            "mixtures",
            f"phase 3: train {', '.join(map(label, s.mixtures))} on the equal mixture (BTX: averaged attention, "
            f"BAM: soft MoA), {s.mix_iters} iterations",
            units,
            parallel=self.jobs,
        )

    def eval_args(
        self,
        models: dict[str, str],
        expert_names: Optional[Sequence[str]],
        out: str,
        prefixes: Optional[Sequence[str]] = None,
    ) -> list[str]:
        """tools/eval.py's flags: ``models`` (name -> checkpoint) on the validation split of every domain
        (or of the datasets ``prefixes``) into ``out``; without ``expert_names``, each mixture's own."""
        args = [
            *[x for n, p in models.items() for x in ("--model", f"{n}={p}")],
            "--data-path",
            *(prefixes or map(self.prefix, DOMAINS)),
            "--split",
            self.s.split,
            "--seq-length",
            str(self.s.seq_length),
            "--tokenizer-model",
            self.spm(),
            *(["--expert-names", *expert_names] if expert_names else []),
            "--output-dir",
            out,
        ]
        return args + (["--eval-samples", str(self.s.eval_samples)] if self.s.eval_samples else [])

    def evaluate(self) -> None:
        """Stage 9: per-domain perplexity of the dense models and the mixtures (trained, and upcycled at
        step 0), routing heatmaps of each mixture at step 0 and trained side by side (tools/eval.py)."""
        s, out = self.s, self.path("eval")
        models = {**self.sources(), **{m: self.path(m) for m in s.mixtures}}
        models.update({step0_name(m): self.path(f"{m}-init") for m in s.step0_mixtures})
        args = self.eval_args(models, list(self.sources()), out + ".tmp")

        def done() -> None:
            write_step0_vs_trained(out + ".tmp")
            os.replace(out + ".tmp", out)

        def job() -> Job:
            return Job("eval", torchrun(self.nproc, "tools/eval.py", *args), self.log("eval"), EvalFilter(), done)

        deps = ["seed", *[f"expert-{e}" for e in EXPERTS], *s.mixtures, *[f"upcycle-{m}" for m in s.step0_mixtures]]
        self.stage(
            "evaluate",
            f"evaluate: per-domain perplexity of all {len(models)} models, routing of the mixtures",
            [Unit("eval", [out], {"args": self._rel(args)}, deps, job=job)],
        )


def routing_states(eval_dir: str) -> dict[str, dict[str, dict]]:
    """{mixture: {"step 0": routing.json entry, "trained": entry}} of ``eval_dir``, the states evaluated."""
    with open(os.path.join(eval_dir, "routing.json")) as f:
        models = json.load(f)["models"]
    states: dict[str, dict[str, dict]] = {}
    for m in MIXTURES:
        for state, name in (("step 0", step0_name(m)), ("trained", m)):
            if name in models:
                states.setdefault(m, {})[state] = models[name]
    return states


def comparison_figure(mixture: str) -> str:
    """File name of ``mixture``'s routing at step 0 and trained, side by side."""
    return f"routing_{mixture}_step0_vs_trained.png"


def write_step0_vs_trained(eval_dir: str) -> None:
    """Draw each mixture evaluated both at step 0 and trained, the two side by side, into ``eval_dir``."""
    from bam_megatron.evaluation.report import routing_heatmap_png

    with open(os.path.join(eval_dir, "routing.json")) as f:
        domains = json.load(f)["domains"]
    for m, states in routing_states(eval_dir).items():
        if len(states) == 2:
            names = states["trained"]["expert_names"]
            png = routing_heatmap_png(f"{label(m)}, step 0 and trained", states, domains, names)
            with open(os.path.join(eval_dir, comparison_figure(m)), "wb") as f:
                f.write(png)


# ---------------------------------------------------------------------------------------------
# the result


def report(workdir: str) -> bool:
    """Print the perplexity table, the checks and the own-expert shares; return whether every
    expectation of the method holds (each expert wins its domain, every trained mixture beats the seed)."""
    eval_dir = os.path.join(workdir, "eval")
    with open(os.path.join(eval_dir, "perplexity.json")) as f:
        result = json.load(f)
    with open(os.path.join(eval_dir, "perplexity.md")) as f:
        table = f.read()
    ppl = {name: m["perplexity"] for name, m in result["models"].items()}
    trained = [m for m in MIXTURES if m in ppl]
    print("\n" + "=" * 100)
    print(table.rstrip() + "\n")
    checks = [(f"the {e} expert beats the seed on {e}", ppl[e][e], ppl["seed"][e]) for e in EXPERTS]
    checks += [(f"{label(m)} beats the seed on average", ppl[m]["average"], ppl["seed"]["average"]) for m in trained]
    for text, ours, seeds in checks:
        print(f"  [{'yes' if ours < seeds else 'NO '}] {text} (perplexity {ours:.2f} vs {seeds:.2f})")
    pairs = [("bam", "btx", "BAM vs BTX")]
    pairs += [(m, method(m), f"{label(m)} vs random routers") for m in trained if m != method(m)]
    for a, b, text in pairs:
        if a in ppl and b in ppl:
            x, y = ppl[a]["average"], ppl[b]["average"]
            print(f"  (and {text} on average: {x:.2f} vs {y:.2f}: {label(a) if x < y else label(b)} is lower)")
    holds = all(ours < seeds for _, ours, seeds in checks)
    print(
        "\n"
        + (
            "As expected: every expert wins its domain, and every mixture beats the seed."
            if holds
            else "Not every expectation held on this run (small models, few steps; see the table)."
        )
    )
    with open(os.path.join(eval_dir, "routing.md")) as f:
        own = f.read().split("\n\n", 2)[2]
    print("\nOwn expert's share of each domain's tokens (mean over layers, then each layer's):\n")
    print(own.rstrip())
    domain_router_checks(routing_states(eval_dir))
    figures = sorted(glob.glob(os.path.join(eval_dir, "*.png")))
    print(f"\nRouting heatmaps: {', '.join(figures) if figures else '(none written)'}")
    print(f"Table: {os.path.join(eval_dir, 'perplexity.md')}   logs: {os.path.join(workdir, 'logs')}")
    return holds


DOMAIN_ROUTER_TARGETS = {"ffn step 0": 0.6, "attention step 0": 0.5, "ffn trained": 0.1}
"""What domain routers should give on the full demo's checkpoints (issue 22), for each expert's domain at
every layer: its own FFN expert's top-1 share at step 0, its own attention expert's mean gate at step 0
(also the largest gate), its own FFN expert's share after the mixture phase."""


def domain_router_checks(states: dict[str, dict[str, dict]]) -> None:
    """Print, for each mixture with domain routers, the smallest own-expert share over the experts'
    domains and the layers against ``DOMAIN_ROUTER_TARGETS`` (not an expectation of --quick's experts)."""
    lines = []
    for m, by_state in states.items():
        if m == method(m):
            continue
        for state, entry in by_state.items():
            for kind, key in (("ffn_selection", "ffn"), ("attention_gates", "attention")):
                target = DOMAIN_ROUTER_TARGETS.get(f"{key} {state}")
                if target is None or kind not in entry:
                    continue
                share, domain, layer = min(
                    (value, domain, layer)
                    for domain in EXPERTS
                    for layer, value in enumerate(entry["own_expert"][domain][kind]["per_layer"])
                )
                largest = all(
                    row[entry["expert_names"].index(d)] == max(row) for d in EXPERTS for row in entry[kind][d]
                )
                ok = share >= target and (kind == "ffn_selection" or largest)
                what = "FFN top-1 share" if kind == "ffn_selection" else "attention gate (the largest)"
                lines.append(
                    f"  [{'yes' if ok else 'NO '}] {label(m)}, {state}: own {what} >= {target:.0%} for "
                    f"{', '.join(EXPERTS)} at every layer (lowest: {share:.2f}, {domain}, layer {layer})"
                )
    if lines:
        print("\nDomain routers: each domain's own expert, at every layer")
        print("\n".join(lines))
