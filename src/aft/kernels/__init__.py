"""Small C kernels for the CPU decode step, compiled on first use with the machine's C compiler.

``decode_attention``: one new token per row attends over that row's own cache columns (``decode_attention.c``
says the arithmetic). PyTorch's CPU attention (``scaled_dot_product_attention``) reads every row up to the
batch's furthest column and spends most of its time on per-(row, head) overhead at one query token: in a
bfloat16 decode step of SmolLM2-135M it was about half the step. The kernel reads only each row's columns,
with a software prefetch.

``add_rms_norm``, ``silu_mul``, ``rotary``: the element-wise work between the step's matrix products, one
pass per row each (``decode_pointwise.c``), with PyTorch's arithmetic and roundings; in PyTorch's operators
it had been about a quarter of the step.

Each shared library is built once per source, head shape and machine, with ``cc -O3 -march=native`` (the
compiler ``CC`` names, else ``cc``) and OpenMP, into ``$AFT_KERNEL_DIR``, else ``$XDG_CACHE_HOME/aft/kernels``
(else ``~/.cache/aft/kernels``). Where it cannot be built or loaded (no compiler, another OS,
``AFT_KERNELS=0``) ``decode_attention_available`` / ``pointwise_available`` say so and the decode step uses
PyTorch's own operators: a missing compiler costs speed, never a result.
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
HERE = Path(__file__).parent
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


_pointer, _size = ctypes.c_void_p, ctypes.c_int64
SIGNATURES = {  # argument types of each C function
    "decode_attention": [_pointer] * 9 + [_size] * 8 + [ctypes.c_float, ctypes.c_int],
    "add_rms_norm": [_pointer] * 4 + [_size] * 2 + [ctypes.c_float, ctypes.c_int],
    "silu_mul": [_pointer, _pointer, _size, _pointer, _size, _size, ctypes.c_int],
    "rotary": [_pointer, _size, _pointer, _pointer, _pointer, _size, _size, _size, ctypes.c_int],
    "top_candidates": [_pointer] + [_size] * 4 + [ctypes.c_float] + [_pointer] * 3 + [ctypes.c_int],
}
RETURNS_STATUS = ("decode_attention", "top_candidates")  # 0, or 1 where a thread's scratch memory was not had


@functools.cache
def _library(source: str, defines: tuple[str, ...] = ()):
    """The compiled ``source`` (a file beside this one, with ``bf16.h``) for ``defines``, its functions'
    argument types set, or None (logged once) where it cannot be had."""
    if not enabled() or platform.system() not in ("Linux", "Darwin"):
        return None
    compiler = os.environ.get("CC") or "cc"
    texts = [(HERE / name).read_text() for name in (source, "bf16.h")]
    key = hashlib.sha256("\0".join([*texts, compiler, *FLAGS, *defines, _machine()]).encode())
    path = _cache_dir() / f"{Path(source).stem}-{key.hexdigest()[:16]}.so"
    if not path.exists():
        if shutil.which(compiler) is None:
            logger.info("no C compiler (%s): decoding uses PyTorch's operators", compiler)
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # built aside, then moved: never half a file
                built = Path(tmp) / path.name
                run = subprocess.run([compiler, *FLAGS, *defines, str(HERE / source), "-o", str(built), "-lm"],
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    logger.warning("could not compile %s (decoding uses PyTorch's operators):\n%s", source,
                                   run.stderr[-2000:])
                    return None
                os.replace(built, path)
        except OSError as error:  # a kernel folder that cannot be written (AFT_KERNEL_DIR, a read-only home)
            logger.warning("could not build %s in %s (decoding uses PyTorch's operators): %s", source,
                           path.parent, error)
            return None
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        logger.warning("could not load %s (decoding uses PyTorch's operators): %s", path, error)
        return None
    for name, types in SIGNATURES.items():
        if hasattr(library, name):
            function = getattr(library, name)
            function.argtypes, function.restype = types, ctypes.c_int if name in RETURNS_STATUS else None
    return library


def _attention(groups: int, head_dim: int):
    library = _library("decode_attention.c", (f"-DG={groups}", f"-DD={head_dim}"))
    return None if library is None else library.decode_attention


def decode_attention_available(groups: int, head_dim: int) -> bool:
    return _attention(groups, head_dim) is not None


def pointwise_available() -> bool:
    return _library("decode_pointwise.c") is not None


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
    function = _required(_attention(groups, head_dim), "the decode attention kernel is")
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


def _required(loaded, what: str):
    """``loaded`` (a library or function from ``_library``); where it is None, the RuntimeError saying so."""
    if loaded is None:
        raise RuntimeError(f"{what} not available on this machine")
    return loaded


def _pointwise():
    return _required(_library("decode_pointwise.c"), "the decode step's element-wise kernels are")


def _rows(*tensors: torch.Tensor) -> None:
    """bfloat16 CPU tensors of rows whose last dimension is contiguous (row strides are passed)."""
    for x in tensors:
        if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1:
            raise ValueError(f"expected a 2-d bfloat16 CPU tensor with contiguous rows, got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``h += delta`` in place (``delta`` None: h unchanged), then the RMS norm of h times ``weight``
    (transformers' ``LlamaRMSNorm``). ``h`` and ``delta`` contiguous (rows, width); returns (rows, width)."""
    _rows(h, weight[None])
    if not h.is_contiguous() or (delta is not None and (delta.shape != h.shape or not delta.is_contiguous())):
        raise ValueError("add_rms_norm: h and delta must be contiguous and of one shape")
    if delta is not None:
        _rows(delta)
    if weight.shape != h.shape[1:]:
        raise ValueError(f"add_rms_norm: weight {tuple(weight.shape)} for rows of {h.shape[1]}")
    out = torch.empty_like(h)
    _pointwise().add_rms_norm(h.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                              out.data_ptr(), h.shape[0], h.shape[1], eps, torch.get_num_threads())
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` of two (rows, width) views with one row stride (the halves of a stacked product)."""
    _rows(gate, up)
    if gate.shape != up.shape or gate.stride(0) != up.stride(0):
        raise ValueError("silu_mul: gate and up must be of one shape and row stride")
    out = gate.new_empty(gate.shape)
    _pointwise().silu_mul(gate.data_ptr(), up.data_ptr(), gate.stride(0), out.data_ptr(), *gate.shape,
                          torch.get_num_threads())
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
    """The rotary embedding of (rows, heads * d) ``x`` (a view: any row stride) with (rows, d) ``cos`` and
    ``sin`` (transformers' ``apply_rotary_pos_emb``, bfloat16). Returns (rows, heads, d), contiguous."""
    _rows(x)
    rows, d = x.shape[0], x.shape[1] // heads
    if x.shape[1] != heads * d or d % 2 or cos.shape != (rows, d) or sin.shape != (rows, d):
        raise ValueError(f"rotary: x {tuple(x.shape)} as {heads} heads, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    _rows(cos, sin)
    out = x.new_empty(rows, heads, d)
    _pointwise().rotary(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), rows, heads, d,
                        torch.get_num_threads())
    return out


def top_candidates_available() -> bool:
    return _library("top_candidates.c") is not None


def top_candidates(logits: torch.Tensor, k: int, temperature: float):
    """Each row's ``k`` largest logits and the log-sum-exp of the rest at ``temperature`` (``top_candidates.c``).

    ``logits`` (rows, vocab) bfloat16 on the CPU, rows contiguous. Returns (values (rows, k) float32, ids
    (rows, k) int64, each row's in increasing id; rest (rows,) float64: log sum over the other tokens of
    exp(logit / temperature)). Of logits equal to the k-th value the lowest ids are taken."""
    _rows(logits)
    rows, vocab = logits.shape
    if not 0 < k <= vocab or temperature <= 0:
        raise ValueError(f"top_candidates: k {k} of {vocab} logits at temperature {temperature}")
    library = _required(_library("top_candidates.c"), "the sampler's kernel is")
    values, ids = torch.empty(rows, k), torch.empty(rows, k, dtype=torch.int64)
    rest = torch.empty(rows, dtype=torch.float64)
    if library.top_candidates(logits.data_ptr(), rows, vocab, logits.stride(0), k, temperature, values.data_ptr(),
                              ids.data_ptr(), rest.data_ptr(), torch.get_num_threads()):
        raise MemoryError("top_candidates: no memory for its heaps")
    return values, ids, rest
