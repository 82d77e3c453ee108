"""Command line: a thin layer that parses, loads configs and calls the experiment and report.

    lrfeatures synthetic [--preset quick|paper|FILE] [--out DIR] [--set a.b=v ...]
    lrfeatures images [--dataset NAME|folder:PATH|tinyimagenet:PATH] [--model NAME]
                      [--preset cpu-small|paper|FILE] [--out DIR] [--set a.b=v ...]
    lrfeatures run CONFIG.toml [--out DIR] [--set a.b=v ...]       (any registered experiment kind)
    ... [--log tensorboard|mlflow|wandb ...] [--log-per-model]      (live logging, on the three above)
    lrfeatures fourier DIR [--normalization train|none|train_background_only|train_additive]
                           [--device DEV]
    lrfeatures report DIR
    lrfeatures export DIR --to tensorboard|mlflow|wandb             (log a finished store; repeatable --to)
    lrfeatures verify DIR                                           (exit 1 if any shard is damaged)
    lrfeatures presets
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, LrfError

PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")
LOGGER_NAMES = ["tensorboard", "mlflow", "wandb"]  # tracking.LOGGERS (kept here: --help must not import it)

EPILOG = """examples:
  lrfeatures synthetic                              # quick preset -> runs/synthetic-quick
  lrfeatures synthetic --preset paper --out runs/paper
  lrfeatures synthetic --set pretrain.iterations=5000 --set seeds.train=[0,1]
  lrfeatures synthetic --engine reference           # the simple per-model loop (slow)
  lrfeatures report runs/synthetic-quick            # redraw figures without retraining
  lrfeatures synthetic --log tensorboard            # live curves: tensorboard --logdir runs/synthetic-quick
  lrfeatures export runs/synthetic-quick --to mlflow    # a finished store into DIR/mlruns
  lrfeatures images --dataset folder:cifar10-jpeg.tar.gz --model convnet-si --preset cpu-small
  lrfeatures images --dataset cifar10 --model resnet18-si --preset paper --device cuda
  lrfeatures images --dataset cifar10 --model vit --preset paper --device cuda   # vit-small-paper
  lrfeatures fourier runs/images-cpu-small          # test accuracy per frequency band of every model
Re-running a command with the same --out resumes it: finished shards are kept."""


def preset_source(kind: str, preset: str) -> str:
    """A preset short name ('quick') resolved to its full name ('synthetic-quick'), or a path."""
    from .config import preset_names

    if preset.endswith(".toml") or Path(preset).exists():
        return text_file(preset, "--preset")
    full = f"{kind}-{preset}"
    return full if full in preset_names() else preset


def text_file(path: str, flag: str) -> str:
    """`path`, unless it is a file that is not UTF-8 text (a binary file given as a TOML config)."""
    try:
        if Path(path).is_file():
            Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path} is not a text file; give a TOML config or a preset name") from None
    except OSError as err:
        raise ConfigError(f"{flag} {path} cannot be read ({err.strerror}); check the path") from None
    return path


def out_dir(args: argparse.Namespace, cfg) -> Path:
    """--out, or runs/<name> where the config's name must be a plain name (never a path)."""
    if not PLAIN_NAME.fullmatch(cfg.name) or set(cfg.name) == {"."}:
        raise ConfigError(f"name={cfg.name!r} must be a plain name (letters, digits, '-', '_', '.'; no '/' or "
                          "'..'); use --out DIR to choose the folder")
    return Path(args.out or Path("runs") / cfg.name)


def add_executor_flags(parser: argparse.ArgumentParser) -> None:
    """--executor, the Ray options and --allow-version-change of an experiment command."""
    parser.add_argument("--allow-version-change", action="store_true",
                        help="resume a store written by another lrfeatures version (recorded in DIR/versions.json)")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="run shards in this process (default) or as Ray tasks")
    parser.add_argument("--ray-address", help="Ray cluster to join, e.g. auto or HOST:6379 "
                        "(default: $RAY_ADDRESS, else a local Ray instance)")
    parser.add_argument("--workers", type=int, help="local executor: processes that share the shards "
                        "(default: 1; e.g. 2 for a 1-thread preset on a 2-core machine)")
    parser.add_argument("--cpus-per-shard", type=float, help="CPUs Ray reserves per shard (default: 1)")
    parser.add_argument("--gpus-per-shard", type=float,
                        help="GPUs Ray reserves per shard (default: 1 if the device is cuda, else 0)")


def add_log_flags(parser: argparse.ArgumentParser) -> None:
    """--log and --log-per-model of an experiment command."""
    parser.add_argument("--log", action="append", default=[], choices=LOGGER_NAMES, metavar="LOGGER",
                        help="also log every shard's metrics as it commits to tensorboard (DIR/tensorboard), "
                        "mlflow (DIR/mlruns, or $MLFLOW_TRACKING_URI) or wandb (offline in DIR/wandb unless "
                        "$WANDB_MODE says otherwise); repeatable; each needs its extra, e.g. "
                        "pip install 'lrfeatures[tensorboard]'")
    parser.add_argument("--log-per-model", action="store_true",
                        help="log one curve per model instead of the per-PLR mean and spread over seeds")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (model and data set choices come from the registries)."""
    from .data.registry import image_dataset_names
    from .models import model_names

    parser = argparse.ArgumentParser(prog="lrfeatures", description=__doc__.split("\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lrfeatures {__version__}")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first, so the models, data sets, measurements or experiment kinds it "
                        "registers can be used (repeatable; also $LRFEATURES_PLUGINS, comma-separated, and the "
                        "'lrfeatures.plugins' entry points of installed packages)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    syn = sub.add_parser("synthetic", help="pretrain -> finetune -> SWA -> features on the tick data",
                         description="Run the synthetic experiment (SPEC §3) and write its report.")
    syn.add_argument("--preset", default="quick", help="quick | paper | a TOML file (default: quick)")
    syn.add_argument("--out", help="experiment directory (default: runs/<preset name>)")
    syn.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                     help="override any config field, e.g. pretrain.iterations=5000 (repeatable)")
    syn.add_argument("--engine", choices=["grid", "reference"], help="override engine.name")
    syn.add_argument("--device", help="override engine.device (cpu, cuda, cuda:1)")
    syn.add_argument("--no-report", action="store_true", help="skip figures and report.html")
    syn.add_argument("--quiet", action="store_true", help="no progress bar")
    add_executor_flags(syn)
    add_log_flags(syn)

    img = sub.add_parser("images", help="pretrain -> finetune -> SWA -> geometry on CIFAR or an image folder",
                         description="Run the image experiment (SPEC §4, §6) and write its report.")
    img.add_argument("--dataset", help=f"{' | '.join(image_dataset_names())} (default: the preset's)")
    img.add_argument("--model", choices=model_names("image"),
                     help="default: the preset's (models without an SI group: the practical setting, SPEC §4)")
    img.add_argument("--preset", default="cpu-small", help="cpu-small | paper | a full preset name such as "
                     "practical-resnet18-cpu-small or vit-small-paper | a TOML file (default: cpu-small)")
    img.add_argument("--out", help="experiment directory (default: runs/<preset name>)")
    img.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                     help="override any config field, e.g. pretrain.epochs=20 (repeatable)")
    img.add_argument("--device", help="override engine.device (cpu, cuda, cuda:1)")
    img.add_argument("--data-root", help="folder holding the CIFAR archive (or base of a relative folder:PATH)")
    img.add_argument("--no-report", action="store_true", help="skip figures and report.html")
    img.add_argument("--quiet", action="store_true", help="no progress bar")
    add_executor_flags(img)
    add_log_flags(img)

    fou = sub.add_parser("fourier", help="test accuracy per Fourier band of every model of an image experiment",
                         description="Keep-band and remove-band test accuracy (SPEC §5) of every model of an "
                         "image experiment: writes DIR/bands.parquet, a bands block in summary.json, "
                         "and redraws the report.")
    fou.add_argument("dir", help="directory of an image experiment")
    fou.add_argument("--normalization",
                     choices=["train", "none", "train_background_only", "train_additive"],
                     help="normalization of band images (default: train_additive): train = the training mean/std, "
                     "as in training; none = raw filtered values; train_background_only = normalize only "
                     "images that contain the background (DC) term; train_additive = as train for images "
                     "with the DC term, divide by std only for the others (normalized bands add up)")
    fou.add_argument("--device", help="device for the models (default: the experiment's engine.device)")
    fou.add_argument("--no-report", action="store_true", help="skip figures and report.html")
    fou.add_argument("--quiet", action="store_true", help="no progress lines")

    run = sub.add_parser("run", help="run an experiment of any registered kind from a config file",
                         description="Run the experiment a config (preset name or TOML file) describes; its "
                         "`kind` field picks the recipe.")
    run.add_argument("config", help="a preset name or a TOML file with a `kind` field")
    run.add_argument("--out", help="experiment directory (default: runs/<config name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                     help="override any config field (repeatable)")
    run.add_argument("--no-report", action="store_true", help="skip figures and report.html")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    add_executor_flags(run)
    add_log_flags(run)

    rep = sub.add_parser("report", help="redraw figures and report.html of an experiment from its store")
    rep.add_argument("dir", help="experiment directory")

    exp = sub.add_parser("export", help="log a finished experiment to TensorBoard, MLflow or W&B",
                         description="Log every committed shard of a store, its summary.json and report.html, "
                         "as `--log` does live: TensorBoard event files in DIR/tensorboard, an MLflow file "
                         "store in DIR/mlruns (or $MLFLOW_TRACKING_URI), offline W&B runs in DIR/wandb.")
    exp.add_argument("dir", help="experiment directory")
    exp.add_argument("--to", action="append", required=True, choices=LOGGER_NAMES, metavar="LOGGER",
                     help="tensorboard | mlflow | wandb (repeatable)")
    exp.add_argument("--per-model", action="store_true",
                     help="one curve per model instead of the per-PLR mean and spread over seeds")

    ver = sub.add_parser("verify", help="check every shard of a store against its done.json (exit 1 if any is bad)",
                         description="Check every shard's files against the sizes and hashes in its done.json, "
                         "and that every planned shard exists; one row per bad shard.")
    ver.add_argument("dir", help="experiment directory")

    sub.add_parser("presets", help="list the shipped presets")
    return parser


def run_synthetic(args: argparse.Namespace) -> int:
    """`lrfeatures synthetic`."""
    from .experiments import load_experiment_config

    overrides = list(args.overrides)
    if args.engine:
        overrides.append(f"engine.name={args.engine}")
    if args.device:
        overrides.append(f"engine.device={args.device}")
    cfg = load_experiment_config(preset_source("synthetic", args.preset), overrides, kind="synthetic")
    return run_and_report(args, cfg)


def run_images(args: argparse.Namespace) -> int:
    """`lrfeatures images`."""
    from .experiments.images import image_config

    cfg = image_config(args.preset, args.overrides, dataset=args.dataset, model=args.model,
                       device=args.device, data_root=args.data_root)
    return run_and_report(args, cfg)


def run_config(args: argparse.Namespace) -> int:
    """`lrfeatures run`: any registered experiment kind, chosen by the config's `kind` field."""
    from .experiments import load_experiment_config

    return run_and_report(args, load_experiment_config(text_file(args.config, "config"), args.overrides))


def run_and_report(args: argparse.Namespace, cfg) -> int:
    """Run every pending shard, then write the report (a figure problem never hides saved results)."""
    from .experiments.runtime import tracking_session

    out = out_dir(args, cfg)
    # The report is written inside the session, so the loggers can attach it.
    with tracking_session(cfg, out, args.log, args.log_per_model):
        run_on_executor(args, cfg, out)
        print(f"results: {out}")
        if not args.no_report:
            try:
                print(f"report: {write_report_checked(out, cfg.kind)}")
            except LrfError:
                raise
            except Exception as err:  # noqa: BLE001  (the results are saved; a figure problem must not hide them)
                print(f"lrfeatures: warning: report not written ({type(err).__name__}: {err}); "
                      f"try `lrfeatures report {out}` later", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    """`lrfeatures export DIR --to NAME`: a finished store to the loggers."""
    from .experiments.runtime import export_experiment

    export_experiment(args.dir, args.to, args.per_model)
    print(f"exported {args.dir} to {', '.join(dict.fromkeys(args.to))}")
    return 0


def run_fourier(args: argparse.Namespace) -> int:
    """`lrfeatures fourier`."""
    from .analysis.bands import BandsConfig, band_means
    from .experiments.bands import print_progress, run_bands

    bands_cfg = BandsConfig(device=args.device or "")
    bands_cfg.normalization = args.normalization or bands_cfg.normalization
    table = run_bands(args.dir, bands_cfg, None if args.quiet else print_progress)
    means = band_means(table, "pretrain", "keep", bands_cfg.normalization)
    print(f"keep-band test accuracy after pre-training (normalization={bands_cfg.normalization}, "
          "mean over seeds):")
    print(means.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"results: {Path(args.dir) / 'bands.parquet'}")
    if not args.no_report:
        print(f"report: {write_report_checked(Path(args.dir))}")
    return 0


def run_on_executor(args: argparse.Namespace, cfg, out: Path) -> dict:
    """Run every pending shard of the experiment on the chosen executor (local: experiment.run())."""
    from .experiments.executor import ExperimentFactory, make_executor, run_experiment

    executor = make_executor(args.executor, cfg, args.ray_address, args.cpus_per_shard, args.gpus_per_shard,
                             args.workers)
    return run_experiment(ExperimentFactory(cfg, out, args.allow_version_change), executor, quiet=args.quiet)


def run_verify(args: argparse.Namespace) -> int:
    """`lrfeatures verify`: one row per bad shard and exit 1, or one line and exit 0."""
    from .experiments import plan_shards
    from .store import ExperimentStore, verify_store

    cfg = ExperimentStore(args.dir).config()
    bad = verify_store(args.dir, [s.name for s in plan_shards(cfg)])
    for shard, reason in bad:
        print(f"{shard}\t{reason}")
    if bad:
        print(f"{len(bad)} bad shards in {args.dir}; re-run its experiment command (same --out) to recompute them",
              file=sys.stderr)
        return 1
    print(f"{args.dir}: every shard is intact")
    return 0


def write_report_checked(out: Path, kind: str | None = None) -> Path:
    """Write figures and report.html (the experiment kind's own report)."""
    from .experiments import recipe_for
    from .store import ExperimentStore

    return recipe_for(kind or ExperimentStore(out).config().kind).report(Path(out))


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors a user can fix are one line on stderr and exit code 2."""
    # Plugins first: the models and data sets they register are choices of the full parser.
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--plugin", action="append", default=[])
    try:
        from .plugins import load_plugins

        load_plugins(early.parse_known_args(argv)[0].plugin)
    except LrfError as err:
        print(f"lrfeatures: error: {err}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "log", None) or getattr(args, "to", None):
            from .tracking import check_loggers
            check_loggers(args.log if args.command != "export" else args.to)  # before anything is written
        if args.command == "export":
            return run_export(args)
        if args.command == "synthetic":
            return run_synthetic(args)
        if args.command == "images":
            return run_images(args)
        if args.command == "run":
            return run_config(args)
        if args.command == "fourier":
            return run_fourier(args)
        if args.command == "report":
            from .store import ExperimentStore
            ExperimentStore(args.dir).config()  # a clear error if DIR is not an experiment
            print(f"report: {write_report_checked(Path(args.dir))}")
            return 0
        if args.command == "verify":
            return run_verify(args)
        if args.command == "presets":
            from .config import preset_names
            print("\n".join(preset_names()))
            return 0
    except LrfError as err:
        print(f"lrfeatures: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lrfeatures: interrupted; finished shards are saved, re-run the same command to resume",
              file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
