"""Compiled CPU kernels: a torch C++ extension built once, at first use, from `csrc/` (no network).

What is compiled, and why (docs/performance.md): the router's two searches, the largest items of a
routed training step on the CPU.
- `product_topk`: the exact product-key search. torch's form runs two full sorts, a top-k over
  ~1,200 rank-pair sums and four gathers over (T, ~1,200) tensors; the kernel does the same search
  fused per token (radix sorts, a bound that drops most pairs, a radix select). Exact: the same unit
  set and sums (tested, ties included, against the torch form and a brute force).
- `rerank`: the C candidates' pre-activations (a SIMD dot per candidate row, read in place) and the
  k largest, where torch runs `sparse_sampled_addmm` and `topk`. The same values up to float32
  summation order (tested against float64).
- `rerank_infer`: the whole default routed layer at inference (query, BatchNorm's running
  statistics, sub-key cosines, both of the above, ReLU, the output sum) in one call, which
  `RoutedFFN` takes in eval mode without gradient or hooks (decoding's ~45 small ops become one).

Build: `torch.utils.cpp_extension.load` with -O3, -march=native and OpenMP (rows run on torch's
intra-op threads), cached in torch's extension directory (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions) under a name that holds a hash of this CPU's instruction-set flags (a
cache shared between machines never runs code built for another CPU) and of the sources. The
~30-60 s compile happens once per machine, source and torch version. It needs a C++ compiler and ninja (a
dependency). Where it cannot build, one warning says why and the torch forms run: same results,
slower. MONOROUTE_CPU_KERNELS=0 turns the kernels off.

Loading: a build that exists is imported directly (its name pins the sources, the CPU and torch's
version), not through `cpp_extension.load`, which takes a lock file in the build directory and runs
ninja on every load. A process killed while it held that lock (Ctrl-C, a job killed at start-up) left
the lock behind, and torch then waits for it forever: every later run hung silently. Before a build,
a lock is waited on here instead, with a message, until it goes or is older than `STALE_LOCK_S` (no
build takes that long), when it is removed with a warning.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

ENV = "MONOROUTE_CPU_KERNELS"
CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "routing.cpp",)
FLAGS = ["-O3", "-march=native", "-fopenmp"]

STALE_LOCK_S = 600.0  # a lock file older than this is a killed process's, not a build in progress

_module = None
_tried = False


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cpu_signature() -> str:
    """8 hex digits naming this CPU's instruction sets (Linux: the `flags` line of /proc/cpuinfo)."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            text += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def extension_name() -> str:
    """The build's name: this CPU's signature and a hash of every file in csrc/ and of torch's version (a
    build that exists under this name is imported as it is, so the name must change whenever the sources,
    their headers or the torch they were built against do)."""
    text = b"".join(f.read_bytes() for f in sorted(CSRC.iterdir()) if f.is_file()) + torch.__version__.encode()
    sources = hashlib.sha1(text).hexdigest()[:8]
    return f"monoroute_cpu_kernels_{cpu_signature()}_{sources}"


def cpu_kernels():
    """The compiled module (`product_topk`, `rerank`), or None where disabled or unable to build."""
    global _module, _tried
    if not enabled():
        return None
    if _tried:
        return _module
    _tried = True
    try:
        from torch.utils import cpp_extension

        name = extension_name()
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        built = build_dir / f"{name}.so"
        _module = import_built(name, built) if built.exists() else None
        if _module is None:
            wait_for_lock(build_dir)
            if not built.exists():
                print(f"monoroute: building the compiled CPU routing kernels (once per machine, ~30-60 s; {ENV}=0 "
                      f"skips it)", file=sys.stderr, flush=True)
            _module = cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=FLAGS,
                                         extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # no compiler, no ninja, a read-only cache: the torch forms run instead
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]  # a build error: its command
        warnings.warn(f"monoroute: the compiled CPU routing kernels could not be built ({first}); using torch's "
                      f"(same results, slower). Install a C++ compiler and ninja, or set {ENV}=0 to skip them",
                      RuntimeWarning, stacklevel=2)
        _module = None
    return _module


def import_built(name: str, path: Path):
    """The extension module built at `path`, imported without torch's lock and ninja run; None if it
    does not import (a build cut short), and then `cpu_kernels` builds it through torch."""
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError):
        return None
    return module if all(hasattr(module, f) for f in ("product_topk", "rerank", "rerank_infer")) else None


def clear_stale_lock(build_dir: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove the build directory's lock file if it is older than `max_age_s` (torch would wait on it
    forever); True if one was removed."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return False
    if age < max_age_s:
        return False
    lock.unlink(missing_ok=True)
    warnings.warn(f"monoroute: removed a stale lock file ({lock}, {age / 60:.0f} min old) left by a process killed "
                  f"while it loaded the compiled kernels", RuntimeWarning, stacklevel=3)
    return True


def wait_for_lock(build_dir: Path, max_age_s: float = STALE_LOCK_S, poll_s: float = 1.0) -> None:
    """Return once the build directory holds no lock file: another process's build finished, or its
    lock grew older than `max_age_s` and was removed (torch's own wait has no limit)."""
    announced = False
    while (build_dir / "lock").exists() and not clear_stale_lock(build_dir, max_age_s):
        if not announced:
            print(f"monoroute: waiting for another process building the compiled kernels ({build_dir / 'lock'}; a lock "
                  f"older than {max_age_s / 60:.0f} min is taken for a killed process's and removed)",
                  file=sys.stderr, flush=True)
            announced = True
        time.sleep(poll_s)


def search_impl(device: str = "cpu") -> str:
    """Which router search runs on `device`: "compiled" (the kernels) or "torch" (benches report it)."""
    return "compiled" if str(device).startswith("cpu") and cpu_kernels() is not None else "torch"


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not DTensor or another subclass
_FLOATS = (torch.float32, torch.float64)


def kernels_for(*tensors):
    """The compiled module where it is on, built, and takes these tensors (plain: not DTensor; strided,
    CPU, float32 / float64, all of one dtype, as every kernel requires), else None: the one check before
    any kernel call. Written for a decoding step's budget (~2 us for a layer's eight tensors; each
    attribute read is a Python call)."""
    if not tensors or not enabled():
        return None
    dtype = tensors[0].dtype
    if dtype not in _FLOATS:
        return None
    for t in tensors:
        if not (type(t) in _PLAIN and t.is_cpu and t.layout is torch.strided and t.dtype is dtype):
            return None
    return cpu_kernels()
