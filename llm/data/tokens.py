"""Pre-tokenized token files, memory-mapped and never copied into RAM, served as ``seq_len + 1`` windows.

A corpus tokenized elsewhere (nanoGPT's ``prepare.py``, llm.c's ``dev/data`` scripts, numpy) trains
as it lies on disk: no tokenizer is built, nothing is re-tokenized, and a batch reads only its own
windows' pages of the files.

Sources (``data.source``), recognised by ``is_token_source``:

* a file ending in ``.bin`` or ``.npy``;
* a directory holding ``.bin`` / ``.npy`` files at its top level (those, sorted by name; other
  files, like nanoGPT's ``prepare.py`` or ``meta.pkl``, are ignored);
* a glob ending in ``.bin`` or ``.npy`` (``**`` recursive; sorted).

Formats (``open_token_file``):

* ``.npy``: a 1-D integer array, opened with ``np.load(mmap_mode="r")``.
* ``.bin`` starting with an llm.c header: 256 little-endian int32, ``[0]`` the magic, ``[1]`` the
  version, ``[2]`` the token count, tokens after byte 1024. ``LLMC_HEADERS`` lists the known
  (magic, version) pairs: ``(20240520, 1)`` uint16 (GPT-2 shards), ``(20240801, 7)`` uint32
  (llama-3 shards). The count must match the file's size.
* any other ``.bin``: headerless little-endian tokens of ``data.token_dtype`` (``uint16``, as
  nanoGPT writes them, or ``uint32``); the byte count must be a whole number of tokens.

Splits. A val file is one whose stem is ``val`` or holds ``val`` as a word separated by ``_``, ``-``
or ``.`` (nanoGPT's ``val.bin``, llm.c's ``fineweb_val_000000.bin``); a one-file source
``train.bin`` (or ``.npy``) takes the ``val`` file of the same suffix beside it. With val files,
they are the val split and every other file is train (``val_fraction`` is not used); without, the
last ``int(val_fraction * N)`` of the ``N`` tokens of the files in order are val (a tail that may
span files) and the rest train. ``val_fraction = 0`` and no val file: no val split.

Items: a split is a list of segments (a file, or the part of one on its side of the tail cut);
windows never cross a segment's end. Segment ``g`` of ``n_g`` tokens holds ``(n_g - 1) // T``
windows (``T = seq_len``); the split's items are those of its segments in order. Train item ``j``
of segment ``g`` in epoch ``e`` starts at ``o_g + j*T``, ``o_g`` drawn per epoch and segment from the
slack after the segment's last whole window; val windows start at 0. ``inputs = window[:-1]``,
``targets = window[1:]``, int64 ``(B, T)``; packing as in ``llm.data.text`` (needs a tokenizer with
an ``<EOS>``).

Vocabulary: the ids must be ``< vocab_size`` (``model.vocab_size``). ``prepare_data()`` (run by
``setup()`` when not yet run) counts every file's ids in chunks of ``COUNT_CHUNK`` tokens and stops
at the first file holding an id out of range, naming it, the id, its index and the vocabulary. The
counts (and a tail split's val counts) are cached under ``<cache_dir>/token-counts/`` keyed by the
file's resolved path, size, mtime, layout and token range, so a second setup, or another rank
after process 0 prepared, reads nothing but the counts; they also give the unigram baseline
(``train_token_counts``) without a pass over the data.

Tokenizer: optional (``data.tokenizer_file``, or the ``training.init_from`` checkpoint's). It only
decodes: without one the run trains on the ids and its text sample is skipped (``setup`` says so
in one log line).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm.data.base import BaseDataModule, Batch, DataError
from llm.data.text import _has_magic, window_batch
from llm.io import write_bytes_atomic

__all__ = ["COUNT_CHUNK", "LLMC_HEADERS", "TOKEN_SUFFIXES", "TokenFile", "TokenFileDataModule", "count_ids",
           "is_token_source", "is_val_file", "open_token_file", "resolve_token_source"]

log = logging.getLogger(__name__)

TOKEN_SUFFIXES = (".bin", ".npy")
RAW_DTYPES = ("uint16", "uint32")
LLMC_HEADER_INTS = 256
LLMC_HEADER_BYTES = 4 * LLMC_HEADER_INTS
LLMC_HEADERS: dict[tuple[int, int], str] = {(20240520, 1): "uint16", (20240801, 7): "uint32"}
LLMC_MAGICS = frozenset(magic for magic, _ in LLMC_HEADERS)
COUNT_CHUNK = 1 << 22  # tokens per bincount: 32 MB of int64 at a time, whatever the file's size
_COUNTS_FORMAT = "llm-token-counts-v1"
SPLIT_RULE = "val-files-or-tail"  # part of the fingerprint: a resume needs the same split
_VAL_WORD = re.compile(r"(^|[_.-])val([_.-]|$)")
_IDENTITY_BYTES = 1 << 16  # head and tail of each file hashed into the fingerprint


# ---------------------------------------------------------------------- finding files
def _top_level_token_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.suffix in TOKEN_SUFFIXES and not p.name.startswith("."))


def is_token_source(source: str) -> bool:
    """Whether ``data.source`` names token files (see the module docstring), not text."""
    if source in ("stdlib", "synthetic"):
        return False
    path = Path(source).expanduser()
    if path.is_dir():
        return bool(_top_level_token_files(path))
    return path.suffix in TOKEN_SUFFIXES  # a file, a glob, or a missing path (then named by setup)


def is_val_file(path: Path) -> bool:
    """A file of the val split by its name: stem ``val`` or a ``val`` word in it."""
    return bool(_VAL_WORD.search(path.stem))


def resolve_token_source(source: str) -> tuple[list[Path], list[Path]]:
    """(train files, val files) of a token source, each in sorted order; val may be empty."""
    path = Path(source).expanduser()
    if path.is_file() or (path.suffix and not path.exists() and not _has_magic(source)):
        val = path.with_name("val" + path.suffix)
        if path.stem == "train" and val.is_file():
            return [path], [val]
        return [path], []  # a missing file is named by open_token_file
    if path.is_dir():
        files = _top_level_token_files(path)
        if not files:
            raise DataError(f"data.source={source!r}: the directory holds no .bin or .npy files")
    else:
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)
                       if os.path.isfile(p))
        if not files:
            raise DataError(f"data.source={source!r}: the glob matched no files")
    val = [p for p in files if is_val_file(p)]
    return [p for p in files if not is_val_file(p)], val


# ---------------------------------------------------------------------- one file
@dataclass(frozen=True)
class TokenFile:
    """Where a file's tokens lie: ``num_tokens`` of ``dtype`` from byte ``offset`` (``layout`` says
    which format it was read as: ``npy``, ``llm.c v<version>`` or ``raw``)."""

    path: Path
    dtype: str
    offset: int
    num_tokens: int
    layout: str

    def tokens(self) -> np.memmap:
        """The tokens, a read-only memmap (nothing is read until indexed)."""
        if self.layout == "npy":
            return np.load(self.path, mmap_mode="r")
        return np.memmap(self.path, dtype=np.dtype(self.dtype).newbyteorder("<"), mode="r",
                         offset=self.offset, shape=(self.num_tokens,))

    def identity(self) -> str:
        """sha256 of the layout, the size and the head and tail bytes: cheap, and changes with the data."""
        digest = hashlib.sha256(f"{self.layout}:{self.dtype}:{self.num_tokens}".encode())
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            digest.update(f.read(_IDENTITY_BYTES))
            f.seek(max(0, size - _IDENTITY_BYTES))
            digest.update(f.read(_IDENTITY_BYTES))
        return digest.hexdigest()


def open_token_file(path: str | os.PathLike, raw_dtype: Any = "uint16") -> TokenFile:
    """Read a token file's layout (see the module docstring); a DataError names the file on a
    missing, empty, misshaped or unknown one. ``raw_dtype`` is the dtype of a headerless ``.bin``."""
    path = Path(path)
    raw_dtype = str(getattr(raw_dtype, "value", raw_dtype))
    if raw_dtype not in RAW_DTYPES:
        raise DataError(f"data.token_dtype={raw_dtype!r} must be one of {', '.join(RAW_DTYPES)}")
    if path.suffix not in TOKEN_SUFFIXES:
        raise DataError(f"token file {path}: unknown extension {path.suffix!r} (expected .bin or .npy)")
    if not path.is_file():
        raise DataError(f"token file {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"token file {path} is empty")
    if path.suffix == ".npy":
        return _open_npy(path)
    with open(path, "rb") as f:
        head = f.read(LLMC_HEADER_BYTES)
    if len(head) == LLMC_HEADER_BYTES:
        header = np.frombuffer(head, dtype="<i4")
        if int(header[0]) in LLMC_MAGICS:
            return _open_llmc(path, header, size)
    itemsize = np.dtype(raw_dtype).itemsize
    if size % itemsize:
        raise DataError(f"token file {path}: {size} bytes is not a whole number of data.token_dtype="
                        f"{raw_dtype} tokens ({itemsize} bytes each)")
    return TokenFile(path, raw_dtype, 0, size // itemsize, "raw")


def _open_npy(path: Path) -> TokenFile:
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"token file {path} is not a readable .npy array ({e})") from None
    if array.ndim != 1 or array.dtype.kind not in "ui":
        raise DataError(f"token file {path} holds a {array.dtype} array of shape {array.shape}; "
                        "expected one dimension of integer token ids")
    if len(array) == 0:
        raise DataError(f"token file {path} is empty (a .npy of 0 tokens)")
    return TokenFile(path, array.dtype.name, int(array.offset), len(array), "npy")


def _open_llmc(path: Path, header: np.ndarray, size: int) -> TokenFile:
    magic, version, count = (int(v) for v in header[:3])
    dtype = LLMC_HEADERS.get((magic, version))
    if dtype is None:
        known = ", ".join(f"{m} v{v}" for m, v in LLMC_HEADERS)
        raise DataError(f"token file {path}: llm.c header magic {magic} with unknown version {version} "
                        f"(known: {known})")
    itemsize = np.dtype(dtype).itemsize
    if count <= 0:
        raise DataError(f"token file {path} is empty (its llm.c header counts {count} tokens)")
    if size - LLMC_HEADER_BYTES != count * itemsize:
        raise DataError(f"token file {path}: the llm.c header counts {count} {dtype} tokens "
                        f"({count * itemsize} bytes) but {size - LLMC_HEADER_BYTES} bytes follow it")
    return TokenFile(path, dtype, LLMC_HEADER_BYTES, count, f"llm.c v{version}")


# ---------------------------------------------------------------------- counting ids
def count_ids(tokens: np.ndarray, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """int64 counts of each id in ``tokens[lo:hi]`` (length: the largest id + 1), read in chunks of
    ``COUNT_CHUNK`` so that at most one chunk is in memory."""
    hi = len(tokens) if hi is None else hi
    counts = np.zeros(0, np.int64)
    for start in range(lo, hi, COUNT_CHUNK):
        chunk = np.asarray(tokens[start:min(start + COUNT_CHUNK, hi)]).astype(np.int64)
        if len(chunk) and chunk.min() < 0:
            raise ValueError(f"negative token id {int(chunk.min())}")
        part = np.bincount(chunk)
        if len(part) > len(counts):
            counts = np.pad(counts, (0, len(part) - len(counts)))
        counts[:len(part)] += part
    return counts


def _first_at_least(tokens: np.ndarray, limit: int) -> int:
    """Index of the first token >= ``limit`` (one is known to exist)."""
    for start in range(0, len(tokens), COUNT_CHUNK):
        hits = np.flatnonzero(np.asarray(tokens[start:start + COUNT_CHUNK]) >= limit)
        if len(hits):
            return start + int(hits[0])
    raise AssertionError("no token at or above the limit")


def _add(a: np.ndarray, b: np.ndarray, sign: int = 1) -> np.ndarray:
    out = np.zeros(max(len(a), len(b)), np.int64)
    out[:len(a)] += a
    out[:len(b)] += sign * b
    return out


@dataclass(frozen=True)
class _Segment:
    """Tokens ``[start, stop)`` of file ``file`` (an index into the module's files)."""

    file: int
    start: int
    stop: int

    def windows(self, seq_len: int) -> int:
        return (self.stop - self.start - 1) // seq_len if self.stop - self.start > seq_len else 0


# ---------------------------------------------------------------------- the data module
class TokenFileDataModule(BaseDataModule):
    """Language-model windows over pre-tokenized files (see the module docstring).

    After ``setup()``: ``files`` (a ``TokenFile`` each, train then val), ``arrays`` (their memmaps),
    ``train_files``/``val_files`` (paths), ``split`` (``"files"`` or ``"tail"``), ``num_tokens``,
    ``train_token_counts`` (int64 counts of each id in the train split), ``counts_from_cache``
    and ``meta`` (what the engine logs).
    """

    def __init__(self, source: str, *, seq_len: int, batch_size: int, vocab_size: int,
                 token_dtype: Any = "uint16", val_fraction: float = 0.1,
                 cache_dir: str | os.PathLike | None = None, tokenizer: Any = None,
                 pack_documents: bool = False, reset_positions: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        if seq_len < 1:
            raise DataError(f"data.seq_len={seq_len} must be >= 1")
        if vocab_size < 1:
            raise DataError(f"model.vocab_size={vocab_size} must be >= 1")
        if not 0 <= val_fraction < 1:
            raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
        if reset_positions and not pack_documents:
            raise DataError("data.reset_positions needs data.pack_documents: true")
        if pack_documents and getattr(tokenizer, "eos_id", None) is None:
            raise DataError(f"data.pack_documents on token files needs data.tokenizer_file naming a tokenizer "
                            f"with an <EOS> token (data.source={source!r}): documents could not be told apart")
        self.source = source
        self.seq_len = seq_len
        self._vocab_size = vocab_size
        self.token_dtype = str(getattr(token_dtype, "value", token_dtype))
        self.val_fraction = val_fraction
        self.tokenizer = tokenizer
        self.pack_documents = pack_documents
        self.reset_positions = reset_positions
        if cache_dir is None:
            cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "llm"
        self.cache_dir = Path(cache_dir).expanduser()
        self.files: list[TokenFile] = []
        self.arrays: list[np.memmap] = []
        self.train_files: list[Path] = []
        self.val_files: list[Path] = []
        self.split: str | None = None
        self.meta: dict[str, Any] = {}
        self.counts_from_cache: bool | None = None
        self._fingerprint = ""

    @classmethod
    def from_config(cls, config: Any, *, rank: int = 0, world_size: int = 1,
                    tokenizer: Any = None) -> TokenFileDataModule:
        """The module of a run config: the vocabulary is ``model.vocab_size``; ``tokenizer`` (an
        object that decodes the ids) is optional."""
        d, t = config.data, config.training
        return cls(d.source, seq_len=d.seq_len, batch_size=t.batch_size, vocab_size=config.model.vocab_size,
                   token_dtype=d.token_dtype, val_fraction=d.val_fraction, cache_dir=d.resolved_cache_dir,
                   tokenizer=tokenizer, pack_documents=d.pack_documents, reset_positions=d.reset_positions,
                   seed=t.seed, rank=rank, world_size=world_size)

    # ------------------------------------------------------------------ counts
    def _counts_path(self, file: TokenFile, lo: int, hi: int) -> Path:
        stat = file.path.stat()
        key = "\0".join([_COUNTS_FORMAT, str(file.path.resolve()), str(stat.st_size), str(stat.st_mtime_ns),
                         file.layout, file.dtype, str(file.offset), f"{lo}:{hi}"])
        return self.cache_dir / "token-counts" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"

    def _counts(self, file: TokenFile, tokens: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, bool]:
        """(the id counts of ``tokens[lo:hi]``, whether they came from the cache)."""
        path = self._counts_path(file, lo, hi)
        try:
            counts = np.load(path)
            if counts.ndim == 1 and counts.dtype == np.int64 and int(counts.sum()) == hi - lo:
                return counts, True
        except (OSError, ValueError, EOFError):
            pass  # absent or unreadable: count again
        try:
            counts = count_ids(tokens, lo, hi)
        except ValueError as e:
            raise DataError(f"token file {file.path}: {e}") from None
        buffer = io.BytesIO()
        np.save(buffer, counts)
        try:
            write_bytes_atomic(path, buffer.getvalue())
        except OSError as e:
            log.warning("cannot cache the token counts of %s at %s (%s); they are counted again next time",
                        file.path, path, e)
        return counts, False

    def _check_vocab(self, file: TokenFile, tokens: np.ndarray, counts: np.ndarray) -> None:
        if len(counts) <= self._vocab_size:
            return
        where = _first_at_least(tokens, self._vocab_size)
        raise DataError(f"token file {file.path}: token id {int(tokens[where])} at index {where} is >= "
                        f"model.vocab_size={self._vocab_size} (the file's largest id is {len(counts) - 1})")

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        """Open the files, split them, count their ids (or read the cached counts) and check the ids
        against the vocabulary. The engine runs it on process 0 first, so the others read the cache."""
        train_paths, val_paths = resolve_token_source(self.source)
        if not train_paths:
            raise DataError(f"data.source={self.source!r}: only val files ({', '.join(map(str, val_paths))}); "
                            "no train file")
        self.files = [open_token_file(p, self.token_dtype) for p in train_paths + val_paths]
        self.arrays = [f.tokens() for f in self.files]
        self.train_files, self.val_files = train_paths, val_paths
        cached, train_counts = [], np.zeros(0, np.int64)
        for i, (file, tokens) in enumerate(zip(self.files, self.arrays, strict=True)):
            counts, hit = self._counts(file, tokens, 0, file.num_tokens)
            self._check_vocab(file, tokens, counts)
            cached.append(hit)
            if i < len(train_paths):
                train_counts = _add(train_counts, counts)
        if val_paths:
            self.split = "files"
            self._train = [_Segment(i, 0, f.num_tokens) for i, f in enumerate(self.files[:len(train_paths)])]
            self._val = [_Segment(i, 0, f.num_tokens) for i, f in enumerate(self.files) if i >= len(train_paths)]
        else:
            self.split = "tail"
            self._train, self._val = self._tail_split()
            for seg in self._val:  # train = the files' counts less the tail's
                counts, hit = self._counts(self.files[seg.file], self.arrays[seg.file], seg.start, seg.stop)
                train_counts = _add(train_counts, counts, -1)
                cached.append(hit)
        self.counts_from_cache = all(cached)
        self.train_token_counts = np.trim_zeros(train_counts, "b")

    def setup(self) -> None:
        if self.split is None:
            self.prepare_data()
        self._check_sizes()
        self._window_ends = {split: np.cumsum([s.windows(self.seq_len) for s in segments])
                             for split, segments in (("train", self._train), ("val", self._val))}
        self._offsets: dict[int, np.ndarray] = {}
        self._fingerprint = self._make_fingerprint()
        num_tokens = sum(f.num_tokens for f in self.files)
        self.meta = {"source": self.source, "tokens": num_tokens, "files": len(self.files),
                     "bytes": sum(f.path.stat().st_size for f in self.files),
                     "tokenizer": getattr(self.tokenizer, "type", "none"), "vocab_size": self._vocab_size,
                     "layouts": sorted({f.layout for f in self.files})}
        self._is_setup = True
        if self.rank == 0:
            log.info("token files %s: %d train file(s), %d val file(s), %s tokens (%s split)%s", self.source,
                     len(self.train_files), len(self.val_files), f"{num_tokens:,}", self.split,
                     "" if self.counts_from_cache else "; ids counted and cached")
            if self.tokenizer is None:
                log.info("data.source=%r is token ids with no tokenizer (data.tokenizer_file is unset): "
                         "training runs on the ids and the text sample is skipped", self.source)

    def _tail_split(self) -> tuple[list[_Segment], list[_Segment]]:
        total = sum(f.num_tokens for f in self.files)
        cut = total - int(total * self.val_fraction)  # global index of the first val token
        train, val = [], []
        begin = 0
        for i, f in enumerate(self.files):
            end = begin + f.num_tokens
            if cut > begin:
                train.append(_Segment(i, 0, min(cut, end) - begin))
            if cut < end:
                val.append(_Segment(i, max(cut, begin) - begin, f.num_tokens))
            begin = end
        return train, val

    def _check_sizes(self) -> None:
        T, B = self.seq_len, self.batch_size
        n_train = sum(s.windows(T) for s in self._train)
        n_val = sum(s.windows(T) for s in self._val)
        if n_train == 0:
            longest = max(s.stop - s.start for s in self._train)
            raise DataError(f"data.seq_len={T} is too large for data.source={self.source!r}: its longest train "
                            f"segment has {longest} tokens and a window needs seq_len + 1 = {T + 1}")
        if n_train < B:
            raise DataError(f"training.batch_size={B} is larger than the {n_train} train windows of "
                            f"data.seq_len={T} tokens in data.source={self.source!r}; lower the batch size "
                            "or seq_len, or use more data")
        if self._val and n_val < B:
            what = (f"val file(s) {', '.join(p.name for p in self.val_files)}" if self.split == "files"
                    else f"data.val_fraction={self.val_fraction}")
            raise DataError(f"{what} of data.source={self.source!r} hold {n_val} windows of data.seq_len={T}, "
                            f"fewer than training.batch_size={B}")

    def _make_fingerprint(self) -> str:
        names = [f"{f.path.name}:{f.identity()}" for f in self.files]
        digest = hashlib.sha256(json.dumps([self.split, len(self.train_files), names]).encode()).hexdigest()
        packing = f":pack_documents:reset_positions={self.reset_positions}" if self.pack_documents else ""
        return (f"tokens:{digest[:24]}:seq_len={self.seq_len}:val_fraction={self.val_fraction}"
                f":split={SPLIT_RULE}{packing}")

    # ------------------------------------------------------------------ items
    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def num_tokens(self) -> int:
        self._require_setup()
        return sum(f.num_tokens for f in self.files)

    def _num_items(self, split: str) -> int:
        ends = self._window_ends[split]
        return int(ends[-1]) if len(ends) else 0

    def _train_offsets(self, epoch: int) -> np.ndarray:
        if epoch not in self._offsets:
            slack = np.array([(s.stop - s.start - 1) - s.windows(self.seq_len) * self.seq_len
                              for s in self._train], np.int64)
            self._offsets = {epoch: self._rng(1, epoch).integers(0, np.maximum(slack, 0) + 1)}
        return self._offsets[epoch]

    def _gather(self, split: str, indices: np.ndarray, epoch: int) -> Batch:
        segments = self._train if split == "train" else self._val
        ends = self._window_ends[split]
        indices = np.asarray(indices, np.int64)
        which = np.searchsorted(ends, indices, side="right")  # the segment of each item
        first = np.concatenate([[0], ends[:-1]])[which]
        offsets = self._train_offsets(epoch)[which] if split == "train" else np.zeros_like(which)
        width = self.seq_len + 1
        windows = np.empty((len(indices), width), np.int64)
        for row, (g, j, o) in enumerate(zip(which, indices - first, offsets, strict=True)):
            seg = segments[g]
            start = seg.start + int(o) + int(j) * self.seq_len
            windows[row] = self.arrays[seg.file][start:start + width]  # this row's pages only
        return window_batch(windows, self.tokenizer.eos_id if self.pack_documents else None,
                            self.reset_positions)
