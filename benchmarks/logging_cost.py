"""The wall-time cost of live logging (`--log`) on a quick synthetic run, measured in one run.

Runs the quick synthetic experiment as `lrfeatures synthetic` does (no report, so the logging
share is not diluted by the figures), each run a fresh process into a new store, alternately
without and with the loggers: off, on, off, on, ... so that a busy machine slows both alike.
Each run counts everything logging adds: importing the loggers' packages, the background thread
reading each shard's tables and writing, and the final summary at the end. Reported:

    off_s / on_s        median wall time of the runs without / with the loggers
    logging_fraction    (on_s - off_s) / off_s (target <= 0.05; noisy on a shared machine)
    cpu_fraction        median over the "on" runs of the CPU seconds spent logging (the tracking
                        thread, plus the final flush on the main thread) / the run's CPU seconds
                        without them: the cost in work, which other processes on the machine do not blur

    python benchmarks/logging_cost.py                                # tensorboard, mlflow, wandb at once
    python benchmarks/logging_cost.py --loggers tensorboard --repeats 3
    python benchmarks/logging_cost.py --set pretrain.iterations=2000 # a shorter run (a harder target)

Last line: logging_fraction=<x> cpu_fraction=<y> off_s=<s> on_s=<s> logging_cpu_s=<s> loggers=<names> repeats=<n>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(out: str, preset: str, overrides: list[str], loggers: list[str]) -> None:
    """One run in this process, as the CLI runs it; prints {wall_s, cpu_s, logging_cpu_s} as JSON."""
    from lrfeatures.cli import preset_source
    from lrfeatures.experiments import load_experiment_config
    from lrfeatures.experiments.executor import ExperimentFactory, LocalExecutor
    from lrfeatures.experiments.runtime import tracking_session
    from lrfeatures.tracking import session

    spent = [0.0]  # CPU seconds of the tracking thread and of the tracker's final flush

    def timed(method):
        def wrapper(self, *args, **kwargs):
            started = time.thread_time()
            try:
                return method(self, *args, **kwargs)
            finally:
                spent[0] += time.thread_time() - started
        return wrapper

    session.Tracker.loop = timed(session.Tracker.loop)
    session.Tracker.close = timed(session.Tracker.close)
    started, cpu = time.perf_counter(), time.process_time()
    cfg = load_experiment_config(preset_source("synthetic", preset), overrides, kind="synthetic")
    with tracking_session(cfg, out, loggers):
        LocalExecutor().run(ExperimentFactory(cfg, out), quiet=True)
    print(json.dumps({"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
                      "logging_cpu_s": spent[0]}))


def run_once(out: Path, preset: str, overrides: list[str], loggers: list[str]) -> dict:
    """{wall_s, cpu_s, logging_cpu_s} of one run in a fresh process (wall_s: the whole process)."""
    command = [sys.executable, __file__, "--child", str(out), "--preset", preset, "--loggers", ",".join(loggers)] \
        + [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    started = time.perf_counter()
    result = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loggers", default="tensorboard,mlflow,wandb", help="comma-separated (default: all three)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind, interleaved (default: 2)")
    parser.add_argument("--preset", default="quick", help="synthetic preset (default: quick)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--child", metavar="OUT", help=argparse.SUPPRESS)  # one measured run (internal)
    args = parser.parse_args()
    loggers = [n for n in args.loggers.split(",") if n]
    if args.child:
        return child(args.child, args.preset, args.overrides, loggers)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="logging-cost-") as tmp:
        for i in range(args.repeats):
            for mode in ("off", "on"):
                run = run_once(Path(tmp) / f"{mode}-{i}", args.preset, args.overrides, loggers if mode == "on" else [])
                runs[mode].append(run)
                print(f"run {i} logging {mode}: wall {run['wall_s']:.1f} s, cpu {run['cpu_s']:.1f} s, "
                      f"logging cpu {run['logging_cpu_s']:.2f} s", flush=True)
    off, on = (statistics.median(r["wall_s"] for r in runs[m]) for m in ("off", "on"))
    logging_cpu = statistics.median(r["logging_cpu_s"] for r in runs["on"])
    cpu_fraction = statistics.median(r["logging_cpu_s"] / (r["cpu_s"] - r["logging_cpu_s"]) for r in runs["on"])
    print(f"logging_fraction={(on - off) / off:.4f} cpu_fraction={cpu_fraction:.4f} off_s={off:.2f} on_s={on:.2f} "
          f"logging_cpu_s={logging_cpu:.2f} loggers={','.join(loggers)} repeats={args.repeats} preset={args.preset}")


if __name__ == "__main__":
    main()
