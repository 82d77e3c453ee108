"""Image training throughput: our on-device pipeline vs a per-sample DataLoader loop, in one run.

Both train the same SI ConvNet (width 32 by default) with the same sphere step, batch size
and number of steps, from the same initial weights, with augmentation (random crop with
4-pixel padding + horizontal flip) and CIFAR normalization:
  ours      the whole set is one uint8 tensor on the device; a step gathers its batch by
            indexing, then augments and normalizes the batch with a few tensor ops
            (`lrfeatures.engine.images.run_epoch`, the loop the experiment uses);
  baseline  a torch.utils.data.Dataset that builds each normalized, augmented sample in
            __getitem__, batched by a DataLoader (num_workers=0, seeded shuffle).
The images are a small slice of the CIFAR-10 JPEG archive (folder loader, max_per_class).
The input pipelines alone (no model) are timed too, to show where the time goes.

    python benchmarks/image_throughput.py
    python benchmarks/image_throughput.py --per-class 100 --width 16 --device cuda
    python benchmarks/image_throughput.py --threads 1     # a busy machine: OpenMP workers spin

Last line: speedup=<x> images_per_s=<y> device=<cpu|cuda>   (training images/s of ours, x = ours/baseline)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset

from lrfeatures.config import ModelConfig
from lrfeatures.data.augment import Augment
from lrfeatures.data.batches import batch_indices
from lrfeatures.data.images import CIFAR_MEAN, CIFAR_STD, load_image_dataset
from lrfeatures.engine.images import DeviceImages, SphereSGD, prepare_input, run_epoch
from lrfeatures.models.registry import build_model, si_parameters
from lrfeatures.seeding import generator
from lrfeatures.sphere import flatten


class PerSampleImages(Dataset):
    """The usual recipe: one normalized, randomly cropped and flipped float tensor per item."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0, padding: int = 4):
        self.x, self.y, self.padding = x, y, padding
        self.gen = torch.Generator().manual_seed(seed)
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        image = self.x[i].float() / 255.0
        p = self.padding
        padded = torch.nn.functional.pad(image, (p, p, p, p))
        top, left = torch.randint(0, 2 * p + 1, (2,), generator=self.gen).tolist()
        image = padded[:, top:top + image.shape[1], left:left + image.shape[2]]
        if torch.rand((), generator=self.gen) < 0.5:
            image = image.flip(2)
        return (image - self.mean) / self.std, self.y[i]


def sync(device: torch.device) -> None:
    """Wait for queued device work (timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def fresh_optimizer(width: int, device: torch.device, lr: float) -> SphereSGD:
    """The SI ConvNet at its initial point (same seed for both pipelines) and its sphere step."""
    model = build_model(ModelConfig(name="convnet-si", width=width, depth=3), (3, 32, 32), 10, seed=0).to(device)
    rho = float(flatten(si_parameters(model)).detach().norm())
    return SphereSGD(model, lr, rho)


def main() -> None:
    """Time both pipelines and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archive", default="/work/shared/data/cifar10-jpeg.tar.gz")
    parser.add_argument("--per-class", type=int, default=64, help="training images per class")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per pipeline")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the best of each is kept")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    dataset = load_image_dataset(f"folder:{args.archive}", max_per_class=args.per_class)
    data = DeviceImages.from_dataset(dataset, device, "cifar")
    n, steps, batch = len(data.train_x), args.steps, args.batch_size
    order = batch_indices(n, batch, ("bench",), 0, steps + 1).to(device)
    augment = Augment(crop_padding=4, flip=True)
    loader = DataLoader(PerSampleImages(dataset.train_x, dataset.train_y), batch_size=batch, shuffle=True,
                        drop_last=True, num_workers=0, generator=torch.Generator().manual_seed(0))
    print(f"{n} training images, convnet-si width {args.width}, batch {batch}, {steps} timed steps x "
          f"{args.repeats} rounds, {device}, {torch.get_num_threads()} CPU threads")

    # Timings are the best of `repeats` interleaved rounds: on a shared machine, other processes
    # slow some rounds down, and interleaving exposes both pipelines to the same conditions.
    aug_gen = generator("bench-augment", device=device)
    ours_optimizer, base_optimizer = fresh_optimizer(args.width, device, 1e-3), fresh_optimizer(args.width, device, 1e-3)
    batches = iter(loader)

    def next_batch():
        """The next DataLoader batch, starting a new epoch when one runs out."""
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    def ours_input():
        for b in order[1:]:
            prepare_input(augment(data.train_x[b], aug_gen), data.normalization)

    def base_input():
        for _ in range(steps):
            x, y = next_batch()
            x.to(device), y.to(device)

    def ours_train():
        run_epoch(ours_optimizer, data, order[1:], augment, aug_gen)

    def base_train():
        for _ in range(steps):
            x, y = next_batch()
            base_optimizer.step(x.to(device), y.to(device))

    run_epoch(ours_optimizer, data, order[:1], augment, aug_gen)  # warm-up steps, untimed
    base_optimizer.step(*(t.to(device) for t in next_batch()))
    best = {name: 0.0 for name in ("ours_input", "base_input", "ours_train", "base_train")}
    for _ in range(args.repeats):
        for name, work in (("ours_input", ours_input), ("base_input", base_input),
                           ("ours_train", ours_train), ("base_train", base_train)):
            sync(device)
            start = time.perf_counter()
            work()
            sync(device)
            best[name] = max(best[name], steps * batch / (time.perf_counter() - start))
    ours, base = best["ours_train"], best["base_train"]
    print(f"input pipeline only: ours {best['ours_input']:,.0f} images/s | per-sample DataLoader "
          f"{best['base_input']:,.0f} images/s")
    print(f"training: ours {ours:,.1f} images/s | per-sample DataLoader {base:,.1f} images/s")
    print(f"speedup={ours / base:.2f} images_per_s={ours:.1f} device={device.type}")


if __name__ == "__main__":
    main()
