"""Batched curvature of a whole grid vs a per-model loop, same work, in one run.

The models are the 92 pre-trained models of the quick preset (23 PLRs x 4 training seeds): taken
from a finished run with `--store DIR` (its pretrain shard), else trained here for `--steps`
iterations with the grid engine (all PLRs of a seed from one initial point, as in the preset).
Both sides run `measure_curvature` (Lanczos top-k, Hutchinson trace, both Fisher traces, the
gradient-noise ratio; float64) with the same settings on the same subset: the batched side on
all models at once, the loop on one model at a time. Each time is the best of `--repeats`.

    python benchmarks/curvature.py                       # train 2,000 steps here, then measure
    python benchmarks/curvature.py --store runs/synthetic-quick

Last line: speedup=<loop time / batched time> models=<n> batched_s=<s> loop_s=<s>
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from lrfeatures.analysis.curvature import CurvatureProblem, measure_curvature, seeded_subset
from lrfeatures.config import load_config
from lrfeatures.engine.kernels import kernel_for
from lrfeatures.experiments import Experiment
from lrfeatures.store import ExperimentStore


def pretrained(args) -> tuple[Experiment, torch.Tensor]:
    """The quick preset's experiment and its pre-trained flat weights [92, P]."""
    overrides = [] if args.store else [f"pretrain.iterations={args.steps}", "finetune.lrs=[]", "swa.ks=[2]",
                                       "pretrain.keep_checkpoints=2"]
    cfg = load_config("synthetic-quick", overrides)
    root = args.store or tempfile.mkdtemp(prefix="lrfeatures-curvature-benchmark-")
    exp = Experiment(ExperimentStore(root).config() if args.store else cfg, root)
    shard = next(s for s in exp.plan() if s.stage == "pretrain")
    if not exp.store.is_done(shard.name):
        exp.run_shard(shard)
    return exp, exp.store.shard_tensors(shard.name, "weights")["final"]


def timed(fn) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="", help="a finished synthetic-quick run (default: train here)")
    parser.add_argument("--steps", type=int, default=2000, help="pre-training steps when training here")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    exp, theta = pretrained(args)
    runner, shard = exp.worker, next(s for s in exp.plan() if s.stage == "pretrain")
    frozen = runner.frozen_of(shard, len(exp.cfg.pretrain.lrs))
    data = runner.data(0)
    x, y = seeded_subset(data.x_train, data.y_train, args.samples, 0, 0)
    template = runner.make_model().double()
    keep = torch.isfinite(theta).all(1)
    theta, frozen = theta[keep].double(), {k: v[keep].double() for k, v in frozen.items()}

    def problem(rows: slice) -> CurvatureProblem:
        return CurvatureProblem(kernel_for(template), theta[rows], {k: v[rows] for k, v in frozen.items()},
                                x.double(), y.double())

    def measure(rows: slice):
        return measure_curvature(problem(rows), 5, args.iterations, args.probes, exp.cfg.pretrain.batch_size, (0,))

    batched = min(timed(lambda: measure(slice(None))) for _ in range(args.repeats))
    loop = min(timed(lambda: [measure(slice(m, m + 1)) for m in range(len(theta))]) for _ in range(args.repeats))
    print(f"{len(theta)} finite models of {int(keep.numel())}, {args.samples} samples, {args.iterations} Lanczos "
          f"steps, {args.probes} probes, {torch.get_num_threads()} threads: batched {batched:.2f} s "
          f"({len(theta) / batched:.1f} models/s) | per-model loop {loop:.2f} s ({len(theta) / loop:.1f} models/s)")
    print(f"speedup={loop / batched:.2f} models={len(theta)} batched_s={batched:.2f} loop_s={loop:.2f}")


if __name__ == "__main__":
    main()
