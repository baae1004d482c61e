"""Safetensors files: lazy reading of model folders, streaming atomic writing of shards.

Reading: a model folder's tensors are listed from its headers only (`model.safetensors.index.json`
or the `*.safetensors` files); a tensor, or a range of its rows, is mapped when asked for, so a
shard job holds one tensor (or one chunk of rows) per input at a time. Every header is checked
up front (length, JSON, dtypes, offsets within the file) so that a truncated or garbage shard
fails with its file named before any work is done.

A folder may also hold composed tensors (`ModelFolder.compose`): a name the files do not
store, whose bytes are those of several stored tensors one after the other (Mixtral's experts,
stored one by one, read as the fused tensor mergekit merges). Reading one, or rows of it,
copies just those bytes from its parts into a fresh buffer.

Writing: the header of an output shard is known from the plan (names, dtypes, shapes), so
`ShardWriter` writes it first and then each tensor at its offset, in any order (a large tensor
may come in pieces, in order); the file appears under its final name only when complete
(temporary name + `os.replace`). The bytes equal those of
`safetensors.torch.save_file(tensors, path, metadata)`.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from remerge.errors import ModelError
from remerge.io.files import write_bytes_atomic  # noqa: F401  (re-exported)
from remerge.io.layout import ELEMENT_SIZES, INDEX_NAME

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

if TYPE_CHECKING:
    import numpy
    import torch

# safetensors dtype names <-> torch dtype names (torch is imported only where tensors are made)
DTYPE_NAMES: dict[str, str] = {
    "BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8",
    "U8": "uint8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool",
}
ST_NAMES: dict[str, str] = {v: k for k, v in DTYPE_NAMES.items()}


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a safetensors ("BF16") or torch ("bfloat16") dtype name."""
    import torch

    return getattr(torch, DTYPE_NAMES.get(name, name))


def st_name(dtype: "torch.dtype") -> str:
    return ST_NAMES[str(dtype).removeprefix("torch.")]


def element_size(dtype: str) -> int:
    return ELEMENT_SIZES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the file header alone."""

    name: str
    file: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int = 0  # where its bytes start in the file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


@dataclass(frozen=True)
class ComposedInfo(TensorInfo):
    """A tensor the files do not store: the bytes of `parts` (stored tensors of its dtype), one
    after the other, in its shape. `file` is its first part's (for messages)."""

    parts: tuple[TensorInfo, ...] = ()


# A range [start, stop) of a tensor's first dimension: a contiguous run of its bytes.
Rows = tuple[int, int]


def row_span(shape: tuple[int, ...], rows: Rows | None) -> tuple[int, int, tuple[int, ...]]:
    """Where rows [start, stop) of a tensor of `shape` lie: (first element, element count, their
    shape). `rows` None: the whole tensor (a 0-d tensor has no rows)."""
    numel = 1
    for d in shape:
        numel *= d
    if rows is None:
        return 0, numel, tuple(shape)
    start, stop = rows
    if not shape or not 0 <= start <= stop <= shape[0]:
        raise ValueError(f"rows {rows} of a tensor of shape {tuple(shape)}")
    row = numel // shape[0] if shape[0] else 0
    return start * row, (stop - start) * row, (stop - start, *shape[1:])


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of a safetensors file's header, checked against the file's size,
    and where the data starts (8 + header length)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ModelError(
                    f"{path}: not a safetensors file or truncated (header of {n} bytes in a "
                    f"file of {size}); download or copy it again"
                )
            header = json.loads(f.read(n))
    except OSError as err:
        raise ModelError(f"{path}: cannot read: {err.strerror}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: safetensors header is not valid JSON ({err}); "
                         "the file is damaged: download or copy it again") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        _check_entry(path, name, entry, data_size)
    _check_tiling(path, header, data_size)
    return header, 8 + n


def _check_entry(path: Path, name: str, entry: dict, data_size: int) -> None:
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{path}: malformed header entry for tensor {name}") from None
    if dtype not in DTYPE_NAMES:
        raise ModelError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    numel = 1
    for d in shape:
        numel *= d
    if end - start != numel * element_size(dtype) or end > data_size:
        raise ModelError(
            f"{path}: tensor {name} ends at byte {end} but the file holds {data_size} bytes "
            "of data: the file is truncated or damaged; download or copy it again"
        )


def _check_tiling(path: Path, header: dict[str, dict], data_size: int) -> None:
    """The tensors' byte ranges must cover the data exactly, without overlap or gap (as
    safetensors' own loader demands): otherwise two tensors could share bytes unnoticed."""
    end = 0
    for name, entry in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        start, stop = entry["data_offsets"]
        if start != end:
            raise ModelError(
                f"{path}: tensor {name} starts at data offset {start}, expected {end} "
                f"({'overlapping' if start < end else 'a gap after'} the previous tensor): the "
                "header is damaged; download or copy the file again"
            )
        end = stop
    if end != data_size:
        raise ModelError(f"{path}: the tensors end at data offset {end} but the file holds "
                         f"{data_size} bytes of data: the file is damaged; copy it again")


class ModelFolder:
    """The safetensors weights of one model folder, read lazily.

    `label` names the model in messages (its recipe reference). Construction reads and
    checks every header; `load(name)` reads one tensor. `composed`: the composed tensors to
    add (as `composed` records them: name -> {"shape": [...], "parts": [stored names]}).
    """

    def __init__(self, path: str | Path, label: str | None = None,
                 composed: Mapping[str, Mapping[str, Any]] | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._weight_files():
            header, data_start = read_header(file)
            for name, entry in header.items():
                if name in self.tensors:
                    raise ModelError(f"model {self.label}: tensor {name} is in both "
                                     f"{self.tensors[name].file.name} and {file.name}")
                self.tensors[name] = TensorInfo(name, file, entry["dtype"], tuple(entry["shape"]),
                                                data_start + entry["data_offsets"][0])
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.composed: dict[str, dict[str, list]] = {}  # name -> {"shape", "parts"}, as added
        for name, entry in (composed or {}).items():
            self.compose(name, entry["shape"], entry["parts"])

    def compose(self, name: str, shape: Sequence[int], parts: Sequence[str]) -> None:
        """Add a composed tensor: `name`, of `shape`, whose bytes are those of the stored
        tensors `parts` one after the other (all of one dtype, as many elements in all)."""
        infos = tuple(self.info(p) for p in parts)
        if name in self.tensors or not infos or any(isinstance(i, ComposedInfo) for i in infos):
            raise ValueError(f"model {self.label}: cannot compose {name} of {list(parts)}")
        info = ComposedInfo(name, infos[0].file, infos[0].dtype, tuple(shape), parts=infos)
        dtypes = sorted({i.dtype for i in infos})
        if len(dtypes) > 1 or sum(i.numel for i in infos) != info.numel:
            raise ModelError(
                f"model {self.label}: cannot read {name} from {', '.join(parts)} (dtypes "
                f"{', '.join(dtypes)}, {sum(i.numel for i in infos)} elements for the shape "
                f"{list(shape)}): they must share one dtype and hold its elements exactly")
        self.tensors[name] = info
        self.composed[name] = {"shape": list(shape), "parts": list(parts)}

    def _weight_files(self) -> list[Path]:
        if not self.path.is_dir():
            raise ModelError(f"model {self.label}: folder {self.path} does not exist")
        index = self.path / INDEX_NAME
        if index.is_file():
            return self._indexed_files(index)
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in self.path.glob(pat))
        if pickles:
            raise ModelError(
                f"model {self.label} ({self.path}) has only pickle weights ({', '.join(pickles)}). "
                "remerge reads safetensors only: loading a pickle can execute arbitrary code. "
                "Use a revision of the model that has .safetensors files, or convert it "
                "yourself in a trusted sandbox (e.g. transformers' save_pretrained(..., "
                "safe_serialization=True))."
            )
        raise ModelError(f"model {self.label}: no *.safetensors weights in {self.path}")

    def _indexed_files(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelError(f"model {self.label}: unreadable index {index}: {err}") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (self.path / name).is_file():
                raise ModelError(
                    f"model {self.label}: {index} names shard {name}, which is missing from "
                    f"{self.path}; download the model again"
                )
        return [self.path / name for name in files]

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(
                f"tensor {name} is missing from model {self.label} ({self.path})"
            ) from None

    def load(self, name: str) -> "torch.Tensor":
        """Read one tensor with a positioned read into a fresh buffer (no mmap: the file's
        pages never count as this process's memory). Safe to call from several threads."""
        import torch

        info = self.info(name)
        if isinstance(info, ComposedInfo):
            return self.view(name)  # a fresh buffer already
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        self._pread(info, buffer.numpy(), 0)
        return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)

    def _pread(self, info: TensorInfo, buffer: "numpy.ndarray", at: int) -> None:
        """Fill `buffer` (bytes) with the tensor's bytes from its byte `at` on."""
        want = buffer.nbytes
        got = os.preadv(self._fd(info.file), [buffer], info.offset + at) if want else 0
        if got != want:
            raise ModelError(f"model {self.label}: {info.file} ended while reading tensor {info.name} "
                             f"({got} of {want} bytes): the file is truncated; copy it again")

    @staticmethod
    def _spans(info: ComposedInfo, first: int, count: int):
        """The parts holding elements [first, first + count) of a composed tensor: (part, its
        first element wanted, how many, where they go among the `count`)."""
        start = 0
        for part in info.parts:
            lo, hi = max(first, start), min(first + count, start + part.numel)
            if lo < hi:
                yield part, lo - start, hi - lo, lo - first
            start += part.numel

    def _gather(self, info: ComposedInfo, first: int, count: int) -> "numpy.ndarray":
        """Elements [first, first + count) of a composed tensor: their bytes (uint8), read from
        its parts into a fresh buffer of just that size."""
        import numpy as np

        width = element_size(info.dtype)
        out = np.empty(count * width, dtype=np.uint8)
        for part, at, n, to in self._spans(info, first, count):
            self._pread(part, out[to * width:(to + n) * width], at * width)
        return out

    def _map(self, info: TensorInfo, first: int, count: int) -> tuple[mmap.mmap, int]:
        """A read-only mapping of just the pages of elements [first, first + count) of this
        tensor, and where their bytes start in it."""
        width = element_size(info.dtype)
        begin = info.offset + first * width
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(self._fd(info.file), begin + count * width - start, offset=start,
                           access=mmap.ACCESS_READ)
        return mapped, begin - start

    def view(self, name: str, rows: Rows | None = None) -> "torch.Tensor":
        """One tensor, or rows [start, stop) of its first dimension, as a read-only view of the
        file's pages (mmap of just those bytes): no copy, and the pages are unmapped as soon as
        the tensor is dropped, so only tensors in use count as this process's memory. Never
        write to the result."""
        import torch

        info = self.info(name)
        first, count, shape = row_span(info.shape, rows)
        if count == 0:
            return torch.empty(shape, dtype=torch_dtype(info.dtype))
        if isinstance(info, ComposedInfo):  # a copy of those rows (writable; still never write)
            data = torch.from_numpy(self._gather(info, first, count))
            return data.view(torch_dtype(info.dtype)).reshape(shape)
        mapped, offset = self._map(info, first, count)
        with warnings.catch_warnings():  # torch warns that the buffer is read-only: we know
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(mapped, dtype=torch.uint8, count=count * element_size(info.dtype),
                                   offset=offset)
        return raw.view(torch_dtype(info.dtype)).reshape(shape)

    def raw(self, name: str, rows: Rows | None = None) -> "numpy.ndarray":
        """One tensor's bytes, or those of rows [start, stop), as a read-only flat numpy array of
        its element width (uint16 for bf16), mapped like `view`: for kernels that need no torch."""
        import numpy as np

        info = self.info(name)
        width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[element_size(info.dtype)]
        first, count, _ = row_span(info.shape, rows)
        if count == 0:
            return np.empty(0, dtype=width)
        if isinstance(info, ComposedInfo):
            return self._gather(info, first, count).view(width)
        mapped, offset = self._map(info, first, count)
        return np.frombuffer(mapped, dtype=width, count=count, offset=offset)

    def prefetch(self, name: str, rows: Rows | None = None) -> None:
        """Have the kernel start reading a tensor's pages (or those of rows [start, stop)) into
        the page cache without waiting for them: the next chunk is read while this one is
        computed. Costs this process no memory."""
        info = self.info(name)
        first, count, _ = row_span(info.shape, rows)
        width = element_size(info.dtype)
        spans = (self._spans(info, first, count) if isinstance(info, ComposedInfo)
                 else [(info, first, count, 0)])
        for part, at, n, _ in spans:
            if n and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd(part.file), part.offset + at * width, n * width,
                                 os.POSIX_FADV_WILLNEED)

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                try:
                    self._fds[file] = os.open(file, os.O_RDONLY)
                except OSError as err:
                    raise ModelError(f"model {self.label}: cannot open {file}: {err.strerror}") from None
            return self._fds[file]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        if hasattr(self, "_fds"):  # construction may have failed on a bad header
            self.close()


# --- writing ------------------------------------------------------------------------------


def _alignment(dtype: str) -> int:
    return element_size(dtype)


def shard_layout(
    tensors: Sequence[tuple[str, str, Sequence[int]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes and data offsets of a shard, in the order safetensors writes them.

    tensors: (name, safetensors dtype, shape). safetensors orders entries by alignment
    (larger element size first), then by name; the JSON has no spaces and is padded with
    spaces to a multiple of 8 bytes.
    """
    ordered = sorted(tensors, key=lambda t: (-_alignment(t[1]), t[0]))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in ordered:
        numel = 1
        for d in shape:
            numel *= d
        end = pos + numel * element_size(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, end]}
        offsets[name] = (pos, end)
        pos = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class ShardWriter:
    """Writes one safetensors shard tensor by tensor, atomically, on a background thread.

    Usage: `with ShardWriter(path, layout) as w: w.write(name, tensor) ...`. `write` hands the
    tensor to a writer thread (at most `queue` tensors or pieces wait), so the caller computes
    the next one while this one goes to disk. A tensor may be handed over whole or in pieces
    (`write_raw(name, piece, start)`, in order, without gaps); its digest is the sha256 of all
    its bytes either way. On leaving the block without error every tensor must have been
    written in full; the file is then flushed, fsynced and renamed into place. On error the
    temporary file is removed.
    """

    def __init__(self, path: str | Path, tensors: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None, digests: bool = False, queue: int = 1):
        self.path = Path(path)
        # sha256 of each tensor's bytes, when asked (for provenance)
        self.digests: dict[str, str] | None = {} if digests else None
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.header, self.offsets = shard_layout(tensors, metadata)
        self.expected = {name: (dtype, tuple(shape)) for name, dtype, shape in tensors}
        self.written: set[str] = set()  # tensors on disk in full
        self._handed: dict[str, int] = {}  # bytes of each tensor handed over (caller's thread)
        self._done: dict[str, int] = {}  # bytes of each tensor written (writer's thread)
        self._hashes: dict[str, Any] = {}  # sha256 of the bytes written so far, when asked
        self._file = None
        self._queue: Queue = Queue(maxsize=queue)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> "ShardWriter":
        self._file = open(self.tmp, "wb")
        self._file.write(self.header)
        self._thread = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
        self._thread.start()
        return self

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        dtype, shape = self.expected[name]
        if st_name(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {name}: computed {tensor.dtype} {tuple(tensor.shape)}, "
                f"planned {dtype} {shape}"
            )
        import torch

        self.write_raw(name, tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())

    def write_raw(self, name: str, data: Any, start: int = 0) -> None:
        """Hand over a tensor's bytes (any buffer, e.g. a numpy array) in safetensors order:
        all of them, or the next piece, from element `start` on (the pieces of a tensor come in
        order, each starting where the previous one ended)."""
        dtype, shape = self.expected[name]
        width = element_size(dtype)
        total = width
        for d in shape:
            total *= d
        nbytes, done = memoryview(data).nbytes, self._handed.get(name, 0)
        if name in self._handed and done == total:
            raise ValueError(f"tensor {name}: handed over twice")
        if start * width != done or done + nbytes > total:
            raise ValueError(f"tensor {name}: {nbytes} bytes from element {start}, planned {total} "
                             f"bytes in all, {done} of them handed over so far")
        self._handed[name] = done + nbytes
        if self._error is not None:
            raise self._error
        self._queue.put((name, start * width, data))

    def wait(self) -> None:
        """Block until every tensor handed over so far is written (frees their memory)."""
        self._queue.join()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write_now(*item)
                except BaseException as err:  # handed to the caller's thread
                    self._error = err
            del item
            self._queue.task_done()
        self._queue.task_done()

    def _write_now(self, name: str, at: int, data: Any) -> None:
        """Write bytes of tensor `name` from its byte `at` on; hash them after the earlier ones."""
        start, end = self.offsets[name]
        view = memoryview(data).cast("B")
        self._file.seek(len(self.header) + start + at)
        self._file.write(view)
        if self.digests is not None:
            self._hashes.setdefault(name, hashlib.sha256()).update(view)
        self._done[name] = self._done.get(name, 0) + len(view)
        if self._done[name] == end - start:
            self.written.add(name)
            if self.digests is not None:
                self.digests[name] = self._hashes.pop(name).hexdigest()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._queue.put(None)
        self._thread.join()
        f, self._file = self._file, None
        try:
            if exc_type is None:
                if self._error is not None:
                    raise self._error
                missing = sorted(set(self.expected) - self.written)
                if missing:
                    raise ValueError(f"{self.path}: tensors never written in full: {missing[:5]}")
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(self.tmp, self.path)
        finally:
            f.close()
            self.tmp.unlink(missing_ok=True)  # nothing left after a successful rename
        return False  # an error inside the block propagates
