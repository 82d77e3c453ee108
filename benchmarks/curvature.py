"""Batched curvature of a whole grid vs a per-model loop, same work, in one run; and its cost in the preset.

The models are the 92 pre-trained models of the quick preset (23 PLRs x 4 training seeds): taken
from a finished run with `--store DIR`, else the preset's training shards run here first (about
two minutes; `--steps N` trains only N pre-training steps instead, for the speedup alone).
Both sides run `measure_curvature` (Lanczos top-k, Hutchinson trace, both Fisher traces, the
gradient-noise ratio) with the same settings, dtype and subset: the batched side on all models
at once, the loop on one model at a time (`--loop autograd`: with autograd's double backward
instead of the hand-written products, as before they existed); the two are interleaved, each
time the best of `--repeats`.

With the complete preset (trained here, or `--store` of a finished run), the benchmark also
times the curvature measurement itself (`synthetic_curvature`, default CurvatureConfig, all
final models: 92 PT + 460 FT + 460 SWA) and divides by the preset's training time, i.e. the
seconds the store recorded for its pretrain, finetune and swa shards (`overhead`; the
target is <= 0.30). Run both under the same load: the preset with the same thread count.

    OMP_NUM_THREADS=1 python benchmarks/curvature.py      # train the preset here, then measure
    python benchmarks/curvature.py --steps 500           # the speedup only, on briefly trained models
    python benchmarks/curvature.py --store runs/synthetic-quick

Last line: speedup=<loop / batched> models=<n> batched_s=<s> loop_s=<s> [curvature_s=<s> training_s=<s>
overhead=<curvature_s / training_s> curvature_models=<n>]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch

from lrfeatures.analysis.curvature import CurvatureProblem, measure_curvature, seeded_subset, synthetic_curvature
from lrfeatures.config import load_config
from lrfeatures.engine.kernels import kernel_for
from lrfeatures.experiments import Experiment
from lrfeatures.experiments.synthetic import SyntheticAnalysis
from lrfeatures.store import ExperimentStore

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def pretrained(args) -> tuple[Experiment, torch.Tensor]:
    """The quick preset's experiment (its training shards done) and its pre-trained flat weights [92, P].

    Without --store the preset is trained here, in this process and under this load, so the
    recorded shard seconds compare fairly with the curvature timed right after.
    """
    overrides = [] if not args.steps else [f"pretrain.iterations={args.steps}", "finetune.lrs=[]", "swa.ks=[2]",
                                           "pretrain.keep_checkpoints=2"]
    root = args.store or tempfile.mkdtemp(prefix="lrfeatures-curvature-benchmark-")
    exp = Experiment(ExperimentStore(root).config() if args.store else load_config("synthetic-quick", overrides),
                     root)
    for shard in exp.plan():
        if shard.stage != "analyze" and not exp.store.is_done(shard.name):
            exp.run_shard(shard)
    shard = next(s for s in exp.plan() if s.stage == "pretrain")
    return exp, exp.store.shard_tensors(shard.name, "weights")["final"]


def timed(fn) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def preset_cost(exp: Experiment) -> tuple[float, float, int] | None:
    """(curvature measurement seconds, recorded training seconds, models) of a complete store, else None."""
    shards = {s.stage: s for s in exp.plan()}
    training = [shards[s].name for s in ("pretrain", "finetune", "swa") if s in shards]
    if "analyze" not in shards or not all(exp.store.is_done(name) for name in training):
        return None
    train_s = sum(exp.store.done_record(name)["seconds"] for name in training)
    cfg = dataclasses.replace(exp.cfg, curvature=dataclasses.replace(exp.cfg.curvature, enabled=True))
    runner, shard = exp.worker, shards["analyze"]
    ctx = SyntheticAnalysis(cfg, shard, runner.data(shard.data_seed), runner.solutions(shard), runner.evaluate,
                            make_model=runner.make_model)
    table = []
    seconds = timed(lambda: table.append(synthetic_curvature(ctx)))
    return seconds, train_s, len(table[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="", help="a finished synthetic-quick run (default: train here)")
    parser.add_argument("--steps", type=int, default=0,
                        help="train only this many pre-training steps here (no FT/SWA, no preset cost; 0: the preset)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="both sides' dtype (the measurement runs in float32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default; 1 avoids OpenMP spin-waits on a shared machine)")
    parser.add_argument("--loop", choices=["same", "autograd"], default="same",
                        help="the loop's products: the same hand-written ones (same work), or autograd's double "
                             "backward per model (the implementation before the hand-written products)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    exp, theta = pretrained(args)
    runner, shard = exp.worker, next(s for s in exp.plan() if s.stage == "pretrain")
    frozen = runner.frozen_of(shard, len(exp.cfg.pretrain.lrs))
    data = runner.data(0)
    x, y = seeded_subset(data.x_train, data.y_train, args.samples, 0, 0)
    template = runner.make_model().to(dtype)
    keep = torch.isfinite(theta).all(1)
    theta, frozen = theta[keep].to(dtype), {k: v[keep].to(dtype) for k, v in frozen.items()}

    def problem(rows: slice, handwritten: bool = True) -> CurvatureProblem:
        out = CurvatureProblem(kernel_for(template), theta[rows], {k: v[rows] for k, v in frozen.items()},
                               x.to(dtype), y.to(dtype))
        out.handwritten = handwritten  # False: autograd's double backward (the previous implementation)
        return out

    def measure(rows: slice, handwritten: bool = True):
        return measure_curvature(problem(rows, handwritten), 5, args.iterations, args.probes,
                                 exp.cfg.pretrain.batch_size, (0,))

    batched, loop = [], []
    for _ in range(args.repeats):  # interleaved, so both sides see the same load
        batched.append(timed(lambda: measure(slice(None))))
        loop.append(timed(lambda: [measure(slice(m, m + 1), args.loop == "same") for m in range(len(theta))]))
    batched_s, loop_s = min(batched), min(loop)
    print(f"{len(theta)} finite models of {int(keep.numel())}, {args.samples} samples, {args.iterations} Lanczos "
          f"steps, {args.probes} probes, {args.dtype}, {torch.get_num_threads()} threads, {args.loop} loop: "
          f"batched {batched_s:.2f} s "
          f"({len(theta) / batched_s:.1f} models/s) | per-model loop {loop_s:.2f} s ({len(theta) / loop_s:.1f} "
          f"models/s)")
    line = f"speedup={loop_s / batched_s:.2f} models={len(theta)} batched_s={batched_s:.2f} loop_s={loop_s:.2f}"
    cost = preset_cost(exp) if not args.steps else None
    if cost:
        curvature_s, train_s, n = cost
        print(f"curvature measurement of all {n} final models: {curvature_s:.1f} s; the preset's training "
              f"(recorded pretrain + finetune + swa shard seconds): {train_s:.1f} s")
        line += (f" curvature_s={curvature_s:.2f} training_s={train_s:.2f} overhead={curvature_s / train_s:.3f}"
                 f" curvature_models={n}")
    print(line)


if __name__ == "__main__":
    main()
