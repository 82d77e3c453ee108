"""The compiled CPU kernel for grids of SI MLPs (mlp_native.c), loaded through ctypes.

The C source is compiled at first use for this machine ($CC, gcc or cc; GCC or clang; -O3
-march=native or -mcpu=native) into a per-user cache, keyed by the source, the flags and the
CPU. The cache folder is made with mode 0700 and used only if this user owns it and no one else
may write it (else a private folder in the temp directory, with one warning); the library's
sha256 is recorded at build time and checked before ctypes loads it, so a planted .so never runs. Without a working C compiler the grid engine falls back to its torch kernels (with a
warning). The kernel splits the models of a chunk into ranges that torch's thread count of
workers take in turn; ctypes releases the GIL, so the workers run in parallel.

Contention: the hand-out is dynamic (eight ranges per worker, taken as workers free up) and
idle workers block on the pool's queue instead of spinning, so a worker whose core is taken by
another process just does fewer ranges; every core stays useful (threads.dynamic_threads).
Evaluation forwards train and test in one pass per model (evaluate_sets), on sets laid out
once per chunk (prepare), in 64-sample blocks whose activations stay in L1.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.mlp import SIMLP

SOURCE = Path(__file__).with_name("mlp_native.c")
FLAGS = ["-O3", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu11"]
# Tried in order: x86 compilers take -march=native, some arm64 ones (Apple clang) only -mcpu=native.
# No arch-less fallback: built for a generic CPU the kernel is ~20x slower, below the torch kernels.
ARCH_FLAGS = (["-march=native"], ["-mcpu=native"])
LANES = 16  # model widths must be a multiple of this (the C code's vectors hold 16, 8 or 4 samples)
EVAL_SAMPLES = 64  # samples per evaluation block: one block's activations stay in L1
REALS = {torch.float32: "float", torch.float64: "double"}
RULES = {"projected": 0, "riemannian": 1}
_libraries: dict[torch.dtype, ctypes.CDLL | None] = {}
_pool: tuple[tuple[int, int], ThreadPoolExecutor] | None = None
_warned: set[str] = set()


def cache_dir() -> Path:
    """Where compiled kernels live ($LRF_CACHE_DIR, else the user's cache directory)."""
    base = os.environ.get("LRF_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lrfeatures")
    return Path(base) / "native"


def fallback_cache_dir() -> Path:
    """A per-user private folder in the temp directory, used when the cache folder is not private."""
    return Path(tempfile.gettempdir()) / f"lrfeatures-{os.getuid()}-native"


def is_private(folder: Path) -> bool:
    """A real folder owned by this user that no one else may write (else anyone could plant a .so)."""
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def kernel_dir() -> Path:
    """The cache folder (made with mode 0700) if private, else a private fallback, with one warning."""
    wanted = cache_dir()
    for folder in (wanted, fallback_cache_dir()):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            continue
        if is_private(folder):
            if folder != wanted:
                warn_once(f"the kernel cache {wanted} is not private to this user (owner or group/other write); "
                          f"compiled kernels go to {folder} instead")
            return folder
    raise RuntimeError(f"no private kernel cache folder ({wanted} is shared or unwritable)")


def warn_once(message: str) -> None:
    """A warning shown once per process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def trusted(target: Path) -> bool:
    """Whether a cached library matches the hash recorded when it was built (checked before loading)."""
    record = target.with_name(target.name + ".sha256")
    try:
        return target.is_file() and record.read_text().strip() == sha256_of(target)
    except OSError:
        return False


def cpu_signature() -> str:
    """The CPU model and flags (-march=native code must not run on another CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def compiler() -> str | None:
    """A C compiler on PATH ($CC first)."""
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return name
    return None


def build(dtype: torch.dtype) -> Path:
    """Compile the kernel for one precision (cached); returns the shared library's path."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    failure = None
    for arch in ARCH_FLAGS:
        flags = FLAGS + arch + [f"-DREAL={REALS[dtype]}"]
        key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *flags, cpu_signature()]).encode()).hexdigest()[:16]
        target = kernel_dir() / f"mlp_native_{REALS[dtype]}_{key}.so"
        if trusted(target):
            return target
        # Compile to a private name, record its hash, then rename: no process loads a partial or foreign file.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *flags, "-o", partial, str(SOURCE), "-lm"], check=True, capture_output=True, text=True)
            Path(partial + ".sha256").write_text(sha256_of(Path(partial)))
            os.replace(partial + ".sha256", target.with_name(target.name + ".sha256"))
            os.replace(partial, target)
            return target
        except subprocess.CalledProcessError as err:
            failure = err
        finally:
            for leftover in (partial, partial + ".sha256"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
    raise failure


def library(dtype: torch.dtype) -> ctypes.CDLL | None:
    """The loaded kernel for this precision, or None (with one warning) if it cannot be built."""
    if dtype not in _libraries:
        try:
            path = build(dtype)
            if not trusted(path):  # changed since it was built or checked: never load it
                raise RuntimeError(f"{path} does not match its recorded hash")
            lib = ctypes.CDLL(str(path))
        except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or err
            warnings.warn(f"the compiled MLP kernel is unavailable ({str(detail).strip()[:200]}); "
                          "the grid engine uses its torch kernels")
            lib = None
        if lib is not None:
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            real = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
            lib.lrf_train.argtypes = [i64, i64, i64, i64, i64, real, ptr, ptr, ptr, real, i64, ptr, ptr, ptr,
                                      i64, i64, ptr, ptr, ptr, ptr, ptr, ptr]
            lib.lrf_evaluate.argtypes = [i64, i64, i64, i64, real, ptr, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, ptr,
                                         i64]
            lib.lrf_train.restype = lib.lrf_evaluate.restype = ctypes.c_int
            lib.lrf_lanes.restype = i64
        _libraries[dtype] = lib
    return _libraries[dtype]


def thread_pool() -> ThreadPoolExecutor:
    """One worker per torch thread, shared by every kernel call (a new pool after a fork:
    a forked child inherits the pool object but not its threads)."""
    global _pool
    key = (os.getpid(), torch.get_num_threads())
    if _pool is None or _pool[0] != key:
        if _pool is not None and _pool[0][0] == key[0]:
            _pool[1].shutdown(wait=False)  # the thread count changed: retire the old workers
        _pool = (key, ThreadPoolExecutor(max_workers=key[1], thread_name_prefix="lrf-native"))
    return _pool[1]


def model_ranges(num_models: int, per_worker: int = 8) -> list[tuple[int, int]]:
    """Contiguous model ranges, several per worker thread: the pool hands them out as threads
    free up, so a core slowed by something else does less of the work."""
    pieces = max(1, min(torch.get_num_threads() * per_worker, num_models))
    bounds = [num_models * k // pieces for k in range(pieces + 1)]
    return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def at(tensor: torch.Tensor, row: int) -> int:
    """Address of row `row` of a contiguous tensor."""
    return tensor.data_ptr() + row * tensor.stride(0) * tensor.element_size()


def run_split(num_models: int, call) -> None:
    """call(lo, hi) on each model range in parallel; raises if any call failed."""
    codes = list(thread_pool().map(lambda r: call(*r), model_ranges(num_models)))
    if any(codes):
        raise MemoryError("the compiled MLP kernel could not allocate its scratch memory")


class NativeMLP:
    """Training segments and logits of a grid of SI MLPs (binary head, ReLU) in compiled C."""

    def __init__(self, template: SIMLP, lib: ctypes.CDLL, dtype: torch.dtype):
        self.lib, self.dtype = lib, dtype
        self.depth = len(template.hidden)
        self.in_dim = template.hidden[0].in_features
        self.width = template.hidden[0].out_features
        self.eps = template.norm_eps

    @staticmethod
    def supports(template, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this kernel can train the model: a binary-head ReLU SI MLP on CPU."""
        return (isinstance(template, SIMLP) and template.activation == "relu" and template.squeeze
                and device.type == "cpu" and dtype in REALS
                and template.hidden[0].in_features % LANES == 0 and template.hidden[0].out_features % LANES == 0)

    @classmethod
    def create(cls, template, device: torch.device, dtype: torch.dtype) -> "NativeMLP | None":
        """The kernel for this model, or None where it does not apply or cannot be built."""
        if not cls.supports(template, device, dtype):
            return None
        lib = library(dtype)
        return cls(template, lib, dtype) if lib is not None else None

    def check_inplace(self, *tensors: torch.Tensor) -> None:
        """The C code reads and writes these through raw pointers: right dtype, contiguous, on CPU."""
        for t in tensors:
            if t.dtype != self.dtype or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"the compiled kernel needs contiguous CPU {self.dtype} tensors, got "
                                 f"{t.dtype} on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}")

    def train(self, theta: torch.Tensor, head: torch.Tensor, lrs: torch.Tensor, rho: float, rule: str,
              x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, stream_of_model: torch.Tensor,
              sums: dict[str, torch.Tensor]) -> None:
        """Run every model [M] through order's steps ([streams, steps, batch]), in place.

        theta [M, P] and the accumulators in `sums` (active, grad_norm, grad_sum, loss_sum,
        count) are updated as GridTrainer.lockstep and its bookkeeping would."""
        self.check_inplace(theta, *(sums[k] for k in ("grad_norm", "grad_sum", "loss_sum", "count")))
        if sums["active"].dtype != torch.bool or not sums["active"].is_contiguous():
            raise ValueError("sums['active'] must be a contiguous bool tensor")
        order, stream_of_model = order.to(torch.int64).contiguous(), stream_of_model.to(torch.int64).contiguous()
        streams, steps, batch = order.shape
        x, y, lrs = (t.to(self.dtype).contiguous() for t in (x, y, lrs))
        head = head.reshape(len(head), -1).to(self.dtype).contiguous()
        active = sums["active"].view(torch.uint8)

        def call(lo: int, hi: int) -> int:
            return self.lib.lrf_train(hi - lo, self.depth, self.in_dim, self.width, batch, self.eps,
                                      at(theta, lo), at(head, lo), at(lrs, lo), rho, RULES[rule],
                                      x.data_ptr(), y.data_ptr(), order.data_ptr(), steps * batch, steps,
                                      at(stream_of_model, lo), at(active, lo), at(sums["grad_norm"], lo),
                                      at(sums["grad_sum"], lo), at(sums["loss_sum"], lo), at(sums["count"], lo))

        run_split(len(theta), call)

    def prepare(self, sets: list[tuple[torch.Tensor, torch.Tensor]]) -> "EvalSets":
        """Labelled sets (x [N, D], y [N]) in the kernel's block layout, made once and reused at every log."""
        lanes = int(self.lib.lrf_lanes())
        xts, labels, blocks, sizes = [], [], [], []
        for x, y in sets:
            n = len(x)
            count = (n + EVAL_SAMPLES - 1) // EVAL_SAMPLES
            padded = torch.zeros(count * EVAL_SAMPLES, self.in_dim + 1, dtype=self.dtype)
            padded[:n, :-1], padded[:n, -1] = x, y
            xts.append(padded[:, :-1].reshape(count, EVAL_SAMPLES, self.in_dim).transpose(1, 2))  # [b, D, samples]
            labels.append(padded[:, -1])
            blocks.append(count)
            sizes.append(n)
        return EvalSets(torch.cat(xts).contiguous(), torch.cat(labels).contiguous(),
                        torch.tensor(blocks, dtype=torch.int64), torch.tensor(sizes, dtype=torch.int64),
                        EVAL_SAMPLES // lanes)

    def evaluate_sets(self, theta: torch.Tensor, head: torch.Tensor, prepared: "EvalSets"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss [K, M] and accuracy [K, M] of every model on each of K prepared sets, in one
        pass per model (fused: its weights are read once for all sets)."""
        sets, num_models = len(prepared.blocks), len(theta)
        loss = torch.empty(sets, num_models, dtype=self.dtype)
        accuracy = torch.empty(sets, num_models, dtype=self.dtype)
        head = head.reshape(len(head), -1).to(self.dtype).contiguous()
        self.check_inplace(theta)

        def call(lo: int, hi: int) -> int:
            return self.lib.lrf_evaluate(hi - lo, self.depth, self.in_dim, self.width, self.eps, at(theta, lo),
                                         at(head, lo), prepared.vectors, prepared.xt.data_ptr(),
                                         prepared.labels.data_ptr(), sets, prepared.blocks.data_ptr(),
                                         prepared.sizes.data_ptr(), at(loss[0], lo), at(accuracy[0], lo),
                                         num_models)

        run_split(num_models, call)
        return loss, accuracy

    def evaluate(self, theta: torch.Tensor, head: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss [M] and accuracy [M] of every model on a shared labelled set x [N, D]."""
        loss, accuracy = self.evaluate_sets(theta, head, self.prepare([(x, y)]))
        return loss[0], accuracy[0]


@dataclass(frozen=True)
class EvalSets:
    """Evaluation sets in the C kernel's layout: blocks back to back, set after set."""

    xt: torch.Tensor  # [blocks, D, EVAL_SAMPLES] feature-major samples, zero padded
    labels: torch.Tensor  # [blocks * EVAL_SAMPLES]
    blocks: torch.Tensor  # [K] int64: blocks of each set
    sizes: torch.Tensor  # [K] int64: real samples of each set
    vectors: int  # sample vectors per block (EVAL_SAMPLES / the kernel's lanes)
