"""The demo's optional ``--grow`` stages: a trained BAM mixture gains a fifth domain without starting over.

10. grow-data     a fifth domain, ``bio`` (synthetic gene records, bio.py), tokenized with the demo's
                  tokenizer (the grown mixture keeps its vocabulary)
11. grow-branch   tools/branch.py: a copy of the same seed for bio (the lineage check needs it)
12. grow-expert   pretrain_bam.py @phase2.args: the bio expert, as long as the other experts
13. grow-extend   tools/upcycle.py --extend: the trained BAM mixture + the bio expert -> 5 experts,
                  with its step-0 report (how much the mixture's function moved)
14. grow-train    pretrain_bam.py --freeze-old-experts: a short re-training on all five domains,
                  the four old experts frozen, the new one, the routers and the shared parts trained
15. grow-evaluate tools/eval.py: the mixture before and after, at step 0 and trained, on five domains

``grow_report`` prints the table and checks that bio improves while every old domain stays within
``MARGIN`` of the mixture it grew from.
"""

from __future__ import annotations

import json
import os
import random

from . import bio, corpora
from .pipeline import DOMAINS, Pipeline
from .runner import EvalFilter, Job, PrefixFilter, Unit, file_hash, python, run_jobs, torchrun

NEW_DOMAIN = "bio"
GROW_STAGES = 6
# An old domain's perplexity may rise by at most this much over the mixture it grew from. The full demo
# measured +1.4% to +6.4% (docs/phases.md): most of it is there at step 0 already, where the new
# router rows take gate mass from the old experts (softmax routers without biases).
MARGIN = 0.10


class GrowPipeline(Pipeline):
    """The nine stages of the demo, then the six ``--grow`` stages."""

    def run(self) -> None:
        """The demo, then the growth of its BAM mixture."""
        super().run()
        for stage in (
            self.grow_data,
            self.grow_branch,
            self.grow_expert,
            self.grow_extend,
            self.grow_train,
            self.grow_evaluate,
        ):
            stage()

    def bio_prefix(self) -> str:
        """The bio domain's indexed dataset."""
        return self.path("grow", "bin", f"{NEW_DOMAIN}_text_document")

    def all_domains(self) -> dict[str, str]:
        """Domain -> indexed dataset prefix, the four old ones and bio."""
        return {**{d: self.prefix(d) for d in DOMAINS}, NEW_DOMAIN: self.bio_prefix()}

    def grow_data(self) -> None:
        """Stage 10: bio JSONL, then its indexed dataset with the demo's tokenizer."""
        out = os.path.dirname(self.bio_prefix())

        def work() -> None:
            os.makedirs(out + ".tmp")
            docs = bio.bio_documents(self.s.domain_bytes)
            random.Random(f"{corpora.SHUFFLE_SEED}-{NEW_DOMAIN}").shuffle(docs)
            jsonl = os.path.join(out + ".tmp", f"{NEW_DOMAIN}.jsonl")
            corpora.write_jsonl(jsonl, docs)
            argv = python(
                "tools/preprocess_data.py",
                "--input",
                jsonl,
                "--tokenizer-model",
                self.spm(),
                "--output-prefix",
                os.path.join(out + ".tmp", NEW_DOMAIN),
                "--append-eod",
                "--workers",
                "1",
            )
            run_jobs(self.console, "grow-data", [Job(NEW_DOMAIN, argv, self.log("grow-data"), PrefixFilter("wrote"))])
            os.replace(out + ".tmp", out)

        self.stage(
            "grow-data",
            f"grow: a fifth domain, {NEW_DOMAIN} (synthetic gene records), with the demo's tokenizer",
            [Unit("grow-data", [out], {"source": file_hash("examples/bam_demo/bio.py")}, ["tokenizer"], work=work)],
        )

    def grow_branch(self) -> None:
        """Stage 11: the seed branched once more, for bio (tools/branch.py)."""
        out = self.path("grow", "experts")
        argv = python(
            "tools/branch.py",
            "--seed-checkpoint",
            self.path("seed"),
            "--output-dir",
            out,
            "--experts",
            NEW_DOMAIN,
            "--domain-data",
            f"{NEW_DOMAIN}={self.bio_prefix()}",
            "--general-data",
            self.prefix("general"),
        )
        self.stage(
            "grow-branch",
            f"grow: branch the seed into a {NEW_DOMAIN} expert",
            [
                Unit(
                    "grow-branch",
                    [out],
                    {},
                    ["seed", "grow-data"],
                    job=lambda: Job("branch", argv, self.log("grow-branch")),
                )
            ],
        )

    def bio_expert(self) -> str:
        """The trained bio expert."""
        return self.path("grow", "experts", NEW_DOMAIN, "ckpt")

    def grow_expert(self) -> None:
        """Stage 12: the bio expert continues on its domain, as long as the other experts did."""
        args_file = self.path("grow", "experts", NEW_DOMAIN, "phase2.args")
        flags = [f"@{args_file}", *self.schedule(self.s.expert_iters, None)]
        self.stage(
            "grow-expert",
            f"grow: the {NEW_DOMAIN} expert on 90% its domain + 10% general, {self.s.expert_iters} iterations",
            [
                Unit(
                    "grow-expert",
                    [self.bio_expert()],
                    {"flags": self._rel(flags)},
                    ["grow-branch"],
                    job=self.training(NEW_DOMAIN, self.bio_expert(), flags, self.s.expert_iters),
                )
            ],
        )

    def grow_extend(self) -> None:
        """Stage 13: the trained BAM mixture + the bio expert -> a 5-expert mixture (tools/upcycle.py --extend)."""
        out = self.path("grow", "bam-bio-init")
        argv = python(
            "tools/upcycle.py",
            "--extend",
            self.path("bam"),
            "--expert",
            f"{NEW_DOMAIN}={self.bio_expert()}",
            # exact at step 0, then the new expert's router offset ramps in over a tenth of the re-training
            "--new-expert-ramp-iters",
            str(self.ramp_iters()),
            "--save",
            out,
        )
        self.stage(
            "grow-extend",
            f"grow: add the {NEW_DOMAIN} expert's attention and FFN to the trained BAM mixture "
            f"(exact at step 0; its router offset ramps in over {self.ramp_iters()} iterations)",
            [
                Unit(
                    "grow-extend",
                    [out],
                    {},
                    ["bam", "grow-expert"],
                    job=lambda: Job("extend", argv, self.log("grow-extend")),
                )
            ],
        )

    def grow_iters(self) -> int:
        """Re-training of the grown mixture: a fifth of phase 3."""
        return max(2, self.s.mix_iters // 5)

    def ramp_iters(self) -> int:
        """The new expert's router-offset ramp (bam-upcycle --new-expert-ramp-iters): a tenth of the
        re-training, so the new expert is routed to for most of it."""
        return max(1, self.grow_iters() // 10)

    def grow_train(self) -> None:
        """Stage 14: a short re-training on all five domains, the old experts frozen."""
        mixture = ["--data-path"]
        for prefix in self.all_domains().values():
            mixture += [str(1 / (len(DOMAINS) + 1)), prefix]
        flags = [
            *self.common(),
            *mixture,
            *self.schedule(self.grow_iters(), self.s.mix_lr),
            "--pretrained-checkpoint",
            self.path("grow", "bam-bio-init"),
            "--freeze-old-experts",
        ]
        out = self.path("grow", "bam-bio")
        self.stage(
            "grow-train",
            f"grow: re-train on all five domains, the old experts frozen, {self.grow_iters()} iterations",
            [
                Unit(
                    "grow-train",
                    [out],
                    {"flags": self._rel(flags)},
                    ["grow-extend"],
                    job=self.training("bam-bio", out, flags, self.grow_iters()),
                )
            ],
        )

    def grow_models(self) -> dict[str, str]:
        """The models the growth table compares."""
        return {
            "seed": self.path("seed"),
            NEW_DOMAIN: self.bio_expert(),
            "bam": self.path("bam"),
            "bam+bio (step 0)": self.path("grow", "bam-bio-init"),
            "bam+bio": self.path("grow", "bam-bio"),
        }

    def grow_evaluate(self) -> None:
        """Stage 15: perplexity of the mixture before and after growing, on five domains (tools/eval.py)."""
        out = self.path("grow", "eval")
        args = self.eval_args(self.grow_models(), None, out + ".tmp", list(self.all_domains().values()))

        def job() -> Job:
            return Job(
                "eval",
                torchrun(self.nproc, "tools/eval.py", *args),
                self.log("grow-eval"),
                EvalFilter(),
                lambda: os.replace(out + ".tmp", out),
            )

        self.stage(
            "grow-evaluate",
            "grow: per-domain perplexity before and after adding the expert",
            [Unit("grow-eval", [out], {"args": self._rel(args)}, ["grow-train", "grow-expert", "bam"], job=job)],
        )


def grow_table(workdir: str) -> tuple[str, bool]:
    """The growth table (markdown) and whether bio improved with every old domain within MARGIN."""
    with open(os.path.join(workdir, "grow", "eval", "perplexity.json")) as f:
        ppl = {name: m["perplexity"] for name, m in json.load(f)["models"].items()}
    domains = [*DOMAINS, NEW_DOMAIN]
    lines = [
        "| model | " + " | ".join(domains) + " | old four, mean |",
        "|---|" + "---:|" * (len(domains) + 1),
    ]
    for name, row in ppl.items():
        old = sum(row[d] for d in DOMAINS) / len(DOMAINS)
        lines.append(f"| {name} | " + " | ".join(f"{row[d]:.2f}" for d in domains) + f" | {old:.2f} |")
    before, after = ppl["bam"], ppl["bam+bio"]
    holds = after[NEW_DOMAIN] < before[NEW_DOMAIN] and all(after[d] <= before[d] * (1 + MARGIN) for d in DOMAINS)
    return "\n".join(lines), holds


def grow_report(workdir: str) -> bool:
    """Print the growth table, the step-0 change and the checks; return whether they hold."""
    table, holds = grow_table(workdir)
    with open(os.path.join(workdir, "grow", "bam-bio-init", "upcycle_manifest.json")) as f:
        step0 = json.load(f).get("step0", {})
    print("\nGrowing the trained BAM mixture by a fifth expert (bio):\n")
    print(table + "\n")
    for name, change in step0.items():
        print(f"  step-0 distance to {name}: KL {change['kl']:.4f}, argmax agreement {change['argmax_agreement']:.1%}")
    print(
        f"  [{'yes' if holds else 'NO '}] bio improves and every old domain stays within {MARGIN:.0%} of the "
        "mixture it grew from"
    )
    return holds
