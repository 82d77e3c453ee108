"""Shared fixtures: a tiny synthetic experiment config that trains in about a second."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lrfeatures.config import load_config

TINY = {
    "name": "tiny",
    "data": {"n_train": 128, "n_test": 256, "n_probe": 100},
    "pretrain": {"lrs": [1e-3, 1e-2, 0.3], "iterations": 200, "ckpt_every": 20, "log_every": 50,
                 "keep_checkpoints": 0},
    "finetune": {"lrs": [1e-4, 1e-3], "iterations": 100, "log_every": 100},
    "swa": {"ks": [2, 5]},
    "seeds": {"data": [0], "train": [0, 1]},
    "engine": {"memory_budget_gb": 1},
}

# The same settings as CLI overrides (for tests that drive `lrfeatures synthetic`).
TINY_OVERRIDES = [
    "name=tiny", "data.n_train=128", "data.n_test=256", "data.n_probe=100",
    "pretrain.lrs=[1e-3, 1e-2, 0.3]", "pretrain.iterations=200", "pretrain.ckpt_every=20",
    "pretrain.log_every=50", "pretrain.keep_checkpoints=0", "finetune.lrs=[1e-4, 1e-3]",
    "finetune.iterations=100", "finetune.log_every=100", "swa.ks=[2, 5]", "seeds.data=[0]", "seeds.train=[0, 1]",
    "engine.memory_budget_gb=1", "engine.compile=false",
]


def tiny_dict(**sections) -> dict:
    """The tiny config as a nested dict, with some sections' fields replaced."""
    data = copy.deepcopy(TINY)
    for section, fields in sections.items():
        if isinstance(fields, dict):
            data.setdefault(section, {}).update(fields)
        else:
            data[section] = fields
    return data


@pytest.fixture
def tiny_config():
    """3 PLRs x 2 training seeds x 1 data seed, 200 pre-training and 100 fine-tuning steps."""
    return load_config(tiny_dict())


@pytest.fixture
def make_tiny_config():
    """Factory: the tiny config with per-section overrides, e.g. pretrain={"lrs": [...]}."""
    return lambda **sections: load_config(tiny_dict(**sections))


@pytest.fixture
def tiny_overrides():
    """The tiny config as a list of `--set` overrides."""
    return list(TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished run of the tiny config (grid engine), shared read-only by several tests."""
    from lrfeatures.experiments import Experiment

    root = tmp_path_factory.mktemp("tiny-run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Experiment(load_config(tiny_dict()), root).run()
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def torch_one_thread():
    """Run a module's tiny trainings on one thread, restored afterwards.

    The tiny models gain nothing from threads, and on a busy 2-core machine OpenMP workers
    spin against other processes and make each run ~10x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_colour_folder(root, classes: list[str], seed: int, n_per_class: int = 20, size: int = 16):
    """A flat <class>/<image>.png folder; each class has its own mean colour plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        colour = np.array([60 * c, 255 - 60 * c, 40 + 50 * (c % 2)])
        for i in range(n_per_class):
            pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def colour_folder():
    """The folder writer, for tests that need a tiny image data set."""
    return write_colour_folder


class NaNAfter(torch.nn.Module):
    """Wraps an SI net; its output becomes NaN from the `after`-th training forward on."""

    def __init__(self, net: torch.nn.Module, after: int):
        super().__init__()
        self.net, self.after, self.calls = net, after, 0

    def si_parameters(self):
        """The wrapped net's SI group."""
        return self.net.si_parameters()

    def forward(self, x):
        """Logits, NaN once `after` training calls happened."""
        if self.training:
            self.calls += 1
        out = self.net(x)
        return out * float("nan") if self.training and self.calls > self.after else out


@pytest.fixture(scope="session")
def nan_after():
    """The NaN-injecting wrapper class, for divergence tests."""
    return NaNAfter
