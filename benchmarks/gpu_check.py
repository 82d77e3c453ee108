"""The GPU part of benchmarks/gpu_check.sh: fused vs one-model on CUDA, and the images-paper time estimate.

1. Agreement on CUDA: a tiny SI ConvNet grid (3 PLRs) trained fused and one model at a time,
   both in bf16 (convs in bf16, BN and the rest fp32: engine.images.amp_context): test
   accuracies within 0.05 and losses within 5 % (bf16 tolerance; the exact float64 agreement is
   a CPU test, tests/test_fused.py).
2. Time of one epoch of the `images-paper` grid: SI ResNet-18 width 32, 25 PLRs, batch 128,
   on CIFAR-10 (the official archive under $LRFEATURES_DATA, or the JPEG copy given with
   --data), fused (all 25 in one program, bf16) against one model in bf16 + channels_last (timed
   on a slice of the epoch and scaled to 25 models x the epoch).
3. The estimate of the whole `images-paper` run from the fused epoch: 200 pre-training epochs,
   5 FLRs x 200 fine-tuning epochs (125 models fused, in chunks of the budget), SWA (one BN
   recompute + evaluation per K, ~1 forward epoch each) and the bands (12 band-filtered test
   sets per model, forward only).

    python benchmarks/gpu_check.py --data ../shared/data/cifar10-jpeg.tar.gz
Last line: paper_estimate_h=<h> fused_epoch_s=<s> single_epoch_s=<s> fused_speedup=<x> agree=<0|1>
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lrfeatures.config import ModelConfig
from lrfeatures.data.images import load_image_dataset
from lrfeatures.engine.fused import train_image_models
from lrfeatures.engine.images import DeviceImages, ImageTask, train_image_model
from lrfeatures.models.registry import build_model, si_parameters
from lrfeatures.sphere import flatten

PAPER_PLRS = 25
PAPER_FLRS = 5
PAPER_EPOCHS = 200
SWA_KS = 5
BAND_SETS = 12


def synced(fn):
    """Seconds of fn() with the device synchronized around it."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def at_rho(model: torch.nn.Module, rho: float) -> torch.nn.Module:
    """The model with its SI group rescaled to norm rho."""
    theta = flatten(si_parameters(model)).detach()
    from lrfeatures.engine.images import load_si_

    return load_si_(model, theta, rho)


def agreement(data: DeviceImages) -> bool:
    """Fused and one-model bf16 runs of a tiny grid agree within bf16 tolerance."""
    model = at_rho(build_model(ModelConfig(name="convnet-si", width=8, depth=3), (3, 32, 32), 10, 0), 8.0).cuda()
    tasks = [ImageTask(lr, 2, 128, 8.0, ("order", 0), log_every=1, ckpt_every=1, eval_batch_size=1000)
             for lr in (1e-3, 3e-3, 1e-2)]
    small = DeviceImages(data.train_x[:4096], data.train_y[:4096], data.test_x[:2000], data.test_y[:2000],
                         data.mean, data.std)
    ones = [train_image_model(copy.deepcopy(model), small, t, bf16=True) for t in tasks]
    fused = train_image_models([copy.deepcopy(model) for _ in tasks], small, tasks, precision="bf16",
                               memory_budget_gb=32.0)
    ok = True
    for t, one, f in zip(tasks, ones, fused):
        acc_gap = abs(one.final["test_acc"] - f.final["test_acc"])
        loss_gap = abs(one.final["test_loss"] - f.final["test_loss"]) / max(abs(one.final["test_loss"]), 1e-6)
        print(f"  ELR {t.effective_lr:g}: test acc one {one.final['test_acc']:.4f} fused {f.final['test_acc']:.4f}, "
              f"test loss rel. gap {loss_gap:.4f}")
        ok &= acc_gap <= 0.05 and loss_gap <= 0.05
    return ok


def paper_epoch(data: DeviceImages, budget_gb: float, single_steps: int) -> tuple[float, float]:
    """Seconds of one images-paper epoch fused (25 models) and one model at a time (scaled)."""
    model = at_rho(build_model(ModelConfig(name="resnet18-si", width=32), (3, 32, 32), 10, 0), 28.0).cuda()
    lrs = torch.logspace(-5, -1, PAPER_PLRS).tolist()
    no_eval = DeviceImages(data.train_x, data.train_y, data.test_x[:0], data.test_y[:0], data.mean, data.std)
    tasks = [ImageTask(lr, 1, 128, 28.0, ("order", 0), log_every=1, ckpt_every=1) for lr in lrs]
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    fused_s = synced(lambda: train_image_models([copy.deepcopy(model) for _ in lrs], no_eval, tasks,
                                                precision="bf16", memory_budget_gb=budget_gb))
    n = single_steps * 128
    part = DeviceImages(data.train_x[:n], data.train_y[:n], data.test_x[:0], data.test_y[:0], data.mean, data.std)
    train_image_model(copy.deepcopy(model), part, tasks[0], bf16=True, channels_last=True)  # warm-up
    one_s = synced(lambda: train_image_model(copy.deepcopy(model).to(memory_format=torch.channels_last), part,
                                             tasks[0], bf16=True, channels_last=True))
    per_epoch = len(data.train_x) // 128
    return fused_s, one_s * per_epoch / single_steps * PAPER_PLRS


def main() -> None:
    """Run the checks and print the estimate."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="cifar10", help="cifar10 (official archive) or folder:PATH / a tar.gz path")
    parser.add_argument("--budget-gb", type=float, default=100.0, help="engine.memory_budget_gb for the fused grid")
    parser.add_argument("--single-steps", type=int, default=40, help="steps timed for the one-model estimate")
    args = parser.parse_args()
    source = args.data if args.data == "cifar10" or args.data.startswith("folder:") else f"folder:{args.data}"
    dataset = load_image_dataset(source)
    data = DeviceImages.from_dataset(dataset, "cuda")
    print(f"data: {dataset.name}, {len(dataset.train_x)} train / {len(dataset.test_x)} test images; "
          f"device: {torch.cuda.get_device_name()}")
    print("1. fused vs one model, both bf16, on CUDA:")
    agree = agreement(data)
    print(f"   {'agree' if agree else 'DISAGREE'} within bf16 tolerance")
    print("2. one epoch of the images-paper grid (SI ResNet-18 w32, 25 PLRs, batch 128; bf16, fused vs "
          "one model + channels_last):")
    fused_s, single_s = paper_epoch(data, args.budget_gb, args.single_steps)
    print(f"   fused {fused_s:.1f} s, one model at a time {single_s:.1f} s (scaled), speedup {single_s / fused_s:.2f}x")
    epochs = PAPER_EPOCHS + PAPER_FLRS * PAPER_EPOCHS          # FT: 5x the models, same epochs
    forward_epochs = PAPER_PLRS * (SWA_KS * 2 + BAND_SETS * (1 + PAPER_FLRS + SWA_KS)) / PAPER_PLRS
    estimate = fused_s * epochs + fused_s / 3 * forward_epochs  # a forward epoch ~ 1/3 of a training epoch
    print(f"3. images-paper estimate: {epochs} fused grid-epochs + ~{forward_epochs:.0f} forward epochs "
          f"= {estimate / 3600:.2f} h (one model at a time: {single_s * epochs / 3600:.1f} h of training)")
    print(f"paper_estimate_h={estimate / 3600:.2f} fused_epoch_s={fused_s:.1f} single_epoch_s={single_s:.1f} "
          f"fused_speedup={single_s / fused_s:.2f} agree={int(agree)}")


if __name__ == "__main__":
    main()
