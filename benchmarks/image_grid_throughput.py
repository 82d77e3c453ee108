"""Image grids: one model at a time vs fused (engine/fused.py), fp32 vs bf16, in one run.

For the same work (the same M models, batches and steps), times
  single   `train_image_model` once per model (the one-model engine), and
  fused    `train_image_models` (all M models of one training seed as one program),
on random uint8 images of CIFAR shape (the model's cost does not depend on the pixels). Configs:
the ConvNet at widths 8 (the cpu-small grid: batch 64) and 32, and ResNet-18 width 8, at
M = 6, 12, 24 models; fp32 and bf16 (convs in bf16, the rest fp32: engine.images.amp_context). Repeats are interleaved (single, fused,
single, ...) and the best of each is kept, so drift of a shared machine hits both alike.
Achieved FLOP/s (forward + backward = 3x the forward's multiply-adds x 2, counted with
torch.utils.flop_counter on one model) are printed against the machine's measured fp32 and
bf16 matmul peaks (a 2048^2 matmul, same run).

    python benchmarks/image_grid_throughput.py                 # the full table (slow on a CPU)
    python benchmarks/image_grid_throughput.py --quick         # cpu-small grid + ConvNet-w32 step only
    python benchmarks/image_grid_throughput.py --contention    # also the quiet vs loaded rate of a fused step
    python benchmarks/image_grid_throughput.py --device cuda

Last line: speedup=<fused / single, cpu-small grid, best precision> bf16_speedup=<bf16 / fp32,
ConvNet-w32 step, the faster engine of each> models=<M of the speedup> [load_ratio=<loaded / quiet, fused step>]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from lrfeatures.config import ModelConfig
from lrfeatures.engine.fused import train_image_models
from lrfeatures.engine.images import DeviceImages, ImageTask, train_image_model
from lrfeatures.models.registry import build_model

sys.path.insert(0, str(Path(__file__).parent))


def images(n: int, device: str) -> DeviceImages:
    """n random CIFAR-shaped uint8 images with 10 classes, on the device."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=gen)
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    return DeviceImages(x.to(device), y.to(device), x[:256].to(device), y[:256].to(device), mean.to(device),
                        std.to(device))


def grid(name: str, width: int, m: int, device: str) -> list[torch.nn.Module]:
    """M models of one training seed (one init, as a seed's PLRs share it)."""
    depth = 3 if name == "convnet-si" else 2
    model = build_model(ModelConfig(name=name, width=width, depth=depth), (3, 32, 32), 10, 0).to(device)
    return [copy.deepcopy(model) for _ in range(m)]


def tasks(m: int, batch: int, steps: int, n: int) -> list[ImageTask]:
    """M tasks at log-spaced ELRs, one epoch of `steps` steps, no checkpoints or logs in between."""
    lrs = torch.logspace(-4, -1, m).tolist()
    return [ImageTask(lr, 1, batch, 10.0, ("order", 0), ("augment", 0), log_every=1, ckpt_every=1,
                      eval_batch_size=256) for lr in lrs]


def time_run(fn) -> float:
    """Seconds of one call (CUDA synchronized)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def train_flops(model: torch.nn.Module, batch: int, device: str) -> float:
    """FLOPs of one training step of one model (forward + backward), by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, 3, 32, 32, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, device: str, seconds: float = 0.5) -> float:
    """Achieved GFLOP/s of a square matmul in `dtype` (2048^2, or 256^2 where the dtype is emulated; best of repeats)."""
    rates = []
    for n in (256, 2048):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end or best == 0.0:
            best = max(best, 2 * n**3 / time_run(lambda: a @ b) / 1e9)
        rates.append(best)
        if best < 10:  # emulated (no bf16 units): a 2048^2 product would take minutes and say nothing more
            break
    return max(rates)


def compare(name: str, width: int, m: int, batch: int, steps: int, precision: str, device: str,
            repeats: int) -> dict:
    """Best-of-repeats images/s of single and fused for the same work; evaluation excluded (no eval split)."""
    n = batch * steps
    data = images(n, device)
    data.test_x, data.test_y = data.test_x[:0], data.test_y[:0]  # time training, not the per-epoch test pass
    work = tasks(m, batch, steps, n)
    models = grid(name, width, m, device)
    bf16 = precision == "bf16"
    single_t, fused_t = float("inf"), float("inf")
    for _ in range(repeats):
        single_t = min(single_t, time_run(lambda: [train_image_model(copy.deepcopy(mod), data, t, bf16=bf16)
                                                   for mod, t in zip(models, work)]))
        fused_t = min(fused_t, time_run(lambda: train_image_models([copy.deepcopy(mod) for mod in models],
                                                                   data, work, precision=precision, memory_budget_gb=64.0)))
    flops = train_flops(copy.deepcopy(models[0]), batch, device) * steps * m
    fused_t = fused_t if fused_t < float("inf") else float("nan")
    return dict(model=f"{name}-w{width}", m=m, precision=precision, single=m * n / single_t, fused=m * n / fused_t,
                ratio=single_t / fused_t, fused_gflops=flops / fused_t / 1e9, single_gflops=flops / single_t / 1e9)


def main() -> None:
    """Run the comparisons and print the table and the machine-readable line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="only the cpu-small grid and the ConvNet-w32 step")
    parser.add_argument("--steps", type=int, default=4, help="training steps per model per timing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--contention", action="store_true", help="quiet vs loaded rate of the fused cpu-small step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    peaks = {"fp32": matmul_peak(torch.float32, dev), "bf16": matmul_peak(torch.bfloat16, dev, 0.2)}
    print(f"device={dev} threads={torch.get_num_threads()} matmul peak GFLOP/s: fp32 {peaks['fp32']:.0f}, "
          f"bf16 {peaks['bf16']:.1f}")
    plan = [("convnet-si", 8, 6, 64, "fp32"), ("convnet-si", 8, 6, 64, "bf16"), ("convnet-si", 32, 6, 64, "fp32"),
            ("convnet-si", 32, 6, 64, "bf16")]
    if not args.quick:
        plan = [(n, w, m, 64, p) for n, w in (("convnet-si", 8), ("convnet-si", 32), ("resnet18-si", 8))
                for m in (6, 12, 24) for p in ("fp32", "bf16")]
    bf16_ok = dev == "cuda" or peaks["bf16"] > peaks["fp32"]
    rows = []
    for name, width, m, batch, precision in plan:
        steps = args.steps if precision == "fp32" or bf16_ok else 1  # emulated bf16: one step is enough to see it
        row = compare(name, width, m, batch, steps, precision, dev, args.repeats)
        rows.append(row)
        best_gflops = max(row["fused_gflops"], row["single_gflops"])
        print(f"{row['model']:>16} M={m:<3} {precision}  single {row['single']:8.0f} img/s  fused "
              f"{row['fused']:8.0f} img/s  fused/single {row['ratio']:5.2f}  best {best_gflops:7.1f} "
              f"GFLOP/s = {100 * best_gflops / peaks[precision]:5.1f}% of the {precision} matmul peak", flush=True)
    small = [r for r in rows if r["model"] == "convnet-si-w8" and r["m"] == 6]
    best = max(small, key=lambda r: r["fused"])  # the best precision's fused rate, against single at it
    w32 = {r["precision"]: r for r in rows if r["model"] == "convnet-si-w32" and r["m"] == 6}
    bf16_speedup = max(w32["bf16"]["single"], w32["bf16"]["fused"]) / max(w32["fp32"]["single"], w32["fp32"]["fused"])
    line = f"speedup={best['ratio']:.2f} bf16_speedup={bf16_speedup:.3f} models={best['m']}"
    if args.contention:
        from contention import load_ratio

        data, work = images(64 * args.steps, dev), tasks(6, 64, args.steps, 64 * args.steps)
        data.test_x, data.test_y = data.test_x[:0], data.test_y[:0]
        models = grid("convnet-si", 8, 6, dev)
        rate = lambda: 6 * 64 * args.steps / time_run(lambda: train_image_models(  # noqa: E731
            [copy.deepcopy(mod) for mod in models], data, work, memory_budget_gb=64.0))
        result = load_ratio(rate, repeats=3)
        print(f"fused cpu-small step: quiet {result['quiet']:.0f} img/s, loaded {result['loaded']:.0f} img/s")
        line += f" load_ratio={result['ratio']:.2f}"
    print(line)


if __name__ == "__main__":
    main()
