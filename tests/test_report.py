"""The report: figures and the HTML page rebuilt from a hand-made experiment store."""

import base64
import json
import math
import re
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lrfeatures import __version__
from lrfeatures import report
from lrfeatures.config import load_config, to_dict
from lrfeatures.analysis import tables
from lrfeatures.errors import DataError
from lrfeatures.report import (FIGURE_SETS, FIGURES, FigureSet, Regimes, figures_for, load_experiment, model_kinds,
                               over_seeds, plot_geometry, regime_table, swa_k_of_choice, write_report)
from lrfeatures.store import ExperimentStore

PLRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
REGIMES = ["1", "1", "2A", "2A", "2B", "3", "3"]
FLRS = [1e-4, 1e-3]
KS = [2, 5]
SEEDS = [(0, 0), (0, 1), (1, 0)]
F = 4
STEPS = np.arange(0, 1001, 100)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_FIGURES = [key for key, _, _ in FIGURES]
NAME = "fake <report> & co"  # also checks escaping
TEST_ACC = {"1": 0.80, "2A": 0.90, "2B": 0.75, "3": 0.52}


def feature_accuracies(regime: str, rng) -> np.ndarray:
    """Sparse (one strong feature) in 2A, all equal in 1, weak in 2B, chance in 3."""
    base = {"1": np.full(F, 0.70), "2A": np.array([0.95] + [0.51] * (F - 1)),
            "2B": np.full(F, 0.58), "3": np.full(F, 0.50)}[regime]
    return np.clip(base + 0.01 * rng.normal(size=F), 0, 1)


def boundaries_of(plrs, regimes) -> dict:
    """The boundaries JSON of RegimeReport.to_json for a labelled grid."""
    def between(lower, upper):
        low = [p for p, r in zip(plrs, regimes) if r in lower]
        high = [p for p, r in zip(plrs, regimes) if r in upper]
        if not low or not high:
            return None
        a, b = low[-1], high[0]
        return {"lower_plr": a, "upper_plr": b, "estimate": math.sqrt(a * b),
                "margin": 0.5 * math.log10(b / a), "confidence": 0.8}
    return {"1/2": between({"1"}, {"2", "2A", "2B"}), "2A/2B": between({"2A"}, {"2B"}),
            "2/3": between({"2", "2A", "2B"}, {"3"})}


def make_experiment(root, regimes=REGIMES, geometry=True, diverge_plr=None, name=NAME, ks=KS):
    """Write a small experiment directory (config, the four tables, summary.json) following the schema."""
    cfg = load_config({"name": name, "pretrain": {"lrs": PLRS, "iterations": 1000, "ckpt_every": 100,
                                                  "log_every": 100},
                       "finetune": {"lrs": FLRS, "iterations": 200, "log_every": 100},
                       "swa": {"ks": ks}, "seeds": {"data": [0, 1], "train": [0, 1]},
                       "data": {"n_features": F}})
    ExperimentStore.create(root, cfg)
    rng = np.random.default_rng(0)
    metrics, evaluations, features, geom = [], [], [], []
    models = [("pretrain", np.nan, 0)] + [("finetune", f, 0) for f in FLRS] + [("swa", np.nan, k) for k in ks]
    for plr, regime in zip(PLRS, regimes):
        for d, t in SEEDS:
            diverged = plr == diverge_plr and (d, t) != (1, 0)  # all seeds but one diverge
            keys = {"data_seed": d, "train_seed": t, "plr": plr}
            for stage, flr, k in models:
                acc = np.nan if diverged else TEST_ACC[regime] + 0.01 * rng.normal()
                evaluations.append({"stage": stage, **keys, "flr": flr, "swa_k": k, "train_loss": 0.1,
                                    "train_acc": acc, "test_loss": 0.3, "test_acc": acc,
                                    "diverged": diverged})
                probe = np.full(F, np.nan) if diverged else feature_accuracies(regime, rng)
                features += [{"stage": stage, **keys, "flr": flr, "swa_k": k, "feature": i,
                              "accuracy": probe[i], "margin": 4 * (probe[i] - 0.5)} for i in range(F)]
            level = {"1": 1e-3, "2A": 0.2, "2B": 0.4, "3": 0.69}[regime]
            loss = level + (0.7 - level) * np.exp(-STEPS / 150.0)
            if diverged:
                loss = np.where(STEPS >= 500, np.inf, loss)
            for stage, flr in [("pretrain", np.nan)] + [("finetune", f) for f in FLRS]:
                metrics += [{"stage": stage, **keys, "flr": flr, "swa_k": 0, "step": int(s), "train_loss": l,
                             "train_acc": 0.9, "test_loss": l, "test_acc": 0.85, "grad_norm": 10 * l,
                             "grad_norm_mean": np.nan if s == 0 else 10 * l, "batch_loss_mean": l,
                             "diverged": bool(diverged and s >= 500)} for s, l in zip(STEPS, loss)]
            for pair in ("ft_low-ft_high", "swa-ft_high", "swa-ft_low"):
                far = regime == "1"
                geom.append({"data_seed": d, "train_seed": t, "plr": plr, "pair": pair,
                             "angle": (1.0 if far else 0.1) + 0.05 * rng.random(),
                             "train_barrier": (20 if far else 0.5) * rng.random(),
                             "test_barrier": (25 if far else 0.5) * rng.random(),
                             "swa_k": tables.swa_k_of_choice(ks)})  # as the geometry stage records it
    for table_name, rows in [("metrics", metrics), ("evaluations", evaluations), ("features", features)] \
            + ([("geometry", geom)] if geometry else []):
        pd.DataFrame(rows).to_parquet(root / f"{table_name}.parquet", index=False)
    per_plr = [{"plr": p, "regime": r, "confidence": 0.9, "raw_regime": r, "relabelled": False,
                "n_seeds": len(SEEDS), "n_diverged": 2 if p == diverge_plr else 0,
                **{f"frac_{name}": float(name == r) for name in ("1", "2", "2A", "2B", "3")}}
               for p, r in zip(PLRS, regimes)]
    summary = {"version": "0.0.9-test", "name": name, "config": to_dict(cfg), "plrs": PLRS, "flrs": FLRS,
               "swa_ks": ks, "regimes": {"criteria": {}, "global_best": 0.9, "per_plr": per_plr,
                                         "boundaries": boundaries_of(PLRS, regimes)},
               "per_plr": [{"plr": p, "regime": r} for p, r in zip(PLRS, regimes)]}
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    image = mpimg.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05, f"{path} looks blank"
    return data


@pytest.fixture(autouse=True)
def low_dpi(monkeypatch):
    monkeypatch.setattr(report.style, "DPI", 50)  # the same figures, drawn faster


def page_of(tmp_path, **kw):
    root = make_experiment(tmp_path / "exp", **kw)
    path = write_report(root)
    return root, path, path.read_text()


def table_rows(page: str, table_index: int) -> list[list[str]]:
    """Cell texts of the body rows of the n-th table of the page."""
    body = re.findall(r"<tbody>(.*?)</tbody>", page)[table_index]
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_full_report_has_every_figure_embedded_and_tables(tmp_path):
    root, path, page = page_of(tmp_path)
    assert path == root / "report.html"
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == len(ALL_FIGURES)
    for key, encoded in zip(ALL_FIGURES, images):
        assert base64.b64decode(encoded) == check_png(root / "figures" / f"{key}.png")
    # Self-contained: no external resource of any kind.
    assert "http" not in page and "<script" not in page and "<link" not in page
    assert all(src.startswith("data:") for src in re.findall(r"src='([^']*)'", page))
    findings = table_rows(page, 0)  # the findings panel comes first
    assert [r[0] for r in findings] == ["S1", "S2", "S3", "S4", "S5"]
    assert page.index("<h2>Findings</h2>") < page.index("<h2>Regimes per PLR</h2>")
    rows = table_rows(page, 1)
    assert [r[0] for r in rows] == [f"{p:.3g}" for p in PLRS]
    assert [r[1] for r in rows] == REGIMES
    assert all(r[5].startswith(("0.", "1.")) and "±" in r[5] for r in rows)  # test acc after PT
    assert rows[0][3] == "1 1.00"  # seed vote shares (frac_* of summary.json)
    sparse = rows[REGIMES.index("2A")][-1]
    dense = rows[REGIMES.index("1")][-1]
    assert float(sparse.split()[0]) > 0.9 > 0.1 > float(dense.split()[0])
    assert "sparsity after PT (margin)" in page
    bounds = {r[0]: r for r in table_rows(page, 2)}
    assert bounds["1/2"][1] == f"{math.sqrt(3e-3 * 1e-2):.3g}" and bounds["2/3"][2] == "0.1"
    assert __version__ in page and "0.0.9-test" in page
    assert "<report>" not in page and "fake &lt;report&gt; &amp; co" in page
    assert "[pretrain]" in page  # the resolved config as TOML


def test_missing_geometry_is_skipped_with_a_note(tmp_path):
    root, _, page = page_of(tmp_path, geometry=False)
    assert not (root / "figures" / "geometry.png").exists()
    assert "geometry.png</b> not drawn" in page
    for key in ALL_FIGURES:
        if key != "geometry":
            check_png(root / "figures" / f"{key}.png")
    with pytest.raises(DataError, match="geometry"):
        plot_geometry(load_experiment(root), tmp_path / "g.png")


def test_grid_without_boundaries(tmp_path):
    root, _, page = page_of(tmp_path, regimes=["1"] * len(PLRS))
    for key in ALL_FIGURES:
        check_png(root / "figures" / f"{key}.png")
    bounds = table_rows(page, 2)
    assert [r[0] for r in bounds] == ["1/2", "2A/2B", "2/3"]
    assert all(cell == "–" for r in bounds for cell in r[1:])


def test_diverged_rows_are_left_out_and_counted(tmp_path):
    root, _, page = page_of(tmp_path, diverge_plr=PLRS[-1])
    for key in ALL_FIGURES:
        check_png(root / "figures" / f"{key}.png")
    last = table_rows(page, 1)[-1]
    assert last[4] == "2/3"  # diverged seeds
    assert last[5].startswith("0.5") and "±" not in last[5]  # one surviving seed: no std


def test_missing_summary_recomputes_regimes(tmp_path):
    root = make_experiment(tmp_path / "exp")
    (root / "summary.json").unlink()
    exp = load_experiment(root)
    assert exp.notes and "summary.json is missing" in exp.notes[0]
    assert set(exp.regimes.table["regime"]) <= {"1", "2", "2A", "2B", "3"}


def test_shortened_plrs_in_summary_still_match_the_tables(tmp_path):
    root = make_experiment(tmp_path / "exp")
    summary = json.loads((root / "summary.json").read_text())
    for row in summary["regimes"]["per_plr"]:
        row["plr"] *= 1 + 3e-7  # what a JSON writer with few digits does to 0.0316227766...
    (root / "summary.json").write_text(json.dumps(summary))
    table = regime_table(load_experiment(root))
    assert list(table["PLR"]) == [f"{p:.3g}" for p in PLRS] and list(table["regime"]) == REGIMES


def test_over_seeds_skips_diverged_and_non_finite():
    table = pd.DataFrame({"plr": [1.0] * 4, "test_acc": [0.8, 0.6, 0.99, np.inf],
                          "diverged": [False, False, True, False]})
    stats = over_seeds(table, ["plr"], "test_acc").iloc[0]
    assert stats["mean"] == pytest.approx(0.7) and stats["n"] == 2
    assert stats["std"] == pytest.approx(np.std([0.8, 0.6], ddof=1))


def test_swa_k_of_choice_is_the_shared_rule():
    assert swa_k_of_choice is tables.swa_k_of_choice
    assert swa_k_of_choice([2, 5, 10]) == 5 and swa_k_of_choice([2, 10]) == 2 and swa_k_of_choice([]) is None


def test_report_swa_uses_the_k_of_the_geometry(tmp_path):
    root = make_experiment(tmp_path / "exp", ks=[2, 10])
    exp = load_experiment(root)
    (geometry_k,) = set(exp.geometry["swa_k"])
    assert geometry_k == swa_k_of_choice([2, 10]) == 2
    table = regime_table(exp)
    assert "SWA K=2" in table.columns and "SWA K=10" not in table.columns
    expected = over_seeds(exp.stage("swa")[exp.stage("swa")["swa_k"] == 2], ["plr"], "test_acc")
    assert list(table["SWA K=2"].str.split().str[0]) == [f"{m:.3f}" for m in expected["mean"]]
    swa_kinds = [kind for kind in model_kinds(exp.evaluations) if kind.stage == "swa"]
    assert [(kind.name, kind.swa_k) for kind in swa_kinds] == [("SWA, K=2", 2)]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["1", "2A", "2B", "3", None]), min_size=1, max_size=12))
def test_regime_runs_partition_the_labelled_grid(labels):
    plrs = list(np.logspace(-4, 0, len(labels)))
    regimes = Regimes(pd.DataFrame({"plr": plrs, "regime": labels}), {})
    runs = regimes.runs()
    expanded = [name for name, first, last in runs for p in plrs if first <= p <= last]
    assert expanded == [label for label in labels if label is not None]
    assert all(a[2] < b[1] for a, b in zip(runs, runs[1:]))  # ordered, disjoint
    for name, first, last in runs:  # maximal: the PLRs around a run carry another label
        inside = [label for p, label in zip(plrs, labels) if first <= p <= last]
        assert set(inside) == {name}
        i, j = plrs.index(first), plrs.index(last)
        assert (i == 0 or labels[i - 1] != name) and (j == len(plrs) - 1 or labels[j + 1] != name)


def test_summary_holds_the_blocks_of_registered_measurements_with_a_table(tmp_path):
    from lrfeatures.analysis.measurements import register_measurement, unregister_measurement
    from lrfeatures.analysis.summary import build_summary

    root = make_experiment(tmp_path / "exp")
    pd.DataFrame({"stage": "pretrain", "plr": PLRS, "value": np.arange(len(PLRS), dtype=float)}) \
        .to_parquet(root / "fake_measure.parquet", index=False)
    register_measurement("fake_measure", kinds=("synthetic",))(lambda ctx: None)
    register_measurement("fake_absent", kinds=("synthetic",))(lambda ctx: None)  # no table: no block
    register_measurement("fake_silent", kinds=("synthetic",), summarize=None)(lambda ctx: None)
    pd.DataFrame({"plr": PLRS}).to_parquet(root / "fake_silent.parquet", index=False)
    try:
        summary = build_summary(ExperimentStore(root))
    finally:
        for name in ("fake_measure", "fake_absent", "fake_silent"):
            unregister_measurement(name)
    block = summary["measurements"]
    assert "fake_absent" not in block and "fake_silent" not in block
    assert block["fake_measure"]["rows"] == len(PLRS)
    assert [row["value"] for row in block["fake_measure"]["per_plr"]] == list(range(len(PLRS)))
    assert summary["per_plr"][0]["pretrain"]["test_acc"]["n"] == len(SEEDS)


def test_summary_has_iterations_to_convergence_of_the_converging_runs(tmp_path):
    from lrfeatures.analysis.summary import build_summary

    root = make_experiment(tmp_path / "exp")
    summary = build_summary(ExperimentStore(root))
    blocks = {entry["plr"]: entry["convergence"] for entry in summary["per_plr"]}
    for plr, regime in zip(PLRS, REGIMES):
        block = blocks[plr]
        assert block["unit"] == "iterations" and block["n"] == len(SEEDS)
        if regime == "1":  # loss 1e-3 + 0.699 exp(-step/150) first falls below 1e-2 at the log of step 700
            assert block["n_converged"] == len(SEEDS)
            assert block["median"] == block["q25"] == block["q75"] == 700
        else:  # a bouncing or random-walk loss never converges: null, not a number
            assert block["n_converged"] == 0 and block["median"] is None
    assert set(summary["findings"]) == {"S1", "S2", "S3", "S4", "S5"}
    json.dumps(summary, allow_nan=False)


def test_features_without_the_margin_column_fall_back_to_the_accuracy_index(tmp_path):
    root = make_experiment(tmp_path / "exp")
    features = pd.read_parquet(root / "features.parquet").drop(columns="margin")
    features.to_parquet(root / "features.parquet", index=False)  # as lrfeatures 0.1 wrote it
    page = write_report(root).read_text()
    assert "sparsity after PT (accuracy)" in page
    check_png(root / "figures" / "sparsity.png")


# ---------------------------------------------------------------- reports that fit the experiment kind

IMAGE_STORE = Path(__file__).parent / "data" / "stores-0.1.0" / "images"
SYNTHETIC_ONLY = ("tick", "features", "sparsity")  # figures that need the synthetic data or feature probes
# Phrases of a caption that asserts a result instead of describing the plot (findings: the findings panel).
FINDING_WORDS = ("rely on", "relies on", "regime 2A models", "one basin", "SPEC §5:")


@pytest.fixture
def axis_labels(monkeypatch):
    """{figure key: [x label, y label] of every axes}, recorded as the report's own figures are saved."""
    labels: dict[str, list[tuple[str, str]]] = {}
    real_save = report.synthetic.save

    def recording_save(fig, path):
        labels[Path(path).stem] = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
        return real_save(fig, path)

    monkeypatch.setattr(report.synthetic, "save", recording_save)
    return labels


def not_drawn(page: str) -> list[str]:
    """Keys of the figures the page says it could not draw."""
    return re.findall(r"<b>([\w-]+)\.png</b> not drawn", page)


def own_captions(page: str) -> list[str]:
    """The captions of this module's figures (report/synthetic.py) on a page."""
    keys = {key for key, _, _ in FIGURES}
    return [c for k, c in re.findall(r"<b>([\w-]+)\.png</b>: (.*?)</figcaption>", page) if k in keys]


@pytest.mark.slow  # draws a whole report
def test_synthetic_report_fits_its_kind(tmp_path, axis_labels):
    root, _, page = page_of(tmp_path)
    assert not_drawn(page) == []
    assert [key for key, _, _ in figures_for(load_experiment(root))] == ALL_FIGURES
    curves = axis_labels["training_curves"]
    assert [x for x, _ in curves[:2]] == ["pre-training step", "pre-training step"]  # metrics count iterations
    assert "iterations to train loss" in axis_labels["convergence"][0][1]
    assert not any("epoch" in x or "epoch" in y for labels in axis_labels.values() for x, y in labels)
    assert "sparsity after PT (margin)" in page
    captions = own_captions(page)
    assert len(captions) == len(ALL_FIGURES)
    assert not [c for c in captions if any(w in c for w in FINDING_WORDS)]


@pytest.mark.slow  # draws a whole report
def test_image_report_lists_only_image_figures_and_columns(tmp_path, axis_labels):
    root = Path(shutil.copytree(IMAGE_STORE, tmp_path / "images"))
    page = write_report(root).read_text()
    drawn = {p.stem for p in (root / "figures").glob("*.png")}
    for key in SYNTHETIC_ONLY:  # no note, no figure, no caption of another kind's figure
        assert f"{key}.png" not in page and key not in drawn
    own = [key for key, _, _ in figures_for(load_experiment(root))]
    assert set(not_drawn(page)) <= set(own) and not set(own) & set(SYNTHETIC_ONLY)  # a note is news of this run
    assert {"test_acc_finetune", "swa_acc", "geometry", "training_curves", "band_keep"} <= drawn
    assert "sparsity after PT" not in page  # images have no feature probes: no always-empty column
    header = re.findall(r"<thead><tr>(.*?)</tr></thead>", page)[1]  # the regime table
    assert "sparsity" not in header and "test acc after PT" in header
    curves = axis_labels["training_curves"]
    assert [x for x, _ in curves[:2]] == ["pre-training epoch", "pre-training epoch"]  # metrics count epochs
    assert not any("step" in x or "step" in y for labels in axis_labels.values() for x, y in labels)
    assert not [c for c in own_captions(page) if any(w in c for w in FINDING_WORDS)]


def test_a_figure_set_is_drawn_only_for_its_kinds_when_available(tmp_path):
    exp = load_experiment(make_experiment(tmp_path / "exp"))
    drawn = []
    extra = FigureSet([("extra", lambda e, p: drawn.append(p), "an extra figure")], ("images",))
    gated = FigureSet([("gated", lambda e, p: drawn.append(p), "a gated figure")], None, lambda e: False)
    FIGURE_SETS.extend([extra, gated])
    try:
        keys = [key for key, _, _ in figures_for(exp)]
        assert "extra" not in keys and "gated" not in keys  # another kind's set; an unavailable set
        extra_synthetic = FigureSet(extra.figures, ("synthetic", "images"))
        FIGURE_SETS.append(extra_synthetic)
        assert [key for key, _, _ in figures_for(exp)][-1] == "extra"
    finally:
        for figure_set in (extra, gated, extra_synthetic):
            FIGURE_SETS.remove(figure_set)
