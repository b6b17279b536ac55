"""Text corpora tokenized once into a cached memmap, served as windows of ``seq_len + 1`` tokens.

Sources (``data.source``):

* ``"stdlib"`` -- every ``*.py`` under the running Python's standard library
  (``sysconfig.get_paths()["stdlib"]``), without ``site-packages``/``dist-packages``, test
  directories (``test``, ``tests``, ``idle_test``), hidden or ``__pycache__`` directories, and the
  generated data modules ``encodings/`` (codec tables) and ``pydoc_data/`` (one 750 kB string of
  documentation prose); sorted by relative path. Always present, no download.
* a file (must be UTF-8 text), a directory (recursive; hidden entries skipped; files that are not
  UTF-8 text -- a NUL byte or a decode error -- skipped), or a glob (``**`` recursive; non-text
  matches skipped).

Files are read in sorted order until ``max_bytes`` (the last file cut at a character boundary).
Each file is one document, named by its path relative to the source's root (the stdlib directory,
the given directory, the glob's leading directories without wildcards; a file's own name), with
``/`` separators, so names do not depend on where the corpus lives. The tokenizer (``char`` by
default, or ``bpe``, or a tokenizer object passed in) is built from the whole corpus.

Split (per document; val_fraction ``f`` > 0, ``D`` documents, ``N`` tokens). Each document's
tokens are followed by ``<EOS>`` (when the tokenizer has one). Documents are ranked by the sha256
hex digest of their UTF-8 name (ties, which need a sha256 collision, broken by the name). Val is the
first ``k`` documents of that ranking, ``k`` in ``[1, D - 1]`` chosen so that their token count is
closest to ``f * N`` (ties toward the smaller ``k``); train is the other ``D - k``. So every
document is wholly train or wholly val; the rule reads nothing but names and token counts, so it
is the same on every machine and run; and a document's rank depends on its own name only, so
adding or removing a file moves no other document except at the cut. With few documents the val
share can be far from ``f`` (whole documents only); ``setup()`` logs the counts. A corpus of one
document (a one-file source, or a ``max_bytes`` that reaches only the first file) falls back to
the contiguous tail: the last ``int(f * N)`` tokens are val, the rest train (logged). ``f = 0``: no
val split, every document is train.

Cache: ``<cache_dir>/text-<key>/`` holds ``tokens.npy`` (uint16, or uint32 above 65536 ids): the
documents in ranked order, ``doc_0 <EOS> doc_1 <EOS> ...``, so both splits are contiguous slices
of one memmap (val ``tokens[:n_val]``, train ``tokens[n_val:]``; the single-document tail split
is the other way round); ``documents.json`` (the names in that order and the token offset where
each ends); ``tokenizer.json`` and ``meta.json``. ``key`` = sha256 of the cache format, the
tokenizer identity and the names and contents of the files in order (length-prefixed); a cache of
an older format has another key and is rebuilt, never read. ``meta.json`` also holds the sha256 of
the three other files; a cache whose files do not match it (flipped bytes, a truncated copy, an
edit) is rebuilt with a warning, never read. The directory is built under a
temporary name and renamed into place, so concurrent ranks never see a partial cache and a second
``setup()`` reads instead of tokenizing.

Items: train item ``i`` of epoch ``e`` is the window ``train[o + i*T : o + i*T + T + 1]`` with
``T = seq_len`` and a per-epoch offset ``o`` drawn from the slack left after the last whole window;
val windows start at 0. Windows may cross ``<EOS>`` into the next document of the same split.
``inputs = window[:-1]``, ``targets = window[1:]``, both int64 ``(B, T)``.

Packing (``pack_documents=True``): the same windows, plus int64 ``segment_ids`` (B, T): the number
of ``<EOS>`` tokens before each input slot in its window, so a document's tokens and the ``<EOS>``
that ends it share an id and the model's attention never crosses into the next document (the
``<EOS>`` still predicts the next document's first token, as without packing). A document cut by a
window edge goes on as the first segment of a later window. ``reset_positions=True`` adds
``positions`` (B, T): the slot's offset from the start of its segment in the window.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm.data.base import BaseDataModule, Batch, DataError
from llm.io import TOKENIZER_FILE, atomic_directory
from llm.tokenization import build_tokenizer, load_tokenizer

__all__ = ["TextDataModule", "Corpus", "document_name", "read_corpus", "resolve_source", "segment_positions",
           "split_rank",
           "stdlib_files", "val_document_count", "window_batch"]

log = logging.getLogger(__name__)

STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                              "__pycache__"})
STDLIB_GENERATED_DIRS = frozenset({"encodings", "pydoc_data"})  # top level: data, not code
_CACHE_FORMAT = "llm-text-cache-v3"  # names the layout: tokens.npy in split-rank order + documents.json,
# meta.json with the sha256 of each of the other files
_CACHE_FILES = ("tokens.npy", "documents.json", "tokenizer.json")
SPLIT_RULE = "documents-by-sha256-of-name"  # part of the fingerprint: a resume needs the same split
_SNIFF_BYTES = 8192


# ---------------------------------------------------------------------- finding and reading files
def stdlib_files() -> list[Path]:
    """The ``*.py`` files of the standard library, sorted by relative path (see module docstring)."""
    root = _stdlib_root()
    return [p for p in _walk(root, STDLIB_SKIP_DIRS) if p.suffix == ".py"
            and p.relative_to(root).parts[0] not in STDLIB_GENERATED_DIRS]


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, skip_dirs: frozenset[str] = frozenset({"__pycache__"})) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        out.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def resolve_source(source: str) -> tuple[list[Path], Path, bool]:
    """(files in read order, the root their document names are relative to, whether non-text files
    are skipped rather than errors)."""
    if source == "stdlib":
        return stdlib_files(), _stdlib_root(), True
    path = Path(source).expanduser()
    if path.is_file():
        return [path], path.parent, False
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise DataError(f"data.source={source!r}: the directory has no files")
        return files, path, True
    if _has_magic(source):
        pattern = os.path.expanduser(source)
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"data.source={source!r}: the glob matched no files")
        fixed = []  # the leading directories without wildcards
        for part in Path(pattern).parts[:-1]:
            if _has_magic(part):
                break
            fixed.append(part)
        return files, Path(*fixed) if fixed else Path("."), True
    raise DataError(f"data.source={source!r}: no such file or directory ({path.resolve()}); "
                    "expected 'stdlib', 'synthetic', a file, a directory or a glob")


def _as_text(raw: bytes) -> str | None:
    if b"\x00" in raw[:_SNIFF_BYTES]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def document_name(path: Path, root: Path) -> str:
    """The name a document is split by: ``path`` relative to ``root``, ``/``-separated."""
    return Path(os.path.relpath(path, root)).as_posix()


def split_rank(names: list[str]) -> list[int]:
    """Document indices in split-rank order: by sha256 of the UTF-8 name (see module docstring)."""
    keys = [hashlib.sha256(n.encode("utf-8")).hexdigest() for n in names]
    return sorted(range(len(names)), key=lambda i: (keys[i], names[i]))


def val_document_count(ends: np.ndarray, val_fraction: float) -> int:
    """``k``: how many leading ranked documents are val, given their cumulative token ``ends``."""
    if val_fraction == 0 or len(ends) < 2:
        return 0
    target = val_fraction * float(ends[-1])
    gaps = np.abs(np.asarray(ends[:-1], np.float64) - target)  # k = 1 .. D-1
    return int(np.argmin(gaps)) + 1  # the first minimum: ties toward fewer documents


@dataclass
class Corpus:
    """The documents of a source after the byte cap, and the sha256 of their names and bytes."""

    source: str
    docs: list[str]
    files: list[Path]  # the file each doc came from
    names: list[str]  # each doc's path relative to the source root (what the split hashes)
    num_bytes: int
    truncated: bool
    skipped: list[Path]  # non-text files left out
    content_hash: str


def read_corpus(source: str, max_bytes: int | None = None) -> Corpus:
    """Read ``source`` in sorted order up to ``max_bytes``; empty results are DataErrors."""
    files, root, lenient = resolve_source(source)
    docs, used, names, skipped = [], [], [], []
    digest = hashlib.sha256()
    total, truncated = 0, False
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"data.source={source!r}: cannot read {path}: {e}") from None
        text = _as_text(raw)
        if text is None:
            if not lenient:
                raise DataError(f"data.source={source!r}: {path} is not UTF-8 text")
            skipped.append(path)
            continue
        if not raw:
            continue
        if max_bytes is not None and total + len(raw) > max_bytes:
            raw = raw[:max_bytes - total]
            text = raw.decode("utf-8", errors="ignore")  # drops only a cut trailing character
            raw = text.encode("utf-8")
            truncated = True
        if raw:
            name = document_name(path, root)
            for part in (name.encode("utf-8"), raw):
                digest.update(len(part).to_bytes(8, "little"))
                digest.update(part)
            docs.append(text)
            used.append(path)
            names.append(name)
            total += len(raw)
        if truncated:
            break
    if truncated and source != "stdlib":
        log.warning("data.source=%r: read only the first %d bytes (data.max_bytes); set "
                    "data.max_bytes=null to read everything", source, total)
    if total == 0:
        what = f"{len(files)} file(s), {len(skipped)} skipped as non-text"
        raise DataError(f"data.source={source!r}: the corpus is empty ({what})")
    return Corpus(source, docs, used, names, total, truncated, skipped, digest.hexdigest())


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Each slot's offset (int64, like ``segment_ids`` (B, T)) from the first slot of its segment."""
    slots = np.broadcast_to(np.arange(segment_ids.shape[1]), segment_ids.shape)
    first = np.ones_like(segment_ids, dtype=bool)
    first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return (slots - np.maximum.accumulate(np.where(first, slots, 0), axis=1)).astype(np.int64)


def window_batch(windows: np.ndarray, eos_id: int | None, reset_positions: bool) -> Batch:
    """The batch of int64 windows (B, T+1): ``(inputs, targets)``, and when packing (``eos_id``
    given) ``segment_ids`` (and, with ``reset_positions``, ``positions``) as the module docstring says."""
    inputs, targets = np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])
    if eos_id is None:
        return inputs, targets
    ends = inputs == eos_id  # (B, T): slots that end a document
    segment_ids = np.cumsum(ends, axis=1) - ends  # EOS counted from the next slot on
    if not reset_positions:
        return inputs, targets, segment_ids
    return inputs, targets, segment_ids, segment_positions(segment_ids)


# ---------------------------------------------------------------------- the data module
class TextDataModule(BaseDataModule):
    """Language-model windows over a tokenized text corpus (see the module docstring).

    ``tokenizer`` is ``"char"``, ``"bpe"`` (trained to ``vocab_size``) or a tokenizer object
    (e.g. loaded from a checkpoint), which is then used as is. After ``setup()``: ``tokenizer``,
    ``vocab_size``, ``num_tokens``, ``cache_path``, ``from_cache`` (whether the tokens came from
    the cache rather than being tokenized by this call), ``split`` (``"documents"``, or ``"tail"``
    for a one-document corpus), ``train_tokens``/``val_tokens`` (the two token streams) and
    ``train_documents``/``val_documents`` (the names of the documents wholly in each split, in
    stream order).
    """

    def __init__(self, source: str = "stdlib", *, seq_len: int, batch_size: int,
                 tokenizer: Any = "char", vocab_size: int = 4096, val_fraction: float = 0.1,
                 cache_dir: str | os.PathLike | None = None, max_bytes: int | None = 4_000_000,
                 pack_documents: bool = False, reset_positions: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        if seq_len < 1:
            raise DataError(f"data.seq_len={seq_len} must be >= 1")
        if reset_positions and not pack_documents:
            raise DataError("data.reset_positions needs data.pack_documents: true")
        self.pack_documents = pack_documents
        self.reset_positions = reset_positions
        if not 0 <= val_fraction < 1:
            raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
        self.source = source
        self.seq_len = seq_len
        self.val_fraction = val_fraction
        self.max_bytes = max_bytes
        self.vocab_size_target = vocab_size
        if isinstance(tokenizer, str) or hasattr(tokenizer, "value"):
            self._tokenizer_kind = str(getattr(tokenizer, "value", tokenizer)).lower()
            if self._tokenizer_kind not in ("char", "bpe"):
                raise DataError(f"data.tokenizer={tokenizer!r} must be 'char' or 'bpe'")
            self._given_tokenizer = None
        else:
            self._tokenizer_kind = tokenizer.type
            self._given_tokenizer = tokenizer
        if cache_dir is None:
            cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "llm"
        self.cache_dir = Path(cache_dir).expanduser()
        self.cache_path: Path | None = None
        self.from_cache: bool | None = None
        self.tokenizer = None
        self.meta: dict[str, Any] = {}
        self.split: str | None = None
        self.train_documents: list[str] = []
        self.val_documents: list[str] = []
        self._key: str | None = None

    @classmethod
    def from_config(cls, config: Any, *, rank: int = 0, world_size: int = 1,
                    tokenizer: Any = None) -> TextDataModule:
        """The module of a run config; ``tokenizer`` (an object) replaces ``data.tokenizer`` when given."""
        d, t = config.data, config.training
        tokenizer = d.tokenizer if tokenizer is None else tokenizer
        return cls(d.source, seq_len=d.seq_len, batch_size=t.batch_size, tokenizer=tokenizer,
                   vocab_size=d.vocab_size, val_fraction=d.val_fraction,
                   cache_dir=d.resolved_cache_dir, max_bytes=d.max_bytes,
                   pack_documents=d.pack_documents, reset_positions=d.reset_positions, seed=t.seed,
                   rank=rank, world_size=world_size)

    # ------------------------------------------------------------------ cache
    def _tokenizer_identity(self) -> str:
        if self._given_tokenizer is not None:
            return f"given:{self._given_tokenizer.identity}"
        if self._tokenizer_kind == "bpe":
            import tokenizers  # the library version can change merges

            return f"bpe:vocab={self.vocab_size_target}:tokenizers={tokenizers.__version__}"
        return "char"

    def prepare_data(self) -> None:
        """Tokenize the corpus into the cache unless an identical one is there already."""
        corpus = read_corpus(self.source, self.max_bytes)
        key = hashlib.sha256(f"{_CACHE_FORMAT}\0{self._tokenizer_identity()}\0{corpus.content_hash}"
                             .encode()).hexdigest()
        self._key = key
        self.cache_path = self.cache_dir / f"text-{key[:24]}"
        if (self.cache_path / "meta.json").is_file():
            problem = self._cache_problem()
            if problem is None:
                self.from_cache = True
                return
            log.warning("token cache %s %s; rebuilding it", self.cache_path, problem)
            shutil.rmtree(self.cache_path, ignore_errors=True)
        self.from_cache = False
        self._build_cache(corpus, key)

    def _cache_problem(self) -> str | None:
        """Why the cache at ``cache_path`` cannot be used (a file changed since it was written:
        flipped bits, a truncated copy, an edit), or None when every file matches its sha256."""
        assert self.cache_path is not None
        try:
            hashes = json.loads((self.cache_path / "meta.json").read_text()).get("sha256", {})
        except (OSError, ValueError, AttributeError) as e:
            return f"has an unreadable meta.json ({e})"
        for name in _CACHE_FILES:
            try:
                actual = hashlib.sha256((self.cache_path / name).read_bytes()).hexdigest()
            except OSError as e:
                return f"lacks {name} ({e})"
            if hashes.get(name) != actual:
                return f"does not match its checksum ({name}: sha256 {actual[:12]}..., meta.json {str(hashes.get(name))[:12]}...)"
        return None

    def _build_cache(self, corpus: Corpus, key: str) -> None:
        started = time.perf_counter()
        tok = self._given_tokenizer
        if tok is None:
            tok = build_tokenizer(self._tokenizer_kind, corpus.docs, vocab_size=self.vocab_size_target)
        eos = tok.eos_id
        parts = tok.encode_arrays(corpus.docs)
        order = split_rank(corpus.names)
        dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
        total = sum(len(p) for p in parts) + (len(parts) if eos is not None else 0)
        tokens = np.empty(total, dtype)
        ends = []
        pos = 0
        for i in order:
            tokens[pos:pos + len(parts[i])] = parts[i]
            pos += len(parts[i])
            if eos is not None:
                tokens[pos] = eos
                pos += 1
            ends.append(pos)
        documents = {"names": [corpus.names[i] for i in order], "ends": ends}
        meta = {"format": _CACHE_FORMAT, "key": key, "source": corpus.source,
                "files": len(corpus.files), "skipped_files": len(corpus.skipped),
                "bytes": corpus.num_bytes, "truncated": corpus.truncated, "tokens": int(total),
                "documents": len(order), "order": "sha256 of the document name",
                "dtype": np.dtype(dtype).name, "tokenizer": tok.type, "vocab_size": tok.vocab_size}
        try:
            with atomic_directory(self.cache_path) as tmp:
                np.save(tmp / "tokens.npy", tokens)
                (tmp / "documents.json").write_text(json.dumps(documents))
                tok.save(tmp / TOKENIZER_FILE)
                meta["sha256"] = {name: hashlib.sha256((tmp / name).read_bytes()).hexdigest()
                                  for name in _CACHE_FILES}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        except OSError:
            if not (self.cache_path / "meta.json").is_file():  # not a concurrent rank's win
                raise
        log.info("tokenized %s: %d files, %.2f MB -> %d tokens (%s, vocab %d) in %.1fs; cached at %s",
                 corpus.source, len(corpus.files), corpus.num_bytes / 1e6, total, tok.type,
                 tok.vocab_size, time.perf_counter() - started, self.cache_path)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        if self._key is None:
            self.prepare_data()
        assert self.cache_path is not None
        try:
            tokens = np.load(self.cache_path / "tokens.npy", mmap_mode="r")
            meta = json.loads((self.cache_path / "meta.json").read_text())
            documents = json.loads((self.cache_path / "documents.json").read_text())
            names, ends = list(documents["names"]), np.asarray(documents["ends"], np.int64)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"corrupt token cache {self.cache_path} ({e}); delete it to rebuild") from None
        if (meta.get("format") != _CACHE_FORMAT or meta.get("key") != self._key
                or len(tokens) != meta.get("tokens") or not len(names) == len(ends) == meta.get("documents")
                or len(ends) == 0 or ends[-1] != len(tokens) or np.any(np.diff(ends, prepend=0) < 0)):
            raise DataError(f"corrupt token cache {self.cache_path} (meta.json/documents.json do not "
                            "match tokens.npy); delete it to rebuild")
        self.tokenizer = self._given_tokenizer or load_tokenizer(self.cache_path / TOKENIZER_FILE)
        if self.pack_documents and self.tokenizer.eos_id is None:
            raise DataError(f"data.pack_documents needs a tokenizer with an <EOS> token "
                            f"({self.tokenizer.type} has none): documents could not be told apart")
        self.meta = meta
        self._tokens = tokens
        self._split(tokens, names, ends)
        T, B = self.seq_len, self.batch_size
        if len(self._train) < T + 1:
            raise DataError(f"data.seq_len={T} is too large for data.source={self.source!r}: the train "
                            f"split has {len(self._train)} tokens and a window needs seq_len + 1 = {T + 1}")
        self._n_train_windows = (len(self._train) - 1) // T
        self._n_val_windows = (len(self._val) - 1) // T if len(self._val) > T else 0
        if self._n_train_windows < B:
            raise DataError(f"training.batch_size={B} is larger than the {self._n_train_windows} train "
                            f"windows of data.seq_len={T} tokens in data.source={self.source!r}; lower "
                            "the batch size or seq_len, or use more data")
        if len(self._val) and self._n_val_windows < B:
            docs = (f"{len(self.val_documents)} whole document(s)" if self.split == "documents"
                    else "the tail of the only document")
            raise DataError(f"data.val_fraction={self.val_fraction} leaves {len(self._val)} val tokens "
                            f"({docs}) = {self._n_val_windows} windows of data.seq_len={T}, fewer than "
                            f"training.batch_size={B}; raise val_fraction or lower the batch size")
        self._offsets: dict[int, int] = {}
        self._is_setup = True

    def _split(self, tokens: np.ndarray, names: list[str], ends: np.ndarray) -> None:
        """Set the train and val streams (memmap slices) by the rule of the module docstring."""
        n = len(tokens)
        if len(names) == 1:
            self.split = "tail"
            n_val = int(n * self.val_fraction)
            self._train, self._val = tokens[:n - n_val], tokens[n - n_val:]
            self.train_documents, self.val_documents = [], []
            if n_val and self.rank == 0:
                log.info("data.source=%r is one document (%s): val is its last %d tokens "
                         "(data.val_fraction=%s), a contiguous tail split instead of whole documents",
                         self.source, names[0], n_val, self.val_fraction)
            return
        self.split = "documents"
        k = val_document_count(ends, self.val_fraction)
        n_val = int(ends[k - 1]) if k else 0
        self._val, self._train = tokens[:n_val], tokens[n_val:]
        self.val_documents, self.train_documents = names[:k], names[k:]
        if self.rank == 0:
            log.info("split %s by document: %d train documents (%d tokens), %d val documents "
                     "(%d tokens, %.1f%% for data.val_fraction=%s)", self.source, len(names) - k,
                     n - n_val, k, n_val, 100 * n_val / n, self.val_fraction)

    # ------------------------------------------------------------------ items
    @property
    def fingerprint(self) -> str:
        packing = (f":pack_documents:reset_positions={self.reset_positions}" if self.pack_documents
                   else "")  # unpacked runs keep the fingerprint they always had
        return (f"text:{self._key}:seq_len={self.seq_len}:val_fraction={self.val_fraction}"
                f":split={SPLIT_RULE}{packing}")

    @property
    def vocab_size(self) -> int:
        self._require_setup()
        return self.tokenizer.vocab_size

    @property
    def num_tokens(self) -> int:
        self._require_setup()
        return len(self._tokens)

    @property
    def train_tokens(self) -> np.ndarray:
        """The train split as one token stream (a read-only memmap slice)."""
        self._require_setup()
        return self._train

    @property
    def val_tokens(self) -> np.ndarray:
        """The val split as one token stream (empty when ``val_fraction`` is 0)."""
        self._require_setup()
        return self._val

    def _num_items(self, split: str) -> int:
        return self._n_train_windows if split == "train" else self._n_val_windows

    def _train_offset(self, epoch: int) -> int:
        if epoch not in self._offsets:
            slack = (len(self._train) - 1) - self._n_train_windows * self.seq_len
            self._offsets = {epoch: int(self._rng(1, epoch).integers(0, slack + 1))}
        return self._offsets[epoch]

    def _gather(self, split: str, indices: np.ndarray, epoch: int) -> Batch:
        tokens = self._train if split == "train" else self._val
        offset = self._train_offset(epoch) if split == "train" else 0
        starts = offset + np.asarray(indices, np.int64) * self.seq_len
        windows = np.asarray(tokens[starts[:, None] + np.arange(self.seq_len + 1)], np.int64)  # (B, T+1)
        return window_batch(windows, self.tokenizer.eos_id if self.pack_documents else None,
                            self.reset_positions)
