"""The store keeps its promises: a fault matrix (every file kind x truncate / overwrite / delete),
concurrent workers on one --out, two configs racing for one --out, experiment identity, and a
planted kernel library that must never load.

Every damage ends in a recompute whose tables equal an undamaged run, or in a one-line refusal
(exit 2); never in a silent result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from lrfeatures import cli
from lrfeatures.config import dump_toml, load_config
from lrfeatures.errors import DataError, StoreError
from lrfeatures.experiments import Experiment, Shard, run_shard
from lrfeatures.store import LEASE_TTL_ENV, ExperimentStore, verify_store

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SMALL = {
    "kind": "synthetic", "name": "faults",
    "data": {"n_train": 256, "n_test": 64, "n_probe": 20},
    "pretrain": {"lrs": [1e-2, 0.1], "iterations": 40, "ckpt_every": 10, "log_every": 20},
    "finetune": {"lrs": [1e-3], "iterations": 20, "log_every": 20},
    "swa": {"ks": [2]},
    "seeds": {"data": [0], "train": [0]},
    "engine": {"memory_budget_gb": 1, "compile": False, "train_seeds_per_shard": 1},
}
TABLES = ("metrics", "evaluations", "features", "geometry")
PRETRAIN = "pretrain-d0-s0-0-n1"
# file kind -> path inside the store
KINDS = {
    "table": f"shards/{PRETRAIN}/metrics.parquet",
    "weights": f"shards/{PRETRAIN}/weights.safetensors",
    "done.json": f"shards/{PRETRAIN}/done.json",
    "config.toml": "config.toml",
    "summary.json": "summary.json",
    "merged-table": "metrics.parquet",
}


def small_config(**seeds):
    data = {**SMALL, "seeds": {**SMALL["seeds"], **seeds}}
    return load_config(data)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwrite(path: Path) -> None:
    """4 KiB of random bytes over the middle of the file (it grows if smaller)."""
    with open(path, "r+b") as handle:
        handle.seek(max(0, path.stat().st_size // 2 - 2048))
        handle.write(os.urandom(4096))


DAMAGES = {"truncate": truncate, "overwrite": overwrite, "delete": Path.unlink}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An undamaged run of the small experiment, and its config file."""
    base = tmp_path_factory.mktemp("faults")
    (base / "small.toml").write_text(dump_toml(small_config()))
    Experiment(small_config(), base / "reference").run()
    return base


def assert_same_tables(a: Path, b: Path) -> None:
    for name in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(a / f"{name}.parquet"), pd.read_parquet(b / f"{name}.parquet"),
                                      check_exact=True, obj=name)


def rerun(config: Path, root: Path) -> int:
    return cli.main(["run", str(config), "--out", str(root), "--quiet", "--no-report"])


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_fault_matrix(kind, damage, reference, tmp_path, capsys):
    root = Path(shutil.copytree(reference / "reference", tmp_path / "store"))
    DAMAGES[damage](root / KINDS[kind])
    capsys.readouterr()
    code = rerun(reference / "small.toml", root)
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    err = [line for line in stderr.splitlines() if line.startswith("lrfeatures:")]  # not numpy's warnings
    if code == 0:  # recomputed: the same tables as the undamaged run, and the damage named in one line
        assert_same_tables(reference / "reference", root)
        assert verify_store(root) == []
        if kind in ("table", "weights", "done.json"):
            assert len(err) == 1 and PRETRAIN in err[0] and err[0].startswith("lrfeatures: warning:"), err
    else:  # refused, in one line
        assert code == 2 and len(err) == 1 and err[0].startswith("lrfeatures: error:"), err
        assert kind == "config.toml", f"{kind}/{damage} should be recomputed, not refused"


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_verify_names_every_bad_shard(damage, reference, tmp_path, capsys):
    root = Path(shutil.copytree(reference / "reference", tmp_path / "store"))
    assert cli.main(["verify", str(root)]) == 0
    DAMAGES[damage](root / KINDS["weights"])
    capsys.readouterr()
    assert cli.main(["verify", str(root)]) == 1
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 1 and rows[0].startswith(PRETRAIN + "\t"), rows


def test_shard_folder_without_done_json_is_set_aside(reference, tmp_path, capsys):
    """An interrupted copy leaves a folder without done.json: set aside and recomputed, never a blocker."""
    root = Path(shutil.copytree(reference / "reference", tmp_path / "store"))
    (root / "shards" / PRETRAIN / "done.json").unlink()
    (root / "shards" / PRETRAIN / "weights.safetensors").unlink()
    assert rerun(reference / "small.toml", root) == 0
    assert_same_tables(reference / "reference", root)
    assert len(list((root / "shards").glob(f".broken-{PRETRAIN}-*"))) == 1


class Unit(str):
    label = property(str.__str__)


def test_dependants_of_a_changed_shard_are_recomputed(tmp_path, capsys):
    """A shard records the content digest of each upstream shard it read; a changed upstream makes it stale."""
    store = ExperimentStore.create(tmp_path, small_config())
    up, down = Shard("train", Unit("u")), Shard("score", Unit("u"))

    def writes(value):
        return lambda shard, writer: writer.table("t", pd.DataFrame({"v": [value]}))

    assert run_shard(store, up, writes(1)) and run_shard(store, down, writes(2), [up])
    assert run_shard(store, down, writes(2), [up]) is False
    assert run_shard(store, up, writes(1)) is False
    shutil.rmtree(store.shard_dir(up.name))  # lost, and recomputed bit for bit: the dependant stays valid
    assert run_shard(store, up, writes(1)) and run_shard(store, down, writes(2), [up]) is False
    shutil.rmtree(store.shard_dir(up.name))  # recomputed with other content: the dependant is stale
    assert run_shard(store, up, writes(3)) and run_shard(store, down, writes(2), [up]) is True
    assert "built on an earlier train-u" in capsys.readouterr().err


def test_merge_refuses_a_missing_expected_shard(reference, tmp_path):
    root = Path(shutil.copytree(reference / "reference", tmp_path / "store"))
    shutil.rmtree(root / "shards" / PRETRAIN)
    with pytest.raises(StoreError, match=PRETRAIN):
        ExperimentStore(root).merge_table("metrics", sorted(p.name for p in (reference / "reference" / "shards")
                                                            .iterdir()))


# ----- several workers ------------------------------------------------------------------------

def worker(config: Path, root: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lrfeatures", "run", str(config), "--out", str(root), "--quiet",
                             "--no-report"], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_three_workers_split_the_work_and_compute_each_shard_once(tmp_path):
    cfg = small_config(train=[0, 1, 2])
    (tmp_path / "c.toml").write_text(dump_toml(cfg))
    Experiment(cfg, tmp_path / "single").run()
    env = {LEASE_TTL_ENV: "3", "LRFEATURES_SLOW_SHARD": f"{PRETRAIN}=6"}  # outlives its TTL: the heartbeat keeps it
    procs = [worker(tmp_path / "c.toml", tmp_path / "shared", env) for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-1500:] for o in outputs]
    store = ExperimentStore(tmp_path / "shared")
    computed = store.attempts()
    assert sorted(computed) == store.done_shards() and len(computed) == 12
    assert all(len(a) == 1 for a in computed.values()), {n: len(a) for n, a in computed.items()}
    assert len({a[0]["pid"] for a in computed.values()}) >= 2  # the work was split
    assert_same_tables(tmp_path / "single", tmp_path / "shared")
    assert not list((tmp_path / "shared" / "shards").glob(".*"))  # no lease or temp dir left


def test_two_configs_racing_for_one_out_only_one_runs(tmp_path):
    for name, lrs in (("a", [1e-2, 0.1]), ("b", [1e-2, 0.2])):
        (tmp_path / f"{name}.toml").write_text(dump_toml(load_config({**SMALL, "pretrain": {**SMALL["pretrain"],
                                                                                            "lrs": lrs}})))
    procs = [worker(tmp_path / f"{n}.toml", tmp_path / "out", {}) for n in ("a", "b")]
    outputs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-1500:] for o in outputs]
    loser = next(o[1] for p, o in zip(procs, outputs) if p.returncode == 2).strip().splitlines()
    assert len(loser) == 1 and "different config" in loser[0]
    winner = "ab"[[p.returncode for p in procs].index(0)]
    assert load_config(str(tmp_path / "out" / "config.toml")) == load_config(str(tmp_path / f"{winner}.toml"))


# ----- identity -------------------------------------------------------------------------------

def test_version_change_is_refused_unless_allowed(reference, tmp_path, capsys):
    root = Path(shutil.copytree(reference / "reference", tmp_path / "store"))
    config = root / "config.toml"
    config.write_text(config.read_text().replace("# lrfeatures 0.", "# lrfeatures 0.0.", 1))
    capsys.readouterr()
    assert rerun(reference / "small.toml", root) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-version-change" in err[0]
    assert cli.main(["run", str(reference / "small.toml"), "--out", str(root), "--quiet", "--no-report",
                     "--allow-version-change"]) == 0
    assert ExperimentStore(root).version_changes()[-1]["to"] == ExperimentStore(root).version()
    assert rerun(reference / "small.toml", root) == 0  # recorded: the next resume is plain


def image_cfg(folder: Path):
    from lrfeatures.experiments.images import image_config

    return image_config("cpu-small", [f"data.dataset=folder:{folder}", "seeds.train=[0]", "seeds.data=[0]"])


def test_changed_folder_data_is_refused(tmp_path, colour_folder):
    folder = colour_folder(tmp_path / "images", ["a", "b"], seed=0, n_per_class=6, size=8)
    Experiment(image_cfg(folder), tmp_path / "out")  # opens the store (no shard runs)
    Experiment(image_cfg(folder), tmp_path / "out")  # same data: a resume
    (folder / "a" / "000.png").unlink()
    with pytest.raises(StoreError, match="different data"):
        Experiment(image_cfg(folder), tmp_path / "out")


def test_one_class_folder_is_refused_before_anything_is_written(tmp_path, colour_folder):
    folder = colour_folder(tmp_path / "images", ["only"], seed=0, n_per_class=6, size=8)
    with pytest.raises(DataError):
        Experiment(image_cfg(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----- code loading ---------------------------------------------------------------------------

PLANT = textwrap.dedent("""
    #include <stdio.h>
    __attribute__((constructor)) static void planted(void) {
        FILE *f = fopen("MARKER", "w"); if (f) { fputs("ran", f); fclose(f); }
    }
    int lrf_train(void) { return 0; }
    int lrf_evaluate(void) { return 0; }
""")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the planted library")
@pytest.mark.parametrize("shared", [True, False], ids=["group-writable-cache", "private-cache-foreign-so"])
def test_a_planted_kernel_library_is_never_loaded(shared, tmp_path, monkeypatch):
    from lrfeatures.engine import native

    marker, cache = tmp_path / "marker", tmp_path / "cache"
    monkeypatch.setenv("LRF_CACHE_DIR", str(cache))
    monkeypatch.setattr(native, "fallback_cache_dir", lambda: tmp_path / "private")
    monkeypatch.setattr(native, "_libraries", {})
    folder = native.cache_dir()
    folder.mkdir(parents=True)
    os.chmod(folder, 0o777 if shared else 0o700)
    names = []
    for arch in native.ARCH_FLAGS:  # plant under every name build() may look for
        flags = native.FLAGS + arch + ["-DREAL=float"]
        key = native.hashlib.sha256("\0".join([native.SOURCE.read_text(), native.compiler(), *flags,
                                               native.cpu_signature()]).encode()).hexdigest()[:16]
        names.append(f"mlp_native_float_{key}.so")
    source = tmp_path / "plant.c"
    source.write_text(PLANT.replace("MARKER", str(marker)))
    for name in names:
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(folder / name), str(source)], check=True)
        if not shared:  # even a hash record planted beside it must not help: it is the planter's, not ours
            (folder / f"{name}.sha256").write_text("0" * 64)
    with pytest.warns(UserWarning) if shared else _no_warning():
        lib = native.library(torch.float32)
    assert not marker.exists(), "the planted library ran"
    if lib is not None:  # a genuine build (private fallback, or rebuilt over the planted file)
        assert native.trusted(Path(lib._name))
    assert (tmp_path / "private").is_dir() == shared


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
