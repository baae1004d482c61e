"""The compiled kernels (`_introselect.c`), built on first use.

- Selection: it replays libstdc++'s std::sort (what torch's CPU sort runs) only on the ranges
  that decide which entries fall before a cut, so it keeps exactly the entries mergekit keeps
  (TIES, breadcrumbs), in linear time and 6-8 bytes per element instead of a full sort's 20;
  the whole sort replayed gives DELLA's ranks (`rank_rows`) without torch's second sort.
- Fused arithmetic, each checked against torch's own steps on this machine before first use
  (`verified`): the seed's `base + (x - base)`, the TIES-family combination of the task
  vectors (`task_arithmetic.fused_combine`) and DARE's / DELLA's draws from torch's MT19937
  stream (`sparsify.dare_`).

It is compiled with the system's C compiler into a cache folder (`$REMERGE_CACHE`, default
`~/.cache/remerge`); where there is no compiler, or with `REMERGE_NATIVE=0`, remerge uses
torch itself (same result, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import numpy
    import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_introselect.c")
# -ftree-vectorize: the fused difference runs in SIMD registers (the same IEEE float32 ops:
# no fast-math, and no multiply that could be contracted into an FMA)
CFLAGS = ("-O2", "-ftree-vectorize", "-shared", "-fPIC")
# dtype -> (kernel, key dtype, +inf bits, key for every NaN)
KERNELS = {
    "bfloat16": ("remerge_select16", "int16", 0x7F80, 0x7FFF),
    "float16": ("remerge_select16", "int16", 0x7C00, 0x7FFF),
    "float32": ("remerge_select32", "int32", 0x7F800000, 0x7FFFFFFF),
}


def cache_dir() -> Path:
    return Path(os.environ.get("REMERGE_CACHE", Path.home() / ".cache" / "remerge"))


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, *CFLAGS, "-o", tmp, str(SOURCE)],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, target)  # several processes may build at once: the last one wins
    finally:
        Path(tmp).unlink(missing_ok=True)


def build_id() -> str:
    """What the built library depends on: the source and the flags (names its cache files)."""
    return hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The kernel library, built if needed; None where it cannot be (torch's sort is used)."""
    if os.environ.get("REMERGE_NATIVE", "1") == "0":
        return None
    target = cache_dir() / f"introselect-{build_id()}.so"
    try:
        if not target.is_file():
            _compile(target)
        lib = ctypes.CDLL(str(target))  # ctypes releases the GIL during calls
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        log.warning("sparsification kernel unavailable (%s); using torch's sort (slower, same result)", detail)
        return None
    p, i64, c_int, u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32
    for name in ("remerge_select16", "remerge_select32"):
        fn = getattr(lib, name)
        fn.restype = c_int
        fn.argtypes = [p, i64, c_int, i64, i64, p, p, u32, u32]
        rank = getattr(lib, name + "_rank")
        rank.restype = c_int
        rank.argtypes = [p, i64, i64, c_int, p, p, p, u32, u32]
    return lib


def zero_outside(delta: "torch.Tensor", descending: bool, lo: int, hi: int) -> bool:
    """Set to +0 every entry of `delta` (contiguous, in place) whose position in mergekit's
    ranking of |delta| is outside [lo, hi). False when the kernel cannot do it (then nothing
    was changed and the caller ranks with torch)."""
    import torch

    lib = library()
    spec = KERNELS.get(str(delta.dtype).removeprefix("torch."))
    n = delta.numel()
    if lib is None or spec is None or not delta.is_contiguous() or not 0 < n < 2**31:
        return False
    name, key_dtype, inf, nan_key = spec
    keys = torch.empty(n, dtype=getattr(torch, key_dtype))
    order = torch.empty(n, dtype=torch.int32)
    rc = getattr(lib, name)(delta.data_ptr(), n, int(descending), lo, hi, keys.data_ptr(),
                            order.data_ptr(), inf, nan_key)
    return rc == 0


def rank_rows(delta: "torch.Tensor", descending: bool, pool: Any = None) -> "torch.Tensor | None":
    """Each entry's position in torch's sort of |delta| along its rows, `(rows, n)` int32:
    `torch.argsort(delta.abs(), dim=1).argsort(dim=1)`, bit for bit (the same sort replayed,
    then inverted in one pass instead of a second sort); the rows split in two on `pool`
    (each half with its own scratch). None where the kernel cannot do it."""
    import torch

    lib = library()
    spec = KERNELS.get(str(delta.dtype).removeprefix("torch."))
    if lib is None or spec is None or delta.dim() != 2 or not delta.is_contiguous() \
            or not 0 < delta.shape[1] < 2**31:
        return None
    name, key_dtype, inf, nan_key = spec
    rows, n = delta.shape
    ranks = torch.empty((rows, n), dtype=torch.int32)
    fn = getattr(lib, name + "_rank")

    def run(part: tuple[int, int]) -> int:
        first, end = part
        keys = torch.empty(n, dtype=getattr(torch, key_dtype))
        order = torch.empty(n, dtype=torch.int32)
        return fn(delta[first].data_ptr(), end - first, n, int(descending), ranks[first].data_ptr(),
                  keys.data_ptr(), order.data_ptr(), inf, nan_key)

    halves = parts(rows, 2, smallest=max(1, (1 << 16) // n)) if pool is not None else [(0, rows)]
    codes = list(pool.map(run, halves)) if len(halves) > 1 else [run(h) for h in halves]
    return None if any(codes) else ranks


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@lru_cache(maxsize=1)
def tame_malloc(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold at 1 MB for this process.

    glibc raises the threshold after each large free (up to 32 MB); buffers below it then come
    from the heap and, freed, stay there, so a merge's resident memory grows by fragmentation
    (measured: 1.06 GB instead of 0.87 GB on a 117M-parameter 3-model TIES). With a fixed
    threshold every large tensor buffer goes back to the system when freed. A no-op elsewhere.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def _machine() -> dict[str, str]:
    """What the kernel's agreement with torch depends on: torch's build and the CPU."""
    import importlib.metadata

    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return {"torch": importlib.metadata.version("torch"),
            "cpu": hashlib.sha256(flags.encode()).hexdigest()[:16]}


def _agrees_with_torch(fn: Any) -> bool:
    """Run the fused kernel and torch's own bf16 ops on subnormal, ordinary and huge values."""
    import torch

    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1e-39, 1e-38, 1e-3, 1.0, 3e38]).repeat_interleave(20_000)
    x = (torch.randn(scale.numel(), generator=g) * scale).bfloat16()
    base = (torch.randn(scale.numel(), generator=g) * scale).bfloat16()
    finite = torch.isfinite(x - base)
    x, base = x[finite].contiguous(), base[finite].contiguous()
    expected = base + (x - base)
    out = torch.empty_like(x)
    if fn(x.data_ptr(), base.data_ptr(), out.data_ptr(), x.numel()) != 0:
        return False
    return torch.equal(out.view(torch.int16), expected.view(torch.int16))


def verified(name: str, argtypes: list, agrees: "Callable[[Any], bool]") -> Any:
    """Kernel `name` of the library, once `agrees(fn)` found it equal to torch's own
    arithmetic on this machine (the verdict is cached per kernel, torch version and CPU, so
    later runs need no check); None where it disagrees or cannot be built."""
    lib = library()
    if lib is None:
        return None
    fn = getattr(lib, name)
    fn.restype = ctypes.c_int
    fn.argtypes = argtypes
    verdict = cache_dir() / f"introselect-{build_id()}.{name}.verified.json"
    machine = _machine()
    try:
        if json.loads(verdict.read_text()) == machine:
            return fn
    except (OSError, ValueError):
        pass
    if not agrees(fn):
        log.warning("the fused kernel %s differs from torch on this machine; not used", name)
        return None
    verdict.write_text(json.dumps(machine))
    return fn


@lru_cache(maxsize=1)
def plain_difference_kernel() -> Any:
    """The fused bf16 `base + (x - base)` (checked against torch: `verified`)."""
    p = ctypes.c_void_p
    return verified("remerge_plain_difference_bf16", [p, p, p, ctypes.c_int64], _agrees_with_torch)


def parts(n: int, chunks: int, smallest: int = 1 << 16) -> list[tuple[int, int]]:
    """[0, n) in up to `chunks` ranges of at least `smallest` elements (one kernel call each)."""
    step = max(smallest, -(-n // max(1, chunks)))
    return [(start, min(n, start + step)) for start in range(0, n, step)]


def run_parts(run: "Callable[[tuple[int, int]], int]", n: int, pool: Any, chunks: int) -> bool:
    """`run` over the `parts` of [0, n), on `pool` where there are several; False if any
    part returned nonzero (a kernel met a value it leaves to torch)."""
    ranges = parts(n, chunks)
    codes = list(pool.map(run, ranges)) if pool is not None and len(ranges) > 1 else [run(r) for r in ranges]
    return not any(codes)


def _run_plain(fn: Any, x: int, base: int, out: int, n: int, pool: Any, chunks: int) -> bool:
    """The kernel over [0, n) in up to `chunks` parts (2-byte elements); False if any part
    met a non-finite difference."""
    run = lambda p: fn(x + 2 * p[0], base + 2 * p[0], out + 2 * p[0], p[1] - p[0])  # noqa: E731
    return run_parts(run, n, pool, chunks)


def plain_difference_raw(x: "numpy.ndarray", base: "numpy.ndarray", pool: Any = None,
                         chunks: int = 2) -> "numpy.ndarray | None":
    """The same on the raw bf16 bits (uint16 arrays), without torch."""
    import numpy as np

    fn = plain_difference_kernel()
    if fn is None:
        return None
    out = np.empty_like(base)
    ok = _run_plain(fn, x.ctypes.data, base.ctypes.data, out.ctypes.data, base.size, pool, chunks)
    return out if ok else None
