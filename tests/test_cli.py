"""The command line: one-line errors a user can fix, help, presets, an end-to-end run and resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import lrfeatures
from lrfeatures.cli import main
from lrfeatures.config import load_config
from lrfeatures.experiments.synthetic import SyntheticRunner

pytestmark = pytest.mark.usefixtures("torch_one_thread")
TABLES = ("metrics", "evaluations", "features", "geometry")  # the synthetic recipe's merged tables

TYPO_TOML = """kind = "synthetic"
name = "typo"
[pretrain]
iteratons = 5
"""

# (id, arguments after `lrfeatures`, a word the message must name)
BAD_INPUTS = [
    ("lr-zero", ["synthetic", "--set", "pretrain.lrs=[0.0]"], "pretrain.lrs"),
    ("lr-negative", ["synthetic", "--set", "pretrain.lrs=[0.01, -0.1]"], "pretrain.lrs"),
    ("flr-zero", ["synthetic", "--set", "finetune.lrs=[0.0]"], "finetune.lrs"),
    ("lr-nan", ["synthetic", "--set", "pretrain.lrs=[nan]"], "pretrain.lrs"),
    ("lr-empty", ["synthetic", "--set", "pretrain.lrs=[]"], "pretrain.lrs"),
    ("unknown-preset", ["synthetic", "--preset", "no-such-preset"], "preset"),
    ("unknown-shape", ["synthetic", "--set", "data.shape=blob"], "blob"),
    ("unknown-model", ["synthetic", "--set", "model.name=foo"], "foo"),
    ("field-typo", ["synthetic", "--set", "pretrain.iteration=5"], "pretrain.iteration"),
    ("unknown-section", ["synthetic", "--set", "optimizer.lr=5"], "optimizer"),
    ("wrong-type", ["synthetic", "--set", "pretrain.iterations=abc"], "pretrain.iterations"),
    ("toml-typo", ["synthetic", "--preset", "{dir}/typo.toml"], "iteratons"),
    ("report-not-experiment", ["report", "{dir}/empty"], "not an lrfeatures experiment"),
]


def fill(args: list[str], directory: Path) -> list[str]:
    return [a.replace("{dir}", str(directory)) for a in args]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch cwd (so a default --out never lands in the repo), with the files the cases name."""
    (tmp_path / "typo.toml").write_text(TYPO_TOML)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def with_out(args: list[str], out: Path) -> list[str]:
    return args + ["--out", str(out), "--quiet", "--no-report"] if args[0] == "synthetic" else args


def check_one_line_error(stderr: str, word: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("lrfeatures: error:"), stderr
    assert "Traceback" not in stderr
    assert word in lines[0]


@pytest.mark.parametrize("case, args, word", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_error(case, args, word, workdir, capsys):
    code = main(with_out(fill(args, workdir), workdir / "out"))
    captured = capsys.readouterr()
    assert code == 2
    check_one_line_error(captured.err, word)


@pytest.mark.parametrize("case", ["lr-zero", "unknown-shape"])
def test_bad_input_via_subprocess(case, workdir):
    args, word = next((a, w) for c, a, w in BAD_INPUTS if c == case)
    proc = subprocess.run([sys.executable, "-m", "lrfeatures", *with_out(fill(args, workdir), workdir / "out")],
                          capture_output=True, text=True, cwd=workdir, timeout=120)
    assert proc.returncode == 2
    check_one_line_error(proc.stderr, word)


@pytest.mark.parametrize("setting", ["pretrain.lrs=[0.0]", "data.shape=blob", "model.name=foo",
                                     "model.activation=gelu"])
def test_rejected_config_leaves_no_experiment(setting, workdir, tiny_overrides):
    """A config that cannot run must not claim --out: fixing the typo and re-running must work."""
    out = workdir / "out"
    sets = [arg for o in tiny_overrides for arg in ("--set", o)]
    assert main(["synthetic", "--out", str(out), "--quiet", "--no-report", *sets, "--set", setting]) == 2
    assert not (out / "config.toml").exists()


def test_fixing_a_bad_shape_then_rerunning_works(workdir, tiny_overrides, capsys):
    out = workdir / "out"
    sets = [arg for o in tiny_overrides for arg in ("--set", o)]
    assert main(["synthetic", "--out", str(out), "--quiet", "--no-report", *sets, "--set", "data.shape=blob"]) == 2
    capsys.readouterr()
    code = main(["synthetic", "--out", str(out), "--quiet", "--no-report", *sets, "--set", "data.shape=tick"])
    assert code == 0, capsys.readouterr().err
    assert (out / "summary.json").is_file()


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "report" in out and "presets" in out
    assert "--preset" in out and "--set" in out


def test_synthetic_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["synthetic", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--preset", "--set", "--out", "--engine", "--no-report", "--quiet"):
        assert option in out


def test_help_via_subprocess():
    proc = subprocess.run([sys.executable, "-m", "lrfeatures", "synthetic", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--preset" in proc.stdout and "--set" in proc.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert lrfeatures.__version__ in capsys.readouterr().out


def test_presets_lists_shipped_presets(capsys):
    assert main(["presets"]) == 0
    names = capsys.readouterr().out.split()
    assert "synthetic-quick" in names and "synthetic-paper" in names
    for name in names:
        if name.startswith("synthetic-"):
            assert load_config(name).kind == "synthetic"  # every synthetic preset loads and validates


def test_tiny_overrides_reproduce_the_tiny_config(tiny_overrides, tiny_config):
    """Precondition of the end-to-end test: --set on the quick preset gives exactly tiny_config."""
    assert load_config("synthetic-quick", tiny_overrides) == tiny_config


def test_end_to_end_run_and_resume(workdir, tiny_overrides, tiny_run, monkeypatch, capsys):
    out = workdir / "exp"
    args = ["synthetic", "--preset", "quick", "--out", str(out), "--no-report", "--quiet"]
    args += [arg for o in tiny_overrides for arg in ("--set", o)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress bar, no warnings
    assert str(out) in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["name"] == "tiny" and len(summary["per_plr"]) == 3
    tables = {name: pd.read_parquet(out / f"{name}.parquet") for name in TABLES}
    for name in TABLES:  # the CLI run equals the API run of the same config
        pd.testing.assert_frame_equal(tables[name], pd.read_parquet(tiny_run / f"{name}.parquet"))
    done = {p.name: (p / "done.json").read_text() for p in (out / "shards").iterdir()}

    # Re-running the same command resumes: nothing is trained or measured again.
    def recomputed(*_args, **_kwargs):
        raise AssertionError("a finished shard was recomputed")

    for method in ("run_pretrain", "run_finetune", "run_swa", "run_analyze"):
        monkeypatch.setattr(SyntheticRunner, method, recomputed)
    assert main(args) == 0, capsys.readouterr().err
    assert {p.name: (p / "done.json").read_text() for p in (out / "shards").iterdir()} == done
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{name}.parquet"), tables[name])


def test_rerun_with_different_settings_into_same_out_is_refused(workdir, tiny_overrides, tiny_run, capsys):
    out = workdir / "exp"
    sets = [arg for o in tiny_overrides for arg in ("--set", o)]
    # Seed the directory with the finished tiny run's config only (no training needed).
    out.mkdir()
    (out / "config.toml").write_text((tiny_run / "config.toml").read_text())
    code = main(["synthetic", "--out", str(out), "--quiet", "--no-report", *sets, "--set", "pretrain.iterations=400"])
    assert code == 2
    check_one_line_error(capsys.readouterr().err, "different config")
