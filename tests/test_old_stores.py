"""Stores written by lrfeatures 0.1.0 still work: report, resume (bit for bit), fourier bands, old configs.

tests/data/stores-0.1.0/ holds a synthetic and an image experiment store written by the previous
release, and `folder/`, the tiny image folder the image store was trained on (its config says
`dataset = "folder:folder"`, relative to the working directory). Every test works on a copy in
tmp_path; nothing is ever written under tests/data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lrfeatures import cli
from lrfeatures.config import load_config

pytestmark = pytest.mark.usefixtures("torch_one_thread")

OLD = Path(__file__).parent / "data" / "stores-0.1.0"
# The shards a resume must recompute, and the merged tables it rebuilds, per store.
RECOMPUTED = {"synthetic": ("analyze-", "swa-"), "images": ("analyze-",)}
TABLES = {"synthetic": ("metrics", "evaluations", "features", "geometry"),
          "images": ("metrics", "evaluations", "geometry")}
FIGURES = {"synthetic": ("tick", "test_acc_finetune", "swa_acc", "features", "sparsity", "geometry",
                         "training_curves"),
           "images": ("test_acc_finetune", "swa_acc", "geometry", "training_curves", "band_keep", "band_remove",
                      "band_heatmap", "band_example")}


@pytest.fixture
def stores(tmp_path) -> Path:
    """A private copy of tests/data/stores-0.1.0 (both stores and the image folder)."""
    return Path(shutil.copytree(OLD, tmp_path / "stores-0.1.0"))


def done_files(root: Path) -> dict[str, bytes]:
    """done.json of every finished shard, by shard name."""
    return {p.parent.name: p.read_bytes() for p in sorted((root / "shards").glob("*/done.json"))}


def old_table(kind: str, name: str) -> pd.DataFrame:
    return pd.read_parquet(OLD / kind / f"{name}.parquet")


NEW_IN_0_2 = {"n", "convergence", "findings", "curvature", "regime", "sparsity_index", "effective_features"}


def without_new_fields(value):
    """summary.json data without what 0.2 added or redefined (seed counts, convergence, sparsity, regimes)."""
    if isinstance(value, dict):
        return {k: without_new_fields(v) for k, v in value.items() if k not in NEW_IN_0_2}
    if isinstance(value, list):
        return [without_new_fields(v) for v in value]
    return value


def nearly(a, b, rel: float = 2e-6) -> bool:
    """Equal structures whose floats agree to `rel` (0.3's evaluation losses; see the tables above)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(nearly(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(nearly(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=rel, abs=0, nan_ok=True)
    return a == b


@pytest.mark.parametrize("kind", ["synthetic", "images"])
def test_report_of_an_old_store(stores, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the stores' folder: the report reads the store only, never the data
    root = stores / kind
    summary = (root / "summary.json").read_bytes()
    assert cli.main(["report", str(root)]) == 0
    assert (root / "report.html").is_file() and (root / "report.html").stat().st_size > 10_000
    for figure in FIGURES[kind]:
        assert (root / "figures" / f"{figure}.png").is_file(), figure
    assert (root / "summary.json").read_bytes() == summary  # the report only reads


def resume(stores: Path, kind: str, monkeypatch) -> tuple[Path, dict[str, bytes]]:
    """Delete the kind's derived shards and merged tables, then resume through `lrfeatures run`."""
    root = stores / kind
    for shard in (root / "shards").iterdir():
        if shard.name.startswith(RECOMPUTED[kind]):
            shutil.rmtree(shard)
    for name in TABLES[kind]:
        (root / f"{name}.parquet").unlink()
    kept = done_files(root)
    assert any(name.startswith("pretrain-") for name in kept) and any(n.startswith("finetune-") for n in kept)
    monkeypatch.chdir(stores)  # the image store's data set is folder:folder, relative to the cwd
    assert cli.main(["run", str(root / "config.toml"), "--out", str(root), "--quiet", "--no-report",
                     "--allow-version-change"]) == 0
    return root, kept


@pytest.mark.parametrize("kind", ["synthetic"])
def test_resume_of_an_old_store_recomputes_bit_for_bit(stores, kind, monkeypatch):
    root, kept = resume(stores, kind, monkeypatch)
    after = done_files(root)
    # Training shards were kept as they were (same done.json, so not recomputed) ...
    assert {name: after[name] for name in kept} == kept
    # ... and the deleted shards were computed again by this release.
    redone = sorted(set(after) - set(kept))
    assert redone and all(name.startswith(RECOMPUTED[kind]) for name in redone)
    assert {p.name for p in (OLD / kind / "shards").iterdir()} == set(after)
    for name in TABLES[kind]:
        # Every 0.1.0 column, in its order, same dtypes, same values, bit for bit (0.2 adds features.margin).
        table, before = pd.read_parquet(root / f"{name}.parquet"), old_table(kind, name)
        assert list(table.columns[:len(before.columns)]) == list(before.columns)
        # Losses of recomputed evaluations: 0.3's fused C evaluation sums in another order (2e-6 relative
        # bound, tests/test_eval_cadence.py); everything else, accuracies included, bit for bit.
        losses = [c for c in before.columns if c.endswith("_loss")]
        exact = [c for c in before.columns if c not in losses]
        pd.testing.assert_frame_equal(table[exact], before[exact], check_exact=True, obj=f"{kind}/{name}.parquet")
        pd.testing.assert_frame_equal(table[losses], before[losses], check_exact=False, rtol=2e-6, atol=0,
                                      obj=f"{kind}/{name}.parquet")
    # The summary's per-PLR training statistics and grids are those of 0.1.0 too. 0.2 adds seed counts,
    # convergence, findings and a margin-based sparsity index, and votes regimes differently (issue 15).
    old, new = (json.loads(p.read_text()) for p in (OLD / kind / "summary.json", root / "summary.json"))
    for key in ("plrs", "flrs", "swa_ks") + (("dataset", "chance") if kind == "images" else ()):
        assert new[key] == old[key], key
    assert nearly(without_new_fields(new["per_plr"]), without_new_fields(old["per_plr"]))  # bands blocks included
    if kind == "images":  # `lrfeatures fourier`'s table is not the run's: left as it was
        assert (root / "bands.parquet").read_bytes() == (OLD / kind / "bands.parquet").read_bytes()


@pytest.mark.parametrize("command", ["run", "fourier"])
def test_an_old_image_store_is_refused_not_mixed(stores, monkeypatch, capsys, command):
    """0.1/0.2 image stores hold one model per shard; 0.3 refuses to resume them (one line, exit 2), changing nothing."""
    root = stores / "images"
    shutil.rmtree(root / "shards" / sorted(p.name for p in (root / "shards").glob("analyze-*"))[0])
    before = done_files(root)
    monkeypatch.chdir(stores)
    args = (["run", str(root / "config.toml"), "--out", str(root), "--allow-version-change"] if command == "run"
            else ["fourier", str(root)])
    assert cli.main(args + ["--quiet", "--no-report"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "one image model per shard" in err and "new --out" in err
    assert done_files(root) == before


OLD_VIT_CONFIG = """\
# lrfeatures 0.1.0
kind = "images"
name = "old-vit"

[data]
dataset = "cifar10"
max_per_class = 10

[model]
name = "vit"
width = 32
depth = 2
activation = "relu"
last_layer_norm = 10.0
norm_eps = 1e-07

[vit]
heads = 2
dim_head = 16
mlp_dim = 64
patch = 4
dropout = 0.0
emb_dropout = 0.0

[pretrain]
lrs = [0.001]
epochs = 1

[finetune]
lrs = [0.001]
epochs = 1

[swa]
ks = [1]
"""


def test_old_config_with_a_vit_section_loads(tmp_path):
    from lrfeatures.experiments import load_experiment_config

    path = tmp_path / "config.toml"
    path.write_text(OLD_VIT_CONFIG)
    cfg = load_config(str(path))
    assert cfg.kind == "images" and cfg.model.name == "vit"
    assert cfg.model.options["heads"] == 2 and cfg.model.options["mlp_dim"] == 64
    assert not hasattr(cfg, "vit")
    # With the recipe's checks the options are the ViT's full, validated set.
    checked = load_experiment_config(str(path))
    assert checked.model.options == {"heads": 2, "dim_head": 16, "mlp_dim": 64, "patch": 4, "dropout": 0.0,
                                      "emb_dropout": 0.0}
