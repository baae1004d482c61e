"""The compiled sparsification kernel (`_introselect.c`), built on first use.

It replays libstdc++'s std::sort (what torch's CPU sort runs) only on the ranges that decide
which entries fall before a cut, so it keeps exactly the entries mergekit keeps, in linear
time and 6-8 bytes per element instead of a full sort's 20. It is compiled with the system's
C compiler into a cache folder (`$REMERGE_CACHE`, default `~/.cache/remerge`); where there is
no compiler, or with `REMERGE_NATIVE=0`, remerge uses torch's sort itself (same result, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_introselect.c")
# dtype -> (kernel, key dtype, +inf bits, key for every NaN)
KERNELS = {
    torch.bfloat16: ("remerge_select16", torch.int16, 0x7F80, 0x7FFF),
    torch.float16: ("remerge_select16", torch.int16, 0x7C00, 0x7FFF),
    torch.float32: ("remerge_select32", torch.int32, 0x7F800000, 0x7FFFFFFF),
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
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, target)  # several processes may build at once: the last one wins
    finally:
        Path(tmp).unlink(missing_ok=True)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The kernel library, built if needed; None where it cannot be (torch's sort is used)."""
    if os.environ.get("REMERGE_NATIVE", "1") == "0":
        return None
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    target = cache_dir() / f"introselect-{digest}.so"
    try:
        if not target.is_file():
            _compile(target)
        lib = ctypes.CDLL(str(target))  # ctypes releases the GIL during calls
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        log.warning("sparsification kernel unavailable (%s); using torch's sort (slower, same result)", detail)
        return None
    for name in ("remerge_select16", "remerge_select32"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32]
    return lib


def zero_outside(delta: torch.Tensor, descending: bool, lo: int, hi: int) -> bool:
    """Set to +0 every entry of `delta` (contiguous, in place) whose position in mergekit's
    ranking of |delta| is outside [lo, hi). False when the kernel cannot do it (then nothing
    was changed and the caller ranks with torch)."""
    lib = library()
    spec = KERNELS.get(delta.dtype)
    n = delta.numel()
    if lib is None or spec is None or not delta.is_contiguous() or not 0 < n < 2**31:
        return False
    name, key_dtype, inf, nan_key = spec
    keys = torch.empty(n, dtype=key_dtype)
    order = torch.empty(n, dtype=torch.int32)
    rc = getattr(lib, name)(delta.data_ptr(), n, int(descending), lo, hi, keys.data_ptr(),
                            order.data_ptr(), inf, nan_key)
    return rc == 0


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
