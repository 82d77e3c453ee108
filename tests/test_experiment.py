"""The synthetic experiment end to end: tables, summary, determinism, resume, SWA, data order."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures.data.batches import batch_indices
from lrfeatures.experiments import Experiment, Shard, plan_shards, run_shard
from lrfeatures.experiments.synthetic import SeedChunk, SyntheticRunner

TABLES = ("metrics", "evaluations", "features", "geometry")  # the synthetic recipe's merged tables
from lrfeatures.store import ExperimentStore

pytestmark = pytest.mark.usefixtures("torch_one_thread")

KEYS = ["stage", "data_seed", "train_seed", "plr", "flr", "swa_k"]
PLRS, FLRS, KS, SEEDS, F = [1e-3, 1e-2, 0.3], [1e-4, 1e-3], [2, 5], [0, 1], 16
PAIRS = {"ft_low-ft_high", "swa-ft_high", "swa-ft_low"}
SHARD = "d0-s0-1-n2"  # the one chunk of the tiny config: data seed 0, training seeds 0..1


def read_tables(root: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(Path(root) / f"{name}.parquet") for name in TABLES}


def assert_same_tables(a: Path, b: Path) -> None:
    tables_a, tables_b = read_tables(a), read_tables(b)
    for name in TABLES:
        pd.testing.assert_frame_equal(tables_a[name], tables_b[name], check_exact=True, obj=name)


def done_info(root: Path, shard: str) -> dict:
    return json.loads((Path(root) / "shards" / shard / "done.json").read_text())


def assert_no_half_written_shards(root: Path) -> None:
    shards = Path(root) / "shards"
    leftovers = [p.name for p in shards.iterdir() if not (p / "done.json").is_file()]
    assert leftovers == [], f"partial shard directories left behind: {leftovers}"


# ----- tables and summary -------------------------------------------------------------------

def test_tables_have_expected_rows(tiny_run):
    tables = read_tables(tiny_run)
    ev = tables["evaluations"]
    assert ev["stage"].value_counts().to_dict() == {"pretrain": 3 * 2, "finetune": 3 * 2 * 2, "swa": 3 * 2 * 2}
    assert not ev.duplicated(KEYS).any()
    assert ev[ev.stage != "finetune"]["flr"].isna().all() and ev[ev.stage == "finetune"]["flr"].notna().all()
    assert (ev[ev.stage != "swa"]["swa_k"] == 0).all()
    assert set(ev[ev.stage == "swa"]["swa_k"]) == set(KS)
    assert set(ev["plr"]) == set(PLRS) and set(ev["train_seed"]) == set(SEEDS)
    assert set(ev[ev.stage == "finetune"]["flr"]) == set(FLRS)

    metrics = tables["metrics"]
    steps = {"pretrain": [0, 50, 100, 150, 200], "finetune": [0, 100]}
    assert set(metrics["stage"]) == set(steps)
    for stage, expected in steps.items():
        rows = metrics[metrics.stage == stage]
        models = 3 * 2 * (len(FLRS) if stage == "finetune" else 1)
        assert len(rows) == models * len(expected)
        for _, trace in rows.groupby(["train_seed", "plr", "flr"], dropna=False):
            assert trace["step"].tolist() == expected
    assert {"step", "train_loss", "train_acc", "test_loss", "test_acc", "grad_norm", "grad_norm_mean",
            "batch_loss_mean", "diverged"} <= set(metrics.columns)

    features = tables["features"]
    assert len(features) == len(ev) * F
    assert not features.duplicated(KEYS + ["feature"]).any()
    assert sorted(features["feature"].unique()) == list(range(F))

    geometry = tables["geometry"]
    assert len(geometry) == 3 * 3 * 2
    assert set(geometry["pair"]) == PAIRS
    assert not geometry.duplicated(["data_seed", "train_seed", "plr", "pair"]).any()
    assert (geometry["swa_k"] == 5).all()
    for name in ("train_acc", "test_acc"):
        assert ev[name].between(0, 1).all()
    assert features["accuracy"].between(0, 1).all()
    assert geometry["angle"].between(0, math.pi).all()
    assert (geometry[["train_barrier", "test_barrier"]] >= 0).all().all()


def test_evaluations_are_the_last_logged_step(tiny_run):
    tables = read_tables(tiny_run)
    metrics, ev = tables["metrics"], tables["evaluations"]
    last = metrics.loc[metrics.groupby(KEYS, dropna=False)["step"].idxmax()]
    merged = ev.merge(last, on=KEYS, suffixes=("", "_log"))
    assert len(merged) == len(ev[ev.stage != "swa"])
    for name in ("train_loss", "train_acc", "test_loss", "test_acc"):
        np.testing.assert_array_equal(merged[name], merged[f"{name}_log"])


def test_geometry_angle_matches_stored_finetuned_weights(tiny_run):
    store = ExperimentStore(tiny_run)
    final = store.shard_tensors(f"finetune-{SHARD}", "weights")["final"].double()
    by_flr = final.view(len(SEEDS), len(PLRS), len(FLRS), -1)  # seed-major, then PLR, then FLR
    low, high = by_flr[:, :, FLRS.index(min(FLRS))], by_flr[:, :, FLRS.index(max(FLRS))]
    cosine = (low * high).sum(-1) / (low.norm(dim=-1) * high.norm(dim=-1))
    expected = torch.acos(cosine.clamp(-1, 1))
    geometry = read_tables(tiny_run)["geometry"]
    rows = geometry[geometry.pair == "ft_low-ft_high"]
    for s, seed in enumerate(SEEDS):
        for p, plr in enumerate(PLRS):
            angle = rows[(rows.train_seed == seed) & np.isclose(rows.plr, plr)]["angle"]
            assert len(angle) == 1
            assert angle.iloc[0] == pytest.approx(expected[s, p].item(), abs=2e-5)


def test_summary_has_documented_keys(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert {"version", "name", "config", "plrs", "flrs", "swa_ks", "regimes", "per_plr"} <= set(summary)
    assert summary["plrs"] == PLRS and summary["flrs"] == FLRS and summary["swa_ks"] == KS
    assert summary["name"] == "tiny"
    assert summary["config"]["pretrain"]["iterations"] == 200
    assert [entry["plr"] for entry in summary["per_plr"]] == PLRS
    block_keys = {"train_loss", "train_acc", "test_acc", "sorted_feature_acc", "sparsity_index",
                  "effective_features"}
    ev = read_tables(tiny_run)["evaluations"]
    for entry in summary["per_plr"]:
        assert {"plr", "regime", "pretrain", "finetune", "swa", "geometry"} <= set(entry)
        assert entry["regime"] in ("1", "2A", "2B", "3", None)
        assert set(entry["finetune"]) == {repr(flr) for flr in FLRS}
        assert set(entry["swa"]) == {str(k) for k in KS}
        blocks = [entry["pretrain"], *entry["finetune"].values(), *entry["swa"].values()]
        for block in blocks:
            assert block_keys <= set(block)
            assert set(block["train_loss"]) == {"mean", "std", "n"}
            curve = block["sorted_feature_acc"]["mean"]
            assert len(curve) == F and len(block["sorted_feature_acc"]["std"]) == F
            assert curve == sorted(curve, reverse=True)
        assert set(entry["geometry"]) == PAIRS
        for pair in entry["geometry"].values():
            assert set(pair) == {"angle", "train_barrier", "test_barrier"}
            assert set(pair["angle"]) == {"median", "q25", "q75", "mean", "std", "n"}
        pre = ev[(ev.stage == "pretrain") & np.isclose(ev.plr, entry["plr"])]
        assert entry["pretrain"]["test_acc"]["mean"] == pytest.approx(pre["test_acc"].mean())
        assert entry["pretrain"]["train_loss"]["std"] == pytest.approx(pre["train_loss"].std(ddof=1))


# ----- determinism and resume ---------------------------------------------------------------

def test_same_config_gives_identical_tables(tiny_run, tiny_config, tmp_path):
    summary = Experiment(tiny_config, tmp_path).run()
    assert_same_tables(tiny_run, tmp_path)
    assert summary == json.loads((tiny_run / "summary.json").read_text())


def test_resume_after_failure_keeps_finished_shards(tiny_run, tiny_config, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed during fine-tuning")

    monkeypatch.setattr(SyntheticRunner, "run_finetune", crash)
    with pytest.raises(RuntimeError, match="killed during fine-tuning"):
        Experiment(tiny_config, tmp_path).run()
    store = ExperimentStore(tmp_path)
    assert store.done_shards() == [f"pretrain-{SHARD}"]
    assert list(store.shards_dir.glob(".tmp-*")) == []
    assert_no_half_written_shards(tmp_path)
    finished = done_info(tmp_path, f"pretrain-{SHARD}")["finished"]

    # Resume: the pretrain shard must be reused, never recomputed.
    monkeypatch.undo()
    monkeypatch.setattr(SyntheticRunner, "run_pretrain", lambda *a, **k: pytest.fail("pretrain recomputed"))
    Experiment(tiny_config, tmp_path).run()
    assert done_info(tmp_path, f"pretrain-{SHARD}")["finished"] == finished
    assert sorted(store.done_shards()) == sorted(s.name for s in plan_shards(tiny_config))
    assert_same_tables(tiny_run, tmp_path)


def test_interrupt_in_analysis_then_resume(tiny_run, tiny_config, tmp_path, monkeypatch):
    def interrupt(self, shard, writer):
        writer.table("features", pd.DataFrame({"feature": [0]}))
        raise KeyboardInterrupt

    monkeypatch.setattr(SyntheticRunner, "run_analyze", interrupt)
    with pytest.raises(KeyboardInterrupt):
        Experiment(tiny_config, tmp_path).run()
    store = ExperimentStore(tmp_path)
    assert store.done_shards() == [f"{stage}-{SHARD}" for stage in ("finetune", "pretrain", "swa")]
    assert list(store.shards_dir.glob(".tmp-*")) == []
    assert_no_half_written_shards(tmp_path)
    before = {s: done_info(tmp_path, s)["finished"] for s in store.done_shards()}
    monkeypatch.undo()
    Experiment(tiny_config, tmp_path).run()
    assert {s: done_info(tmp_path, s)["finished"] for s in before} == before
    assert_same_tables(tiny_run, tmp_path)


# ----- SWA and checkpoints ------------------------------------------------------------------

def test_swa_averages_exactly_the_last_k_checkpoints(tiny_run):
    store = ExperimentStore(tiny_run)
    pretrain = store.shard_tensors(f"pretrain-{SHARD}", "weights")
    swa = store.shard_tensors(f"swa-{SHARD}", "weights")
    checkpoints, final = pretrain["checkpoints"], pretrain["final"]
    # keep_checkpoints = 0 keeps max(swa.ks) = 5: the last five multiples of ckpt_every = 20.
    assert pretrain["checkpoint_steps"].tolist() == [120, 140, 160, 180, 200]
    assert checkpoints.shape == (5, len(SEEDS) * len(PLRS), final.shape[1])
    assert torch.equal(checkpoints[-1], final)  # the last checkpoint is the final step
    assert not torch.equal(checkpoints[0], checkpoints[1])
    assert set(swa) == {f"k{k}" for k in KS}
    for k in KS:
        torch.testing.assert_close(swa[f"k{k}"], checkpoints[-k:].mean(0), rtol=0, atol=0)


def test_checkpoints_are_the_weights_at_their_steps(tiny_run, make_tiny_config, tmp_path):
    """Checkpoint at step 120 == final weights of the same run stopped after 120 steps."""
    cfg = make_tiny_config(pretrain={"iterations": 120})
    store = ExperimentStore.create(tmp_path, cfg)
    run_shard(store, Shard("pretrain", SeedChunk(0, (0, 1))), SyntheticRunner(cfg, store).run_pretrain)
    short = store.shard_tensors(f"pretrain-{SHARD}", "weights")["final"]
    checkpoints = ExperimentStore(tiny_run).shard_tensors(f"pretrain-{SHARD}", "weights")["checkpoints"]
    assert torch.equal(short, checkpoints[0])


# ----- data order ---------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 200), data=st.data())
def test_batch_indices_properties(n, data):
    batch = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 1000))
    per_epoch = n // batch
    epochs = data.draw(st.integers(1, 3))
    stream = ("order", "pretrain", 0, seed)
    full = batch_indices(n, batch, stream, 0, per_epoch * epochs)
    assert full.shape == (per_epoch * epochs, batch) and full.dtype == torch.long
    assert torch.equal(full, batch_indices(n, batch, stream, 0, per_epoch * epochs))  # same stream, same order
    for epoch in full.view(epochs, -1):
        # each epoch: distinct samples, the last partial batch (n mod batch samples) dropped
        assert len(epoch.unique()) == per_epoch * batch
        assert epoch.min() >= 0 and epoch.max() < n
    start = data.draw(st.integers(0, per_epoch * epochs - 1))
    count = data.draw(st.integers(1, per_epoch * epochs - start))
    assert torch.equal(batch_indices(n, batch, stream, start, count), full[start:start + count])


def test_batch_order_differs_between_streams():
    a = batch_indices(128, 16, ("order", "pretrain", 0, 0), 0, 24)
    b = batch_indices(128, 16, ("order", "pretrain", 0, 1), 0, 24)
    assert not torch.equal(a, b)
    assert not torch.equal(a[:8], a[8:16])  # a new permutation every epoch


def test_batch_order_shared_across_lrs_of_a_seed(tiny_config, tmp_path, monkeypatch):
    tasks = []
    original = SyntheticRunner.train

    def record(self, task, data):
        tasks.append(task)
        return original(self, task, data)

    monkeypatch.setattr(SyntheticRunner, "train", record)
    store = ExperimentStore.create(tmp_path, tiny_config)
    runner = SyntheticRunner(tiny_config, store)
    run_shard(store, Shard("pretrain", SeedChunk(0, (0, 1))), runner.run_pretrain)
    run_shard(store, Shard("finetune", SeedChunk(0, (0, 1))), runner.run_finetune)
    pretrain, finetune = tasks
    seed_of_model = {"pretrain": [0, 0, 0, 1, 1, 1], "finetune": [0] * 6 + [1] * 6}  # seed-major layout
    for name, task in (("pretrain", pretrain), ("finetune", finetune)):
        streams = [task.streams[int(i)] for i in task.stream_of_model]
        seeds = seed_of_model[name]
        for m in range(task.num_models):
            for other in range(task.num_models):
                assert (streams[m] == streams[other]) == (seeds[m] == seeds[other])
        orders = {s: batch_indices(128, 16, task.streams[s], 0, 16) for s in range(len(task.streams))}
        assert not torch.equal(orders[0], orders[1])
    assert set(pretrain.effective_lrs.tolist()) == set(PLRS)


# ----- divergence ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diverging_run(tmp_path_factory):
    from lrfeatures.config import load_config

    cfg = load_config({"name": "diverging", "data": {"n_train": 128, "n_test": 256, "n_probe": 100},
                       "pretrain": {"lrs": [1e-3, 1e-2, 1e30], "iterations": 200, "ckpt_every": 20,
                                    "log_every": 50},
                       "finetune": {"lrs": [1e-4, 1e-3], "iterations": 100, "log_every": 100},
                       "swa": {"ks": [2, 5]}, "seeds": {"data": [0], "train": [0, 1]},
                       "engine": {"memory_budget_gb": 1}})
    root = tmp_path_factory.mktemp("diverging")
    summary = Experiment(cfg, root).run()
    return root, summary


def test_diverging_plr_is_recorded_and_others_finish(diverging_run):
    root, summary = diverging_run
    tables = read_tables(root)
    ev, metrics = tables["evaluations"], tables["metrics"]
    bad = np.isclose(ev.plr, 1e30)
    assert bad.sum() == 2 + 2 * 2 + 2 * 2
    assert ev[bad]["diverged"].all()  # pretrain, fine-tuned from it, and its SWA averages
    assert not ev[~bad]["diverged"].any()
    assert np.isfinite(ev[~bad][["train_loss", "test_loss"]].to_numpy()).all()
    last = metrics[(metrics.stage == "pretrain") & (metrics.step == 200)]
    assert last[np.isclose(last.plr, 1e30)]["diverged"].all()
    assert not last[~np.isclose(last.plr, 1e30)]["diverged"].any()
    # Once diverged, always diverged (the model is frozen).
    for _, trace in metrics.groupby(KEYS, dropna=False):
        flags = trace.sort_values("step")["diverged"].to_numpy()
        assert (np.diff(flags.astype(int)) >= 0).all()
    entry = {e["plr"]: e for e in summary["per_plr"]}
    assert entry[1e30]["pretrain"]["diverged_fraction"] == 1.0
    assert entry[1e-3]["pretrain"]["diverged_fraction"] == 0.0
    assert (root / "summary.json").is_file()


def test_nonfinite_loss_rows_are_marked_diverged(diverging_run):
    """tables.md: diverged means the loss became NaN/inf at or before this step."""
    metrics = read_tables(diverging_run[0])["metrics"]
    nonfinite = ~np.isfinite(metrics["train_loss"])
    assert nonfinite.any()
    offenders = metrics[nonfinite & ~metrics["diverged"]]
    assert offenders.empty, offenders[["stage", "train_seed", "plr", "flr", "step", "train_loss", "diverged"]]


# ----- the reference engine -----------------------------------------------------------------

def test_reference_engine_agrees_with_grid_engine(tiny_run, make_tiny_config, tmp_path):
    cfg = make_tiny_config(engine={"name": "reference"})
    Experiment(cfg, tmp_path).run()
    grid, ref = read_tables(tiny_run), read_tables(tmp_path)
    for name in ("metrics", "evaluations"):
        for plr in (1e-3, 1e-2):
            g = grid[name][np.isclose(grid[name].plr, plr)].reset_index(drop=True)
            r = ref[name][np.isclose(ref[name].plr, plr)].reset_index(drop=True)
            pd.testing.assert_frame_equal(g[KEYS], r[KEYS])
            # Train losses agree closely. Test losses get 1e-3: in float32 one ReLU kink crossed
            # differently early on shifts the weights by ~1e-4 (the engines agree to 1e-16 in float64).
            np.testing.assert_allclose(g["train_loss"], r["train_loss"], atol=1e-4, rtol=0)
            np.testing.assert_allclose(g["test_loss"], r["test_loss"], atol=1e-3, rtol=0)
            for acc in ("train_acc", "test_acc"):
                np.testing.assert_allclose(g[acc], r[acc], atol=2.5 / 128, rtol=0)
            assert (g["diverged"] == r["diverged"]).all()
            if name == "metrics":
                np.testing.assert_allclose(g["batch_loss_mean"], r["batch_loss_mean"], atol=1e-4, rtol=0)
