"""The cost of the store's integrity: hashing every file at commit, verifying every shard it reads.

Runs the synthetic-paper grid scaled down in time only: one data seed, `--scale` of its iterations
(checkpoints still every 1/50 of pre-training, so each shard holds as many bytes as in the
paper). The store is therefore full-size per data seed while the run is `--scale` times
shorter, which overstates the fraction (a conservative measurement). Reported:

    run_s                 wall time of the run (write, with commit hashing and read verification)
    hash_s                time spent hashing inside that run (commit + verification of shards read)
    verify_s              `lrfeatures verify` of the finished store from a cold cache (also what a resume pays)
    verify_fraction       hash_s / run_s: the integrity share of the measured run (target <= 0.05)
    paper_fraction        verify_s / (run_s / scale): the estimate for the full-length grid

    python benchmarks/store_integrity.py                 # scale 0.05, one data seed
    python benchmarks/store_integrity.py --scale 1       # the full grid of one data seed (minutes)
    python benchmarks/store_integrity.py --seeds 2       # a fifth of the models (bytes and time both scale)

Last line: verify_fraction=<x> paper_fraction=<y> run_s=... hash_s=... verify_s=... store_mb=... sha256_mb_s=...
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import torch

import lrfeatures.store as store_module
from lrfeatures.experiments import Experiment, load_experiment_config
from lrfeatures.store import verify_store


def hash_rate(name: str, megabytes: int = 64) -> float:
    """MB/s of one hashlib algorithm on random bytes."""
    data = os.urandom(megabytes << 20)
    started = time.perf_counter()
    hashlib.new(name, data).hexdigest()
    return megabytes / (time.perf_counter() - started)


def scaled_overrides(scale: float) -> list[str]:
    """synthetic-paper with one data seed and `scale` of its iterations (50 checkpoints kept, as in the paper)."""
    pretrain, finetune = max(50, int(40000 * scale) // 50 * 50), max(10, int(20000 * scale))
    return ["seeds.data=[0]", f"pretrain.iterations={pretrain}", f"pretrain.ckpt_every={pretrain // 50}",
            f"pretrain.log_every={pretrain // 50}", f"finetune.iterations={finetune}",
            f"finetune.log_every={max(1, finetune // 40)}", "engine.compile=false"]


def timed_hash():
    """store.file_hash wrapped to add its time to a counter; returns (wrapper, counter)."""
    spent, original = [0.0], store_module.file_hash

    def wrapper(path):
        started = time.perf_counter()
        try:
            return original(path)
        finally:
            spent[0] += time.perf_counter() - started

    return wrapper, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.05, help="fraction of the paper's iterations")
    parser.add_argument("--seeds", type=int, default=10, help="training seeds (the paper: 10 per data seed)")
    parser.add_argument("--out", help="store folder (default: a temporary one)")
    args = parser.parse_args()
    cfg = load_experiment_config("synthetic-paper", scaled_overrides(args.scale)
                                 + [f"seeds.train={list(range(args.seeds))}"])
    root = Path(args.out or tempfile.mkdtemp(prefix="store-integrity-")) / "paper"
    original = store_module.file_hash
    store_module.file_hash, spent = timed_hash()
    started = time.perf_counter()
    Experiment(cfg, root).run()
    run_s, hash_s = time.perf_counter() - started, spent[0]
    store_module.file_hash = original
    store_module._VERIFIED.clear()  # a cold cache: what `lrfeatures verify` or a new process pays
    started = time.perf_counter()
    bad = verify_store(root)
    verify_s = time.perf_counter() - started
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
    print(f"threads={torch.get_num_threads()} bad_shards={len(bad)} store={root}")
    print(f"verify_fraction={hash_s / run_s:.4f} paper_fraction={verify_s / (run_s / args.scale):.2e} "
          f"run_s={run_s:.1f} hash_s={hash_s:.2f} verify_s={verify_s:.2f} store_mb={size:.0f} "
          f"sha256_mb_s={hash_rate('sha256'):.0f} blake2b_mb_s={hash_rate('blake2b'):.0f}")


if __name__ == "__main__":
    main()
