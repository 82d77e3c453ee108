"""Extending lrfeatures without editing it: a model, an image data set, a measurement and an experiment kind.

Each test registers its extension itself, runs a tiny experiment end to end through the CLI entry
point (`lrfeatures.cli.main`) and checks a property of the result, then unregisters it again so no
other test sees it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from lrfeatures import cli, config as config_module
from lrfeatures.analysis.measurements import MEASUREMENTS, register_measurement, unregister_measurement
from lrfeatures.analysis.tables import KEY_COLUMNS
from lrfeatures.data.imageset import ImageDataset, LoadOptions
from lrfeatures.data.registry import DATASETS, register_dataset
from lrfeatures.errors import ConfigError
from lrfeatures.experiments import runtime
from lrfeatures.experiments.runtime import Recipe, Stage, register_kind
from lrfeatures.models.registry import MODELS, freeze_to_norm_, register_model
from lrfeatures.store import ExperimentStore, write_json

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# The tiny synthetic run of conftest, a little shorter: the toy model trains through torch.func.
SHORT = ["pretrain.iterations=100", "finetune.iterations=50", "finetune.log_every=50"]


def read_summary(root: Path) -> dict:
    return json.loads((root / "summary.json").read_text())


# ---------------------------------------------------------------- a model

class RMSMLP(nn.Module):
    """Bias-free Linear -> RMS normalization (no affine) -> tanh, then a frozen head: SI in all hidden weights."""

    def __init__(self, in_dim: int, width: int, depth: int, num_outputs: int, head_norm: float, eps: float):
        super().__init__()
        dims = [in_dim] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(width, num_outputs, bias=False)
        freeze_to_norm_(self.head.weight, head_norm)
        self.eps, self.squeeze = eps, num_outputs == 1

    def si_parameters(self) -> list[nn.Parameter]:
        return [layer.weight for layer in self.hidden]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            h = layer(x)
            x = torch.tanh(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))
        out = self.head(x)
        return out.squeeze(-1) if self.squeeze else out


@pytest.fixture
def toy_model():
    """`toy-mlp` registered for vector inputs (the grid and reference engines), removed afterwards."""

    def build(cfg, input_shape, num_outputs):
        """Toy RMS-normalized SI MLP."""
        return RMSMLP(math.prod(input_shape), cfg.width, cfg.depth, num_outputs, cfg.last_layer_norm, cfg.norm_eps)

    register_model("toy-mlp", input_kind="vector", si_group="all", engines=("grid", "reference"))(build)
    yield "toy-mlp"
    MODELS.pop("toy-mlp", None)


def test_registered_model_runs_through_the_grid_engine(toy_model, tiny_overrides, tmp_path, monkeypatch):
    from lrfeatures.data.synthetic import make_synthetic
    from lrfeatures.engine import grid
    from lrfeatures.experiments.synthetic import SyntheticRunner
    from lrfeatures.sphere import unflatten_into_

    kernels = []
    original = grid.kernel_for
    monkeypatch.setattr(grid, "kernel_for", lambda template: kernels.append(original(template)) or kernels[-1])
    out = tmp_path / "toy-mlp"
    # norm_eps reaches the builder; at 1e-12 it is negligible, so f(c theta) = f(theta) holds to float64
    # precision below. Two moderate PLRs: at PLR 0.3 one layer of the joint SI group can shrink so far
    # (mean squared pre-activation ~1e-15) that any eps dominates its normalization.
    argv = ["synthetic", "--out", str(out), "--quiet", "--no-report", "--set", f"model.name={toy_model}",
            "--set", "model.norm_eps=1e-12"]
    for override in tiny_overrides + SHORT + ["pretrain.lrs=[1e-3, 1e-2]"]:
        argv += ["--set", override]
    assert cli.main(argv) == 0

    for table in ("metrics", "evaluations", "features", "geometry"):
        assert len(pd.read_parquet(out / f"{table}.parquet")), table
    # The C kernel takes only the built-in SIMLP: the grid engine trained the toy model with torch.func.
    assert kernels and {type(k).__name__ for k in kernels} == {"FuncKernel"}
    summary = read_summary(out)
    assert summary["config"]["model"]["name"] == toy_model and summary["config"]["model"]["norm_eps"] == 1e-12
    assert summary["regimes"].get("defined", True)  # si_group="all": regimes are defined

    # The trained models are the toy model: rebuilt from the store, they reproduce the engine's test
    # accuracy, sit on the sphere, and are scale invariant, f(c theta) = f(theta).
    store = ExperimentStore(out)
    cfg = store.config()
    runner = SyntheticRunner(cfg, store)
    data = make_synthetic(cfg.data, 0)
    shard = store.done_shards()[[s.startswith("pretrain-") for s in store.done_shards()].index(True)]
    final = store.shard_tensors(shard, "weights")["final"]
    evaluations = pd.read_parquet(out / "evaluations.parquet").query("stage == 'pretrain'")
    plrs = cfg.pretrain.lrs
    for row, theta in enumerate(final):
        seed, plr = cfg.seeds.train[row // len(plrs)], plrs[row % len(plrs)]
        model = runner.make_model(0, seed)
        assert isinstance(model, RMSMLP)
        assert theta.norm().item() == pytest.approx(cfg.sphere.rho, rel=1e-5)
        with torch.no_grad():
            unflatten_into_(theta.to(torch.float32), model.si_parameters())
            logits = model(data.x_test)
            expected = evaluations[(evaluations["train_seed"] == seed) & np.isclose(evaluations["plr"], plr)]
            accuracy = ((logits > 0) == (data.y_test > 0.5)).double().mean().item()
            assert accuracy == pytest.approx(float(expected["test_acc"].iloc[0]), abs=1.5 / len(data.y_test))
            # In float64, so that only the normalization's eps stands between f(c theta) and f(theta).
            model, x = model.double(), data.x_test.double()
            reference = model(x)
            for c in (0.5, 4.0):
                for p in model.si_parameters():
                    p.mul_(c)
                torch.testing.assert_close(model(x), reference, rtol=1e-6, atol=1e-6)
                for p in model.si_parameters():
                    p.div_(c)


# ---------------------------------------------------------------- an image data set

TOY_COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def toy_colours(arg: str, opts: LoadOptions) -> ImageDataset:
    """Three classes of 8x8 images, one mean colour each plus noise (drawn from opts.seed)."""
    gen = torch.Generator().manual_seed(1000 + opts.seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(len(TOY_COLOURS)).repeat_interleave(n)
        means = torch.tensor(list(TOY_COLOURS.values()), dtype=torch.float32)[labels].view(-1, 3, 1, 1)
        images = means + 50 * torch.randn(len(labels), 3, 8, 8, generator=gen)
        return images.clamp(0, 255).to(torch.uint8), labels

    (train_x, train_y), (test_x, test_y) = split(12), split(6)
    return ImageDataset(train_x, train_y, test_x, test_y, classes=list(TOY_COLOURS), name="toy-colours")


@pytest.fixture
def toy_dataset():
    register_dataset("toy-colours", "image", toy_colours)
    yield "toy-colours"
    DATASETS.pop("toy-colours", None)


def test_registered_image_dataset_runs_an_image_experiment(toy_dataset, tmp_path):
    from lrfeatures.data.images import load_image_dataset

    first, again = load_image_dataset(toy_dataset, seed=3), load_image_dataset(toy_dataset, seed=3)
    assert torch.equal(first.train_x, again.train_x) and first.num_classes == 3
    assert not torch.equal(first.train_x, load_image_dataset(toy_dataset, seed=4).train_x)

    out = tmp_path / "toy-images"
    # With the report (the one extension test that draws it: an image run has the fewest figures).
    argv = ["images", "--dataset", toy_dataset, "--model", "convnet-si", "--preset", "cpu-small",
            "--out", str(out), "--quiet"]
    for override in ("model.width=2", "model.depth=2", "pretrain.lrs=[1e-3, 0.3]", "pretrain.epochs=2",
                     "pretrain.batch_size=12", "finetune.lrs=[1e-3, 1e-2]", "finetune.epochs=1", "swa.ks=[1]",
                     "analysis.geometry_points=3"):
        argv += ["--set", override]
    assert cli.main(argv) == 0

    summary = read_summary(out)
    assert summary["dataset"]["name"] == "toy-colours" and summary["dataset"]["num_classes"] == 3
    assert summary["dataset"]["classes"] == list(TOY_COLOURS)
    assert summary["dataset"]["n_train"] == 36 and summary["dataset"]["n_test"] == 18
    assert summary["chance"] == pytest.approx(1 / 3)
    evaluations = pd.read_parquet(out / "evaluations.parquet")
    assert evaluations.groupby("stage").size().to_dict() == {"pretrain": 2, "finetune": 4, "swa": 2}
    assert evaluations["test_acc"].between(0, 1).all()
    assert set(pd.read_parquet(out / "geometry.parquet")["pair"]) == {"ft_low-ft_high", "swa-ft_high",
                                                                       "swa-ft_low"}
    page = (out / "report.html").read_text()
    assert "toy-colours" in page
    for figure in ("test_acc_finetune", "swa_acc", "geometry", "training_curves"):
        assert (out / "figures" / f"{figure}.png").is_file(), figure


# ---------------------------------------------------------------- a measurement

@pytest.fixture
def weight_norm():
    """`weight_norm`: the joint norm of every final model's SI weights (synthetic experiments)."""

    @register_measurement("weight_norm", kinds=("synthetic",))
    def measure(ctx) -> pd.DataFrame:
        """Norm of the SI weights of every final model."""
        return pd.concat([keys.assign(weight_norm=weights.double().norm(dim=1).cpu().numpy())
                          for keys, weights, _ in ctx.solutions], ignore_index=True)

    assert "weight_norm" in MEASUREMENTS
    yield "weight_norm"
    unregister_measurement("weight_norm")
    assert "weight_norm" not in MEASUREMENTS


def test_registered_measurement_gets_a_table_and_a_summary_block(weight_norm, tiny_overrides, tmp_path):
    out = tmp_path / "measured"
    argv = ["synthetic", "--out", str(out), "--quiet", "--no-report"]
    for override in tiny_overrides + SHORT:
        argv += ["--set", override]
    assert cli.main(argv) == 0

    table = pd.read_parquet(out / "weight_norm.parquet")
    cfg = ExperimentStore(out).config()
    models = len(cfg.seeds.train) * len(cfg.pretrain.lrs)
    assert list(table.columns) == KEY_COLUMNS + ["weight_norm"]
    assert table.groupby("stage").size().to_dict() == {"pretrain": models, "swa": models * len(cfg.swa.ks),
                                                       "finetune": models * len(cfg.finetune.lrs)}
    assert not table.duplicated(KEY_COLUMNS).any()
    # Training steps on the sphere: every PT and FT model has norm rho; an SWA average lies inside the ball.
    on_sphere = table[table["stage"] != "swa"]["weight_norm"]
    np.testing.assert_allclose(on_sphere, cfg.sphere.rho, rtol=1e-5)
    assert (table[table["stage"] == "swa"]["weight_norm"] <= cfg.sphere.rho * (1 + 1e-6)).all()

    block = read_summary(out)["measurements"]["weight_norm"]
    assert block["rows"] == len(table)
    pretrain = [entry for entry in block["per_plr"] if entry["stage"] == "pretrain"]
    assert sorted(entry["plr"] for entry in pretrain) == sorted(cfg.pretrain.lrs)
    assert all(entry["weight_norm"] == pytest.approx(cfg.sphere.rho, rel=1e-5) for entry in pretrain)


# ---------------------------------------------------------------- an experiment kind

@dataclass
class ToyConfig:
    """Draw `n` integers per seed, then total them."""

    kind: str = "toy"
    name: str = "toy"
    n: int = 5
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])

    def validate(self) -> None:
        if self.n < 1 or not self.seeds:
            raise ConfigError(f"n={self.n} must be >= 1 and seeds must not be empty")


@dataclass(frozen=True)
class ToyUnit:
    seed: int

    @property
    def label(self) -> str:
        return f"s{self.seed}"


CALLS: list[str] = []  # shard names the toy worker computed


class ToyWorker:
    device = "cpu"

    def __init__(self, cfg: ToyConfig, store: ExperimentStore):
        self.cfg, self.store = cfg, store

    def run_draw(self, shard, writer) -> None:
        CALLS.append(shard.name)
        values = np.random.default_rng(shard.seed).integers(0, 100, self.cfg.n)
        writer.table("draws", pd.DataFrame({"seed": shard.seed, "i": range(self.cfg.n), "value": values}))

    def run_total(self, shard, writer) -> None:
        CALLS.append(shard.name)
        draws = self.store.shard_table(shard.upstream("draw").name, "draws")
        writer.table("totals", pd.DataFrame({"seed": [shard.seed], "total": [int(draws["value"].sum())]}))


class ToyRecipe(Recipe):
    kind = "toy"
    config_class = ToyConfig
    unit_name = "draw"
    stages = (Stage("draw"), Stage("total", ("draw",)))
    tables = ("draws", "totals")

    def units(self, cfg: ToyConfig) -> list[ToyUnit]:
        return [ToyUnit(s) for s in cfg.seeds]

    def cost(self, cfg: ToyConfig, shard) -> int:
        return cfg.n if shard.stage == "draw" else 0

    def open(self, cfg: ToyConfig, store: ExperimentStore, progress=None) -> ToyWorker:
        return ToyWorker(cfg, store)

    def summarize(self, store: ExperimentStore) -> dict:
        totals = store.table("totals")
        summary = {"kind": self.kind, "totals": dict(zip(totals["seed"].tolist(), totals["total"].tolist()))}
        write_json(store.root / "summary.json", summary)
        return summary

    def report(self, root: Path) -> Path:
        page = Path(root) / "report.html"
        page.write_text(f"<pre>{(Path(root) / 'summary.json').read_text()}</pre>")
        return page


@pytest.fixture
def toy_kind():
    CALLS.clear()
    register_kind(ToyRecipe())
    yield "toy"
    runtime.KINDS.pop("toy", None)
    config_module.CONFIG_KINDS.pop("toy", None)


def write_toy_config(tmp_path: Path) -> Path:
    path = tmp_path / "toy.toml"
    path.write_text('kind = "toy"\nname = "toy-sum"\nn = 4\nseeds = [3, 5]\n')
    return path


def expected_totals(seeds=(3, 5), n=4) -> dict[int, int]:
    return {s: int(np.random.default_rng(s).integers(0, 100, n).sum()) for s in seeds}


def test_registered_kind_shards_merge_and_resume(toy_kind, tmp_path):
    """What works today for a kind without the standard tables: the runtime's shard loop and merge."""
    cfg = runtime.load_experiment_config(str(write_toy_config(tmp_path)))
    assert isinstance(cfg, ToyConfig) and cfg.n == 4
    experiment = runtime.Experiment(cfg, tmp_path / "toy")
    assert [s.name for s in experiment.plan()] == ["draw-s3", "total-s3", "draw-s5", "total-s5"]
    for shard in experiment.plan():
        assert experiment.run_shard(shard)
    assert not any(experiment.run_shard(shard) for shard in experiment.plan())  # done shards never rerun
    assert CALLS == ["draw-s3", "total-s3", "draw-s5", "total-s5"]
    for name in experiment.recipe.all_tables(cfg):
        experiment.store.merge_table(name)
    totals = pd.read_parquet(tmp_path / "toy" / "totals.parquet")
    assert dict(zip(totals["seed"], totals["total"])) == expected_totals()
    assert len(pd.read_parquet(tmp_path / "toy" / "draws.parquet")) == 8
    assert isinstance(ExperimentStore(tmp_path / "toy").config(), ToyConfig)  # config.toml round-trips


def test_registered_kind_runs_through_the_cli_and_resumes(toy_kind, tmp_path):
    """Its own summary and report hooks replace the standard ones (which need metrics/evaluations)."""
    toml, out = write_toy_config(tmp_path), tmp_path / "toy-cli"
    argv = ["run", str(toml), "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    assert CALLS == ["draw-s3", "total-s3", "draw-s5", "total-s5"]
    totals = pd.read_parquet(out / "totals.parquet")
    assert dict(zip(totals["seed"], totals["total"])) == expected_totals()
    assert len(pd.read_parquet(out / "draws.parquet")) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"] == {str(k): v for k, v in expected_totals().items()}
    assert cli.main(argv) == 0
    assert len(CALLS) == 4  # the second run resumed: nothing recomputed
    assert cli.main(["report", str(out)]) == 0 and "totals" in (out / "report.html").read_text()


PLUGIN = '''
from lrfeatures.models.registry import register_model
from lrfeatures.models.convnet import SIConvNet

@register_model("plugin-convnet", input_kind="image", si_group="all")
def plugin_convnet(cfg, input_shape, num_outputs):
    """A plugin's image model (the SI ConvNet under another name)."""
    return SIConvNet(input_shape[0], input_shape[1], cfg.width, cfg.depth, num_outputs)
'''


def test_a_plugin_module_extends_the_cli(tmp_path):
    """`--plugin MODULE` imports the user's module before the parser is built: its model is a --model choice."""
    import os
    import subprocess
    import sys

    (tmp_path / "my_lrf_plugin.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = [sys.executable, "-m", "lrfeatures"]
    shown = subprocess.run(run + ["--plugin", "my_lrf_plugin", "images", "--help"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "plugin-convnet" in shown.stdout
    missing = subprocess.run(run + ["--plugin", "no_such_plugin_module", "presets"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no_such_plugin_module" in missing.stderr
