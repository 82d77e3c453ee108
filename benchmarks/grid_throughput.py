"""Grid engine vs reference engine on the paper's synthetic model and data, in one run.

Both engines do the same work per model: the SI MLP (32-32-32-1), batch 16, the tick data
(512 train / 2000 test), projected SGD on the sphere, and a full train+test evaluation every
`cadence` steps. We report model-steps per second of each at the paper's 5-step cadence and
at a 100-step cadence, and the grid engine's achieved FLOP/s against this machine's float32
matrix-product peak measured in the same run.

FLOPs counted: only the matrix products (forward 2·B·(D·H + H·H + H), backward
2·B·(D·H + 2·H·H + 2·H) per model-step; evaluation forwards at the cadence). The element-wise
work (LayerNorm, ReLU, loss, the sphere step, transposes) takes time but is not counted.

On CPU the grid engine runs the compiled C kernel (engine/native.py); `--no-native` measures
the torch kernels instead. This VM's speed drifts by tens of percent, so each rate (and the
peak, a sustained one-second GEMM rate) is the best of `--repeats` interleaved timings.

    python benchmarks/grid_throughput.py                # 1,150 models (50 seeds x 23 PLRs)
    python benchmarks/grid_throughput.py --models 230 --steps 200
    python benchmarks/grid_throughput.py --no-native     # the torch kernels instead of the C one
    python benchmarks/grid_throughput.py --contention    # also quiet vs one busy competitor

--contention times the grid engine at the 100-step cadence alternately quiet and with one
competing busy process (benchmarks/contention.py) and adds load_ratio = loaded / quiet rate.

On a busy machine wall-clock peaks and rates both sag; "per CPU-second" divides the FLOPs by
the CPU time the process actually got (all threads), against the same measure of the GEMM.

Last line: speedup=<x> peak_fraction=<y> cpu_peak_fraction=<c> cadence5_fraction=<z> models=<n>
[load_ratio=<r>]  (x, y, c at the 100-step cadence; z = the 5-step cadence's grid rate / the
100-step one's)
"""

from __future__ import annotations

import argparse
import math
import time

import lrfeatures.threads  # noqa: F401  first: it sets OMP_WAIT_POLICY before torch loads OpenMP
import torch

from contention import load_ratio

from lrfeatures.config import load_config
from lrfeatures.engine.common import GridTask
from lrfeatures.engine.grid import GridTrainer
from lrfeatures.engine.reference import train_reference
from lrfeatures.experiments.synthetic import SyntheticRunner
from lrfeatures.store import ExperimentStore


def matmul_peak(size: int = 2048, seconds: float = 1.0) -> tuple[float, float]:
    """Sustained float32 GEMM FLOP/s and FLOP per CPU-second: back-to-back products for about `seconds`.

    Sustained, like the grid timing it is compared with: on this VM a single 70 ms product
    can catch a fast moment that a one-second run cannot."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / elapsed, 2 * size**3 * count / max(time.process_time() - cpu, 1e-9)


def paper_task(runner: SyntheticRunner, num_models: int, steps: int, cadence: int) -> GridTask:
    """`num_models` models of the paper grid (PLR-major inside each training seed)."""
    plrs = runner.cfg.pretrain.lrs
    seeds = list(range((num_models + len(plrs) - 1) // len(plrs)))
    states = [runner.initial_state(0, s) for s in seeds]
    index = torch.arange(num_models)
    seed_of = index // len(plrs)
    return GridTask(init=torch.stack([states[s][0] for s in seed_of]),
                    frozen={k: torch.stack([states[s][1][k] for s in seed_of]) for k in states[0][1]},
                    effective_lrs=torch.tensor([plrs[i % len(plrs)] for i in index], dtype=torch.float64),
                    stream_of_model=seed_of, streams=[("bench", s) for s in seeds], iterations=steps,
                    batch_size=16, rho=1.0, log_every=cadence)


def matmul_flops(steps: int, cadence: int, num_models: int, n_eval: int, d: int = 32, h: int = 32,
                 batch: int = 16) -> float:
    """Matrix-product FLOPs of training plus evaluation (see module docstring)."""
    train = 2 * batch * (d * h + h * h + h) + 2 * batch * (d * h + 2 * h * h + 2 * h)
    evaluation = 2 * n_eval * (d * h + h * h + h) * (steps // cadence + 1)
    return num_models * (steps * train + evaluation)


def main() -> None:
    """Run both engines and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=1150, help="grid size (paper: 50 seeds x 23 PLRs)")
    parser.add_argument("--steps", type=int, default=300, help="grid engine steps per measurement")
    parser.add_argument("--reference-steps", type=int, default=600, help="reference engine steps per model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many timings of each engine")
    parser.add_argument("--no-compile", action="store_true", help="run the grid step eagerly")
    parser.add_argument("--no-native", action="store_true", help="use the torch kernels, not the compiled C one")
    parser.add_argument("--contention", action="store_true", help="also time against one busy competitor")
    args = parser.parse_args()

    cfg = load_config("synthetic-paper", [f"engine.device={args.device}"])
    runner = SyntheticRunner(cfg, ExperimentStore("/nonexistent-unused"))
    data = runner.data(0)
    n_eval = len(data.x_train) + len(data.x_test)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    trainer = GridTrainer(runner.make_model, compile=not args.no_compile, native=not args.no_native)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    cpu_seconds = {}  # CPU seconds (all threads) of the last timed run: robust to a busy machine

    def timed(run) -> float:
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        run()
        sync()
        cpu_seconds["last"] = time.process_time() - cpu
        return time.perf_counter() - start

    # This VM's speed drifts by tens of percent from second to second, so every quantity is
    # the best of several timings of about a second each, taken interleaved with the others.
    results = {}
    for cadence in (5, 100):
        ref_task = paper_task(runner, 2, args.reference_steps, cadence)
        ref_task.effective_lrs[:] = 1e-3
        grid_task = paper_task(runner, args.models, args.steps, cadence)
        trainer.train(paper_task(runner, args.models, 10, cadence), data.x_train, data.y_train,
                      data.x_test, data.y_test)  # warm-up (and compilation)
        ref_time = grid_time = grid_cpu = math.inf
        peak = cpu_peak = 0.0
        for _ in range(args.repeats):
            wall_peak, per_cpu = matmul_peak()
            peak, cpu_peak = max(peak, wall_peak), max(cpu_peak, per_cpu)
            ref_time = min(ref_time, timed(lambda: train_reference(
                runner.make_model, ref_task, data.x_train, data.y_train, data.x_test, data.y_test)))
            grid_time = min(grid_time, timed(lambda: trainer.train(
                grid_task, data.x_train, data.y_train, data.x_test, data.y_test)))
            grid_cpu = min(grid_cpu, cpu_seconds["last"])
        ref_rate = 2 * args.reference_steps / ref_time
        grid_rate = args.models * args.steps / grid_time
        work = matmul_flops(args.steps, cadence, args.models, n_eval)
        flops = work / grid_time
        results[cadence] = (grid_rate / ref_rate, flops / peak, grid_rate, work / grid_cpu / cpu_peak)
        print(f"cadence {cadence:>3}: reference {ref_rate:,.0f} model-steps/s | grid {grid_rate:,.0f} "
              f"model-steps/s | speedup {grid_rate / ref_rate:.1f}x | {flops / 1e9:.1f} GFLOP/s "
              f"= {100 * flops / peak:.1f}% of the matmul peak ({peak / 1e9:.0f} GFLOP/s) | per CPU-second "
              f"{work / grid_cpu / 1e9:.1f} GFLOP = {100 * work / grid_cpu / cpu_peak:.1f}% of the matmul's "
              f"({cpu_peak / 1e9:.1f})")
    speedup, fraction, rate100, cpu_fraction = results[100]
    last = (f"speedup={speedup:.1f} peak_fraction={fraction:.3f} cpu_peak_fraction={cpu_fraction:.3f} "
            f"cadence5_fraction={results[5][2] / rate100:.3f} models={args.models}")
    if args.contention:
        task = paper_task(runner, args.models, args.steps, 100)

        def rate() -> float:
            return args.models * args.steps / timed(lambda: trainer.train(
                task, data.x_train, data.y_train, data.x_test, data.y_test))

        result = load_ratio(rate, repeats=args.repeats)
        print(f"contention (cadence 100): quiet {result['quiet']:,.0f} model-steps/s, with one busy competitor "
              f"{result['loaded']:,.0f} (median of {args.repeats} interleaved pairs)")
        last += f" load_ratio={result['ratio']:.3f}"
    print(last)


if __name__ == "__main__":
    main()
