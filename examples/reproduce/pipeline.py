"""The reproduction's stages: the demo's dense phases, then every arm upcycled, trained and evaluated per seed.

Stages 1-6 are the demo's (``bam_demo.pipeline.Pipeline``: data, tokenizer, preprocess, seed,
branch, experts); then

  7. stats      model_stats.py: parameters and FLOPs per token of every arm (sizes the CM and
                parameter-matched arms, arms.py)
  8. dense      tools/eval.py on the seed and the three experts
  then for each mixture seed s, so that an interrupted run leaves whole seeds:
  9. upcycle    tools/upcycle.py for every upcycled mixture (router seed s)
 10. mixtures   pretrain_bam.py for every arm (data order seed s)
 11. evaluate   tools/eval.py on every arm of seed s (one call per FFN expert count and router
                initialisation; BTX and BAM, random and domain routers, also at step 0, for the
                routing at initialisation)

Everything is skipped when done and current (the demo's stamps under WORKDIR/.stages): a run that
adds arms (a newer arms.py, or --arms) upcycles, trains and evaluates only those; the arms with
random routers are evaluated apart from those with domain routers, so adding the domain-router arms
leaves the other evaluations done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Optional

from bam_demo.pipeline import EXPERTS, Pipeline, Settings, step0_name
from bam_demo.runner import Console, EvalFilter, Job, TrainingFilter, Unit, file_hash, python, torchrun

from .arms import Arm, Init, build_arms, inits_of


def stages(seeds: int) -> int:
    """How many stages a run with ``seeds`` mixture seeds has (for the console's [n/N])."""
    return 8 + 3 * seeds


STEP0_ARMS = ("btx", "bam", "btx-domain", "bam-domain")
"""Arms whose upcycled checkpoints are evaluated too: routing at step 0 against after training."""


class ReproducePipeline(Pipeline):
    """The demo's pipeline, then every arm of arms.py for each of ``seeds``."""

    def __init__(
        self,
        workdir: str,
        settings: Settings,
        nproc: int,
        jobs: int,
        console: Console,
        seeds: Sequence[int],
        only: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(workdir, settings, nproc, jobs, console)
        self.seeds = list(seeds)
        self.arms: list[Arm] = []  # every arm (the report's rows)
        self.only = set(only) if only else None  # the arms this run trains and evaluates (None: all)

    def active_arms(self) -> list[Arm]:
        """The arms this run trains and evaluates (--arms), in order."""
        return [arm for arm in self.arms if self.only is None or arm.key in self.only]

    def run(self) -> None:
        """Every stage in order; a finished one is skipped."""
        for stage in (
            self.data,
            self.tokenizer,
            self.preprocess,
            self.seed,
            self.branch,
            self.experts,
            self.stats,
            self.evaluate_dense,
        ):
            stage()
        for seed in self.seeds:
            self.upcycle_seed(seed)
            self.train_seed(seed)
            self.evaluate_seed(seed)

    def training(self, key: str, out: str, flags: list[str], iters: int) -> Callable[[], Job]:
        """The demo's training job, showing a few iteration lines (the metrics file keeps them all)."""
        make = super().training(key, out, flags, iters)

        def job() -> Job:
            made = make()
            made.show = TrainingFilter(self.every(iters) * max(1, self.s.log_lines // 2))
            return made

        return job

    # ----- paths

    def stats_file(self) -> str:
        """model_stats.py's output."""
        return self.path("stats.json")

    def init_dir(self, init: Init, seed: int) -> str:
        """The upcycled checkpoint of ``init`` with router seed ``seed``."""
        return self.path("inits", f"{init.key}-s{seed}")

    def run_dir(self, arm: Arm, seed: int) -> str:
        """The trained mixture of ``arm`` and ``seed`` (with its metrics.jsonl)."""
        return self.path("runs", f"{arm.key}-s{seed}")

    def eval_dir(self, name: str) -> str:
        """tools/eval.py's output for ``name`` (an arm key, or 'dense')."""
        return self.path("eval", name)

    # ----- stages

    def stats(self) -> None:
        """Stage 7: parameters and FLOPs per token of every configuration; then the arms are known."""
        out = self.stats_file()
        argv = python("examples/reproduce/model_stats.py", "--seed-checkpoint", self.path("seed"), "--output", out)
        params = {"source": file_hash("examples/reproduce/model_stats.py")}
        self.stage(
            "stats",
            "model sizes: parameters and training FLOPs per token of every arm (bam-stats' counting)",
            [Unit("stats", [out], params, ["seed"], job=lambda: Job("stats", argv, self.log("stats")))],
        )
        with open(out) as f:
            self.arms = build_arms(self.s.mix_iters, json.load(f))

    def upcycle_seed(self, seed: int) -> None:
        """Every upcycled mixture with router seed ``seed`` (extra FFN experts are copies of the seed)."""
        dense, units = self.sources(), []
        for init in inits_of(self.active_arms()):
            sources = {name: dense.get(name, dense["seed"]) for name in init.source_names()}
            out = self.init_dir(init, seed)
            argv = self.upcycle_argv(init.method, sources, out, *init.upcycle_flags(), "--seed", str(seed))
            key = f"init-{init.key}-s{seed}"
            units.append(
                Unit(
                    key,
                    [out],
                    {"argv": self._rel(argv[1:])},
                    ["seed", *[f"expert-{e}" for e in EXPERTS]],
                    job=lambda key=key, argv=argv: Job(key, argv, self.log(key)),
                )
            )
        self.stage(
            f"upcycle-s{seed}",
            f"seed {seed}: upcycle {len(units)} mixtures (router seed {seed})",
            units,
            parallel=self.jobs,
        )

    def train_seed(self, seed: int) -> None:
        """Every arm trained on the equal mixture with data seed ``seed``."""
        units = []
        for arm in self.active_arms():
            out = self.run_dir(arm, seed)
            flags = [*self.mixture_flags(self.init_dir(arm.init, seed), arm.iters), "--seed", str(seed)]
            key = f"{arm.key}-s{seed}"
            units.append(
                Unit(
                    key,
                    [out],
                    {"flags": self._rel(flags)},
                    [f"init-{arm.init.key}-s{seed}"],
                    job=self.training(key, out, flags, arm.iters),
                )
            )
        self.stage(
            f"mixtures-s{seed}", f"seed {seed}: train {len(units)} arms on the equal mixture", units, parallel=self.jobs
        )

    def _eval_unit(self, name: str, models: dict[str, str], expert_names: Sequence[str], deps: list[str]) -> Unit:
        out = self.eval_dir(name)
        args = self.eval_args(models, expert_names, out + ".tmp")
        return Unit(
            f"eval-{name}",
            [out],
            {"args": self._rel(args)},
            deps,
            job=lambda: Job(
                f"eval-{name}",
                torchrun(self.nproc, "tools/eval.py", *args),
                self.log(f"eval-{name}"),
                EvalFilter(),
                on_success=lambda: os.replace(out + ".tmp", out),
            ),
        )

    def evaluate_dense(self) -> None:
        """Per-domain perplexity of the seed and the experts (shared by every arm)."""
        deps = ["seed", *[f"expert-{e}" for e in EXPERTS]]
        self.stage(
            "evaluate-dense",
            "evaluate the dense seed and experts",
            [self._eval_unit("dense", self.sources(), list(self.sources()), deps)],
        )

    @staticmethod
    def eval_group(arm: Arm) -> str:
        """Arms evaluated together: tools/eval.py takes one list of expert names, so by FFN expert count;
        and by router initialisation, so that the domain-router arms are added without evaluating the others again."""
        return f"e{arm.init.experts}" + ("" if arm.init.router_init == "random" else f"-{arm.init.router_init}")

    def eval_groups(self) -> dict[str, list[Arm]]:
        """The active arms by `eval_group`."""
        groups: dict[str, list[Arm]] = {}
        for arm in self.active_arms():
            groups.setdefault(self.eval_group(arm), []).append(arm)
        return groups

    def eval_name(self, arm: Arm, seed: int) -> str:
        """The evaluation that holds ``arm``'s run of ``seed``."""
        return f"s{seed}-{self.eval_group(arm)}"

    def evaluate_seed(self, seed: int) -> None:
        """Per-domain perplexity and routing of every arm of ``seed`` (the `STEP0_ARMS` also at step 0)."""
        units = []
        for group, members in self.eval_groups().items():
            models = {arm.key: self.run_dir(arm, seed) for arm in members}
            deps = [f"{arm.key}-s{seed}" for arm in members]
            for arm in members:
                if arm.key in STEP0_ARMS:
                    models[step0_name(arm.key)] = self.init_dir(arm.init, seed)
                    deps.append(f"init-{arm.init.key}-s{seed}")
            units.append(self._eval_unit(f"s{seed}-{group}", models, members[0].init.source_names(), deps))
        self.stage(
            f"evaluate-s{seed}", f"seed {seed}: evaluate every arm, routing of the mixtures", units, parallel=self.jobs
        )
