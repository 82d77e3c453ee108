"""Are the bands of `bands-redundant` equally learnable by the preset's ConvNet? (spectral bias check)

For each signal band i, the images-bands-quick ConvNet is trained on a single-band training set
(band i carries the class, every other band an independent class: the probe-set distribution,
drawn with another split name) and tested on probe set i; the full task is trained alongside.
Bands and the full task are interleaved per training seed, with the same initial point and
batch order for all of them, so only the band differs. A linear reader gets the same accuracy
from every band (tests/test_band_redundant.py); a gap here is the network's own preference.

    .venv/bin/python benchmarks/band_learnability.py --plr 0.001 --seeds 2 [--epochs 60]
"""

from __future__ import annotations

import argparse
import time

import torch

from lrfeatures.data.band_redundant import BandRedundantConfig, make_bands_redundant_images, make_probe_sets
from lrfeatures.data.imageset import ImageDataset, channel_mean_std
from lrfeatures.engine.images import DeviceImages, ImageTask, evaluate, load_si_, train_image_model
from lrfeatures.experiments.images import image_config
from lrfeatures.models.registry import build_model, si_parameters
from lrfeatures.seeding import derive_seed
from lrfeatures.sphere import flatten


def train_and_test(cfg, train_x, train_y, test_x, test_y, plr: float, seed: int) -> float:
    """Test accuracy of the preset's ConvNet trained at `plr` from training seed `seed`."""
    dataset = ImageDataset(train_x, train_y, test_x, test_y, [f"class{c}" for c in range(10)], "learnability")
    mean, std = channel_mean_std(train_x)
    dataset.mean, dataset.std = mean, std
    data = DeviceImages.from_dataset(dataset, "cpu", "dataset")
    model = build_model(cfg.model, tuple(train_x.shape[1:]), 10, derive_seed("init", 0, seed))
    rho = float(flatten(si_parameters(model)).detach().norm())
    load_si_(model, flatten(si_parameters(model)).detach(), rho)
    task = ImageTask(plr, cfg.pretrain.epochs, cfg.pretrain.batch_size, rho, ("order", "learnability", seed))
    train_image_model(model, data, task)
    return float(evaluate(model, data.test_x, data.test_y, data.normalization)[1])


def main() -> None:
    """Train per band and on the full task, interleaved per seed; print one key=value line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--plr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=0, help="pre-training epochs (0: the preset's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = image_config("images-bands-quick", [f"pretrain.epochs={args.epochs}"] if args.epochs else [])
    task = BandRedundantConfig()
    x_train, y_train, x_test, y_test = make_bands_redundant_images(task)
    single_x, single_y = make_probe_sets(task, split="learn-train", n=args.n_train)
    probe_x, probe_y = make_probe_sets(task)
    results: dict[str, list[float]] = {name: [] for name in (*task.bands, "full")}
    start = time.time()
    for seed in range(args.seeds):
        for i, name in enumerate(task.bands):
            results[name].append(train_and_test(cfg, single_x[i], single_y[i], probe_x[i], probe_y[i], args.plr, seed))
        results["full"].append(train_and_test(cfg, x_train[:args.n_train], y_train[:args.n_train], x_test, y_test,
                                              args.plr, seed))
        print(f"seed {seed}: " + " ".join(f"{k}={v[-1]:.3f}" for k, v in results.items()), flush=True)
    means = {k: sum(v) / len(v) for k, v in results.items()}
    print(f"plr={args.plr:g} seeds={args.seeds} epochs={cfg.pretrain.epochs} "
          + " ".join(f"acc_{k}={v:.3f}" for k, v in means.items()) + f" wall_s={time.time() - start:.0f}")


if __name__ == "__main__":
    main()
