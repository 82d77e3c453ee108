"""The command line: one-line errors a user can fix, help, presets, an end-to-end run and resume."""

from __future__ import annotations

import gzip
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
    # issue 13: hostile or broken input is one line, exit 2, and nothing written
    ("out-is-a-file", ["synthetic", "--out", "{dir}/afile"], "is a file"),
    ("out-under-a-file", ["synthetic", "--out", "{dir}/afile/sub"], "afile"),
    ("out-in-proc", ["synthetic", "--out", "/proc/lrfeatures-out"], "system folder"),
    ("out-not-a-store", ["synthetic", "--out", "{dir}/userfiles"], "not an lrfeatures experiment"),
    ("name-traversal", ["synthetic", "--set", "name=../../x"], "plain name"),
    ("name-absolute", ["synthetic", "--set", "name=/tmp/x"], "plain name"),
    ("preset-binary", ["synthetic", "--preset", "{dir}/binary.toml"], "not a text file"),
    ("run-config-binary", ["run", "{dir}/binary.toml"], "not a text file"),
    ("seed-overflow", ["synthetic", "--set", "seeds.train=[100000000000000000000000]"], "seeds.train"),
    ("depth-huge", ["synthetic", "--set", "model.depth=100000"], "engine.memory_budget_gb"),
    ("width-huge", ["synthetic", "--set", "model.width=1000000000"], "engine.memory_budget_gb"),
    ("one-class-folder", ["images", "--dataset", "folder:{dir}/oneclass"], "oneclass"),
    ("image-folder-typo", ["images", "--dataset", "folder:{dir}/no-such-folder"], "no-such-folder"),
    ("not-a-tar", ["images", "--dataset", "folder:{dir}/junk.tar.gz"], "junk.tar.gz"),
    ("gzip-bomb", ["images", "--dataset", "folder:{dir}/bomb.tar.gz"], "unpacks to more than"),
    # issue 18: exporting something that is not a store
    ("export-not-experiment", ["export", "{dir}/empty", "--to", "tensorboard"], "not an lrfeatures experiment"),
]


def fill(args: list[str], directory: Path) -> list[str]:
    return [a.replace("{dir}", str(directory)) for a in args]


@pytest.fixture
def workdir(tmp_path, monkeypatch, colour_folder):
    """A scratch cwd (so a default --out never lands in the repo), with the files the cases name."""
    (tmp_path / "typo.toml").write_text(TYPO_TOML)
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "userfiles").mkdir()
    (tmp_path / "userfiles" / "summary.json").write_text('{"mine": true}')
    (tmp_path / "binary.toml").write_bytes(bytes(range(256)) * 4)
    colour_folder(tmp_path / "oneclass", ["only"], seed=0, n_per_class=6, size=8)
    (tmp_path / "junk.tar.gz").write_bytes(bytes(range(7, 250)) * 64)
    (tmp_path / "bomb.tar.gz").write_bytes(gzip.compress(bytes(4 << 20)))  # 4 MiB of zeros in 4 KiB
    monkeypatch.setenv("LRFEATURES_MAX_UNPACKED_GB", "0.001")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def with_out(args: list[str], out: Path) -> list[str]:
    if args[0] not in ("synthetic", "images", "run"):
        return args
    return args + ([] if "--out" in args else ["--out", str(out)]) + ["--quiet", "--no-report"]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (with its content) and folder under a folder: to show that nothing was written."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def check_one_line_error(stderr: str, word: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("lrfeatures: error:"), stderr
    assert "Traceback" not in stderr
    assert word in lines[0]


@pytest.mark.parametrize("case, args, word", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_error(case, args, word, workdir, capsys):
    before = tree(workdir)
    code = main(with_out(fill(args, workdir), workdir / "out"))
    captured = capsys.readouterr()
    assert code == 2
    check_one_line_error(captured.err, word)
    assert tree(workdir) == before


def test_unwritable_out_is_one_line_error(workdir, capsys, monkeypatch):
    """An --out the user may not write (simulated: the tests may run as root, which may write anywhere)."""
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(["synthetic", "--out", str(workdir / "locked" / "out"), "--quiet", "--no-report"]) == 2
    check_one_line_error(capsys.readouterr().err, "writable")
    assert not (workdir / "locked").exists()


def test_every_shipped_preset_fits_its_memory_budget():
    from lrfeatures.config import preset_names
    from lrfeatures.experiments import recipe_for
    from lrfeatures.experiments.runtime import check_memory

    for name in preset_names():
        cfg = load_config(name)
        check_memory(cfg, recipe_for(cfg.kind).memory_estimate(cfg))


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


@pytest.mark.parametrize("command", ["synthetic", "images", "run"])
def test_every_experiment_command_takes_repeatable_log_flags(command, capsys):
    from lrfeatures.cli import build_parser

    rest = ["CONFIG.toml"] if command == "run" else []
    args = build_parser().parse_args([command, *rest, "--log", "tensorboard", "--log", "wandb", "--log-per-model"])
    assert args.log == ["tensorboard", "wandb"] and args.log_per_model
    assert build_parser().parse_args([command, *rest]).log == []  # off by default
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, *rest, "--log", "neptune"])
    assert exit_info.value.code == 2 and "invalid choice: 'neptune'" in capsys.readouterr().err


def test_export_help_names_the_three_loggers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--to" in out and all(name in out for name in ("tensorboard", "mlflow", "wandb"))


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


def test_a_huge_plr_is_a_result_and_the_report_still_renders(workdir, tiny_overrides, capsys):
    """PLR 1e300 diverges (a result to record); the figures clip their axis, the tables keep the value."""
    out = workdir / "huge"
    sets = [arg for o in tiny_overrides + ["pretrain.lrs=[0.001, 0.01, 1e300]"] for arg in ("--set", o)]
    assert main(["synthetic", "--out", str(out), "--quiet", *sets]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()
    evaluations = pd.read_parquet(out / "evaluations.parquet")
    assert evaluations.loc[evaluations["plr"] == 1e300, "diverged"].all()
