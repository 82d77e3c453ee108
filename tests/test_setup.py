"""scripts/setup.sh: which torch build it installs, against fake PyTorch indexes (nothing is installed)."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"
SPEC = "torch==99.0.0"  # a version no real index has: a download can only come from the fake one


@pytest.fixture
def index(tmp_path):
    """A PEP 503 index on localhost whose cpu/ and cu124/ hold a fake torch wheel; yields its base URL."""
    root = tmp_path / "index"
    for variant in ("cpu", "cu124"):
        folder = root / variant / "torch"
        folder.mkdir(parents=True)
        wheel = f"torch-99.0.0+{variant}-py3-none-any.whl"
        fake_wheel(folder / wheel, variant)
        (folder / "index.html").write_text(f"<a href='{wheel}'>{wheel}</a>")
        (root / variant / "index.html").write_text("<a href='torch/'>torch</a>")
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **kw)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def fake_wheel(path: Path, variant: str) -> None:
    """A tiny valid wheel called torch."""
    info = f"torch-99.0.0+{variant}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("torch/__init__.py", "")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: 99.0.0+{variant}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")


def closed_port_url() -> str:
    """A localhost URL nothing listens on (an unreachable index)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def plan(tmp_path: Path, base: str, *args: str, driver: bool = False, **env: str) -> subprocess.CompletedProcess:
    """setup.sh's torch choice (LRF_SETUP_PLAN=1) on a machine with or without an NVIDIA driver."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_smi = bin_dir / "nvidia-smi"
    if driver:
        fake_smi.write_text("#!/bin/sh\nexit 0\n")
        fake_smi.chmod(0o755)
    elif fake_smi.exists():
        fake_smi.unlink()
    path = os.pathsep.join([str(bin_dir)] + [p for p in os.environ["PATH"].split(os.pathsep)
                                             if not (Path(p) / "nvidia-smi").exists()])
    full_env = {**os.environ, "PATH": path, "LRF_SETUP_PLAN": "1", "LRF_TORCH_SPEC": SPEC,
                "LRF_TORCH_INDEX_BASE": base, "LRF_NVIDIA_PROC": str(tmp_path / "no-driver"),
                "PYTHON": sys.executable, **env}
    full_env.pop("LRF_TORCH", None) if "LRF_TORCH" not in env else None
    return subprocess.run(["bash", str(SETUP), *args], env=full_env, capture_output=True, text=True, timeout=60)


def torch_args(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert line.startswith("torch: ")
    return line[len("torch: "):]


def test_no_driver_and_a_reachable_cpu_index_installs_from_it(tmp_path, index):
    args = torch_args(plan(tmp_path, index))
    assert args == f"{SPEC} --index-url {index}/cpu"
    # The chosen arguments work with pip itself: the fake CPU wheel comes from the fake index.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip configuration (mirrors, constraints) left out
    download = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path / "dl"),
                               *args.split()], env=env, capture_output=True, text=True, timeout=120)
    assert download.returncode == 0, download.stderr
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["torch-99.0.0+cpu-py3-none-any.whl"]


def test_no_driver_and_no_cpu_index_falls_back_to_the_default_index_quickly(tmp_path):
    started = time.time()
    assert torch_args(plan(tmp_path, closed_port_url())) == SPEC
    assert time.time() - started < 20


def test_a_driver_uses_the_default_index(tmp_path, index):
    assert torch_args(plan(tmp_path, index, driver=True)) == SPEC
    (tmp_path / "no-driver").mkdir()  # /proc/driver/nvidia alone also counts as a driver
    assert torch_args(plan(tmp_path, index)) == SPEC


def test_cuda_builds_are_chosen_by_flag_or_variable(tmp_path, index):
    assert torch_args(plan(tmp_path, index, "--cuda")) == f"{SPEC} --index-url {index}/cu124"
    assert torch_args(plan(tmp_path, index, LRF_TORCH="cu124", driver=True)) == f"{SPEC} --index-url {index}/cu124"
    assert torch_args(plan(tmp_path, index, LRF_TORCH="cpu", driver=True)) == f"{SPEC} --index-url {index}/cpu"


@pytest.mark.parametrize("args, env, word", [((), {"LRF_TORCH": "cuda12"}, "LRF_TORCH=cuda12"),
                                             (("--gpu",), {}, "--gpu")])
def test_a_bad_choice_is_one_line_and_exit_2(tmp_path, index, args, env, word):
    result = plan(tmp_path, index, *args, **env)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("setup.sh:") and word in line


def test_an_unreachable_cuda_index_is_an_error_not_a_cpu_build(tmp_path):
    result = plan(tmp_path, closed_port_url(), LRF_TORCH="cu124")
    assert result.returncode == 2 and "cannot be reached" in result.stderr
