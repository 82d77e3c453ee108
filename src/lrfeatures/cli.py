"""Command line: a thin layer that parses, loads configs and calls the experiment and report.

    lrfeatures synthetic [--preset quick|paper|FILE] [--out DIR] [--set a.b=v ...]
    lrfeatures report DIR
    lrfeatures presets
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import LrfError

EPILOG = """examples:
  lrfeatures synthetic                              # quick preset -> runs/synthetic-quick
  lrfeatures synthetic --preset paper --out runs/paper
  lrfeatures synthetic --set pretrain.iterations=5000 --set seeds.train=[0,1]
  lrfeatures synthetic --engine reference           # the simple per-model loop (slow)
  lrfeatures report runs/synthetic-quick            # redraw figures without retraining
Re-running a command with the same --out resumes it: finished shards are kept."""


def preset_source(kind: str, preset: str) -> str:
    """A preset short name ('quick') resolved to its full name ('synthetic-quick'), or a path."""
    from .config import preset_names

    if preset.endswith(".toml") or Path(preset).exists():
        return preset
    full = f"{kind}-{preset}"
    return full if full in preset_names() else preset


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="lrfeatures", description=__doc__.split("\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lrfeatures {__version__}")
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

    rep = sub.add_parser("report", help="redraw figures and report.html of an experiment from its store")
    rep.add_argument("dir", help="experiment directory")

    sub.add_parser("presets", help="list the shipped presets")
    return parser


def run_synthetic(args: argparse.Namespace) -> int:
    """`lrfeatures synthetic`."""
    from .config import load_config
    from .experiment import SyntheticExperiment, pending_cost

    overrides = list(args.overrides)
    if args.engine:
        overrides.append(f"engine.name={args.engine}")
    if args.device:
        overrides.append(f"engine.device={args.device}")
    cfg = load_config(preset_source("synthetic", args.preset), overrides, kind="synthetic")
    out = Path(args.out or Path("runs") / cfg.name)
    with progress_bar(0, args.quiet) as bar:
        experiment = SyntheticExperiment(cfg, out, progress=bar.update)
        bar.total = pending_cost(cfg, experiment.store)
        bar.refresh()
        experiment.run()
    print(f"results: {out}")
    if not args.no_report:
        print(f"report: {write_report_checked(out)}")
    return 0


def write_report_checked(out: Path) -> Path:
    """Write figures and report.html."""
    from .report import write_report

    return write_report(out)


def progress_bar(total: int, quiet: bool):
    """A tqdm bar counting model-steps."""
    from tqdm import tqdm

    return tqdm(total=total, unit="model-step", unit_scale=True, disable=quiet, dynamic_ncols=True,
                desc="training")


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors a user can fix are one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "synthetic":
            return run_synthetic(args)
        if args.command == "report":
            from .store import ExperimentStore
            ExperimentStore(args.dir).config()  # a clear error if DIR is not an experiment
            print(f"report: {write_report_checked(Path(args.dir))}")
            return 0
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
