"""Compiled CPU kernels: a torch C++ extension built once, at first use, from `csrc/` (no network).

What is compiled, and why: the product-key search (`csrc/product_topk.cpp`), the largest item of a
routed training step on the CPU (docs/performance.md): torch's form runs two full sorts, a top-k over
~1,200 rank-pair sums and four gathers over (T, ~1,200) tensors; the kernel does the same exact
search fused per token (radix sorts, a bound that drops most pairs, a radix select), 2.4x faster at
T 2,048 and 3.5x for one token (decoding). It is exact: the same unit set and sums as the torch
form (tested, ties included, against it and a float64 brute force).

Build: `torch.utils.cpp_extension.load` with -O3 and OpenMP (rows run on torch's intra-op threads),
cached in torch's extension directory (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so
the ~30 s compile happens once per machine and torch version. It needs a C++ compiler and ninja
(a dependency). Where it cannot build, one warning says why and the torch form runs: same results,
slower. MONOROUTE_CPU_KERNELS=0 turns the kernel off (the torch form always runs).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

ENV = "MONOROUTE_CPU_KERNELS"
NAME = "monoroute_cpu_kernels"
SOURCES = (Path(__file__).parent / "csrc" / "product_topk.cpp",)

_module = None
_tried = False


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cpu_kernels():
    """The compiled module (its `product_topk`), or None where it is disabled or cannot build."""
    global _module, _tried
    if not enabled():
        return None
    if _tried:
        return _module
    _tried = True
    try:
        from torch.utils import cpp_extension

        built = Path(cpp_extension._get_build_directory(NAME, verbose=False)) / f"{NAME}.so"
        if not built.exists():
            print(f"monoroute: building the compiled CPU search kernel (once per machine, ~30 s; {ENV}=0 "
                  f"skips it)", file=sys.stderr, flush=True)
        _module = cpp_extension.load(name=NAME, sources=[str(s) for s in SOURCES], extra_cflags=["-O3", "-fopenmp"],
                                     extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # no compiler, no ninja, a read-only cache: the torch form runs instead
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"monoroute: the compiled CPU search kernel could not be built ({first}); using the torch "
                      f"search (same results, slower). Install a C++ compiler and ninja, or set {ENV}=0 to skip it",
                      RuntimeWarning, stacklevel=2)
        _module = None
    return _module
