"""Small C kernels for the CPU decode step, compiled on first use with the machine's C compiler.

``decode_attention``: one new token per row attends over that row's own cache columns (``decode_attention.c``
says the arithmetic). PyTorch's CPU attention (``scaled_dot_product_attention``) reads every row up to the
batch's furthest column and spends most of its time on per-(row, head) overhead at one query token: in a
bfloat16 decode step of SmolLM2-135M it was about half the step. The kernel reads only each row's columns,
with a software prefetch.

The shared library is built once per source, head shape and machine, with ``cc -O3 -march=native`` (the
compiler ``CC`` names, else ``cc``) and OpenMP, into ``$AFT_KERNEL_DIR``, else ``$XDG_CACHE_HOME/aft/kernels``
(else ``~/.cache/aft/kernels``). Where it cannot be built or loaded (no compiler, another OS,
``AFT_KERNELS=0``) ``decode_attention_available`` says so and the decode step uses PyTorch's own attention:
a missing compiler costs speed, never a result.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("decode_attention.c")
# -march=native: the library is built on, and only for, the machine it runs on (the cache key says which).
# Reassociation lets the loops over the head dimension vectorise; no -ffast-math, so infinities and NaN
# keep their meaning.
# -fopenmp: the library's libgomp.so.1 resolves to the one torch has loaded (same soname), so the kernel runs
# on PyTorch's own OpenMP threads.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-fopenmp", "-fPIC", "-shared")


def enabled() -> bool:
    return os.environ.get("AFT_KERNELS", "1") != "0"


def _cache_dir() -> Path:
    if os.environ.get("AFT_KERNEL_DIR"):
        return Path(os.environ["AFT_KERNEL_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aft" / "kernels"


def _machine() -> str:
    """What -march=native depends on: the CPU's model and flags (a home directory shared by machines of
    different CPUs gets one library per CPU)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [x for x in info.splitlines() if x.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        lines = []
    return "\n".join([platform.machine(), platform.processor(), *lines])


@functools.cache
def _library(groups: int, head_dim: int):
    """The compiled ``decode_attention`` for G = ``groups`` query heads per key/value head of ``head_dim``,
    or None (logged once) where it cannot be had."""
    if not enabled() or platform.system() not in ("Linux", "Darwin"):
        return None
    compiler = os.environ.get("CC") or "cc"
    defines = (f"-DG={groups}", f"-DD={head_dim}")
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *FLAGS, *defines, _machine()]).encode())
    path = _cache_dir() / f"decode_attention-{key.hexdigest()[:16]}.so"
    if not path.exists():
        if shutil.which(compiler) is None:
            logger.info("no C compiler (%s): decoding uses PyTorch's attention", compiler)
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # built aside, then moved: never half a file
                built = Path(tmp) / path.name
                run = subprocess.run([compiler, *FLAGS, *defines, str(SOURCE), "-o", str(built), "-lm"],
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    logger.warning("could not compile %s (decoding uses PyTorch's attention):\n%s", SOURCE.name,
                                   run.stderr[-2000:])
                    return None
                os.replace(built, path)
        except OSError as error:  # a kernel folder that cannot be written (AFT_KERNEL_DIR, a read-only home)
            logger.warning("could not build %s in %s (decoding uses PyTorch's attention): %s", SOURCE.name,
                           path.parent, error)
            return None
    try:
        function = ctypes.CDLL(str(path)).decode_attention
    except OSError as error:
        logger.warning("could not load %s (decoding uses PyTorch's attention): %s", path, error)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer] * 9 + [size] * 8 + [ctypes.c_float, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def decode_attention_available(groups: int, head_dim: int) -> bool:
    return _library(groups, head_dim) is not None


class Spans:
    """The cache columns each row reads, checked once for a decode step's layers.

    Row r reads columns ``start[r] <= c < stop[r]``. ``siblings`` (optional): rows whose first columns hold
    the same keys and values as another row's (a prompt's k samples), as ``(source, shared)``: row r may read
    its first ``shared[r]`` columns from row ``source[r]`` (whose span starts at the same column); rows of one
    source are then visited one after another, so those columns come from memory once."""

    def __init__(self, start: torch.Tensor, stop: torch.Tensor, siblings=None):
        self.start, self.stop = start.to(torch.int64).contiguous(), stop.to(torch.int64).contiguous()
        rows = len(self.start)
        if self.stop.shape != (rows,) or bool((self.start < 0).any() | (self.stop <= self.start).any()):
            raise ValueError("each row needs 0 <= start < stop columns")
        self.columns = int(self.stop.max()) if rows else 0
        self.order = self.source = self.shared = None
        if siblings is not None:
            source, shared = (x.to(torch.int64).contiguous() for x in siblings)
            if source.shape != (rows,) or shared.shape != (rows,) or bool(
                    (source < 0).any() | (source >= rows).any() | (shared < 0).any()):
                raise ValueError("siblings: a source row of the batch and a count >= 0 for each row")
            if not torch.equal(self.start[source], self.start):
                raise ValueError("siblings: a row and its source row must start at the same column")
            self.order = torch.argsort(source, stable=True)  # a source's rows together
            self.source, self.shared = source, shared

    def __len__(self):
        return len(self.start)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, spans: Spans,
                     scale: float) -> torch.Tensor:
    """softmax(scale * q k^T) v of each row over its cache columns (``spans``) only.

    ``q`` (rows, kv_heads, G, D) bfloat16; ``keys`` / ``values`` (rows or more, kv_heads, columns, D) bfloat16
    on the CPU, last dimension contiguous (views of a larger cache are read in place). Returns (rows,
    kv_heads, G, D) bfloat16. Raises where the kernel is unavailable (``decode_attention_available``) or the
    inputs do not fit it."""
    rows, heads, groups, head_dim = q.shape
    function = _library(groups, head_dim)
    if function is None:
        raise RuntimeError("the decode attention kernel is not available on this machine")
    for name, x in (("q", q), ("keys", keys), ("values", values)):
        if x.dtype != torch.bfloat16 or x.device.type != "cpu":
            raise ValueError(f"{name} must be a bfloat16 CPU tensor, got {x.dtype} on {x.device}")
    if keys.shape[1:] != values.shape[1:] or keys.shape[1] != heads or keys.shape[3] != head_dim or \
            keys.shape[0] < rows or values.shape[0] < rows or keys.stride(3) != 1 or values.stride(3) != 1:
        raise ValueError(f"keys {tuple(keys.shape)} / values {tuple(values.shape)} do not fit q {tuple(q.shape)}")
    if len(spans) != rows or spans.columns > keys.shape[2]:
        raise ValueError(f"spans of {len(spans)} rows up to column {spans.columns} for {rows} rows of "
                         f"{keys.shape[2]} columns")
    q, out = q.contiguous(), torch.empty_like(q, memory_format=torch.contiguous_format)
    pointer = lambda x: None if x is None else x.data_ptr()  # noqa: E731
    failed = function(q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), spans.start.data_ptr(),
                      spans.stop.data_ptr(), pointer(spans.order), pointer(spans.source), pointer(spans.shared),
                      rows, heads, *keys.stride()[:3], *values.stride()[:3], scale, torch.get_num_threads())
    if failed:
        raise MemoryError("decode attention: no memory for its scores")
    return out
