"""The canonical checkpoint: one directory format that both backends read and write.

```
<dir>/model.safetensors   canonical parameter names (llm.spec), float32, (out, in) linears
<dir>/config.json         the full resolved run config; its "model" entry is the ModelSpec
<dir>/state.safetensors   optional: optimizer moments etc. under canonical-derived names
<dir>/state.json          optional: step, schedule, RNG, data cursor (JSON-safe values)
<dir>/manifest.json       format version, kind and the sha256 of every other file
```

Sharded (the Hugging Face layout): when the tensors of a part (``model`` or ``state``) exceed
``max_shard_bytes`` (default ``MAX_SHARD_BYTES``, HF's 5 GB), the part is several files of WHOLE
tensors, ``model-00001-of-00004.safetensors`` ..., and ``model.safetensors.index.json`` =
``{"metadata": {"total_size": <bytes>}, "weight_map": {name: file}}`` (the same for ``state``);
one file stays ``model.safetensors`` without an index, as before. ``plan_shards`` is the one rule
for which tensor goes to which file (contiguous runs of the sorted names, balanced by bytes: a
function of the names and sizes only, so any number of writers gives the same bytes) and which
writer rank writes each file. Several writers fill one temporary directory::

    plan = plan_shards(sizes, num_writers, state_sizes=state_sizes)   # every rank, the same plan
    tmp = begin_checkpoint(path)                                       # rank 0; the path broadcast
    digest = write_shard(tmp, file, tensors)                           # each rank, for its files
    commit(tmp, path, plan, config, hashes=...)                        # rank 0, after a barrier

``write_shard`` returns its file's sha256 and leaves it beside the file too (``.<file>.sha256``),
so ``commit`` never re-reads the data: it reads the shard headers (names, shapes), checks them
against the plan (and the spec), writes the index files, ``config.json``, ``state.json`` and the
manifest, and renames the directory into place. ``save_checkpoint`` is that sequence with one
writer, for a process that holds every tensor.

Two kinds (the manifest's ``kind``; absent reads as ``canonical``):

* ``canonical`` -- the model part is the parameter table of the ModelSpec in ``config.json``'s
  ``"model"``, checked against it on writing and loading: a decoder either backend (and
  ``llm.load``, the HF export, ``training.init_from``) can build.
* ``named`` -- a task's own model that is not a ModelSpec decoder (``TrainingTask.canonical=False``,
  e.g. the ``regression`` MLP): the model part holds the task half's parameters under its own
  names (torch ``state_dict`` keys, flax NNX paths), ``Checkpoint.spec`` is None, and only a loader
  that asks for it (``allow_named=True``: the training engines' resume) gets one; every other loader
  refuses it with a ``CheckpointError`` saying it is not a decoder. Same files, hashes and atomic
  rename as a canonical one.

Writes go to a sibling temporary directory that is renamed into place, so a crash never leaves a
half-written checkpoint under the final name. Loading verifies every hash first and refuses a torn
or corrupt directory as a whole (``CheckpointError``); nothing is loaded partially. ``load_checkpoint``
returns whole tensors, or with ``lazy=True`` a ``TensorSlices`` per tensor (its shape from the
header; ``read(index)`` reads that slice alone: a device loading only its shard); ``open_tensors``
reads one tensor or a slice of it. Several writers that run in the background meet through the
files: ``wait_for_shards`` returns once every file of the plan has its writer's digest beside it. Version 1 directories (always one file per part) load unchanged. No pickle.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from llm.io import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    STATE_META_FILE,
    move_into_place,
    read_json,
    temp_sibling,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from llm.spec import ModelSpec, SpecError, check_params

FORMAT_NAME = "llm-canonical-checkpoint"
FORMAT_VERSION = 2  # 2: a part may be sharded (index + shard files)
READABLE_VERSIONS = (1, 2)  # version 1: one file per part, the layout of an unsharded version 2
KINDS = ("canonical", "named")  # manifest.json "kind" (see the module docstring)
MAX_SHARD_BYTES = 5 * 10**9  # a shard file's tensor bytes at most (HF's max_shard_size="5GB")
MODEL_INDEX_FILE = "model.safetensors.index.json"
STATE_INDEX_FILE = "state.safetensors.index.json"
PARTS = {"model": (MODEL_FILE, MODEL_INDEX_FILE), "state": (STATE_FILE, STATE_INDEX_FILE)}  # part -> (one file, index)
_PART_FILE = re.compile(r"^(model|state)(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
_RESERVED = {CONFIG_FILE, STATE_META_FILE, MANIFEST_FILE}  # with every _PART_FILE name
_HASH_SUFFIX = ".sha256"  # .<shard file>.sha256: a writer's digest of its file, until commit

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "KINDS",
    "MAX_SHARD_BYTES",
    "ShardFile",
    "TensorReader",
    "TensorSlices",
    "plan_shards",
    "shard_index",
    "begin_checkpoint",
    "write_shard",
    "commit",
    "wait_for_shards",
    "save_checkpoint",
    "load_checkpoint",
    "open_checkpoint",
    "open_tensors",
    "verify_checkpoint",
    "list_checkpoints",
    "latest_valid_checkpoint",
    "recover_interrupted_writes",
    "resolve_checkpoint",
]


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, torn, corrupt or does not match its spec."""


@dataclass
class Checkpoint:
    """A loaded checkpoint; ``params`` are float32 numpy arrays under canonical names (``kind``
    ``"canonical"``, ``spec`` its ModelSpec) or the task half's own names (``"named"``, ``spec`` None).
    ``shards``: each file of the model part and the tensor names it holds."""

    path: Path
    config: dict[str, Any]
    spec: ModelSpec | None
    params: dict[str, np.ndarray]
    state_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    state_meta: dict[str, Any] = field(default_factory=dict)
    kind: str = "canonical"
    shards: dict[str, tuple[str, ...]] = field(default_factory=dict)


# ---------------------------------------------------------------------- the shard plan
@dataclass(frozen=True)
class ShardFile:
    """One file of a sharded part: its name, the tensors it holds (sorted), their bytes, its writer rank."""

    name: str
    part: str  # "model" | "state"
    tensors: tuple[str, ...]
    nbytes: int
    writer: int = 0


def plan_shards(sizes: Mapping[str, int], num_writers: int = 1, *, state_sizes: Mapping[str, int] | None = None,
                max_shard_bytes: int = MAX_SHARD_BYTES) -> tuple[ShardFile, ...]:
    """The files of a checkpoint whose model tensors have ``sizes`` (name -> bytes) and, when given,
    whose state tensors have ``state_sizes``; each file with the rank of ``num_writers`` that writes it.

    A part is as few files as ``max_shard_bytes`` allows (a tensor larger than that is a file of its
    own), contiguous runs of the sorted names with about equal bytes: the files depend on the names
    and sizes only, never on ``num_writers``. Writers: the largest file first, each to
    the writer with the fewest bytes so far (the lower rank on a tie).
    """
    if isinstance(num_writers, bool) or not isinstance(num_writers, int) or num_writers < 1:
        raise CheckpointError(f"plan_shards num_writers={num_writers!r} must be an integer >= 1")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise CheckpointError(f"plan_shards max_shard_bytes={max_shard_bytes!r} must be an integer >= 1")
    files = _part_files("model", sizes, max_shard_bytes)
    if state_sizes is not None:
        files += _part_files("state", state_sizes, max_shard_bytes)
    load = [0] * num_writers
    writers: dict[str, int] = {}
    for f in sorted(files, key=lambda f: (-f.nbytes, f.name)):
        rank = min(range(num_writers), key=lambda r: (load[r], r))
        load[rank] += f.nbytes
        writers[f.name] = rank
    return tuple(replace(f, writer=writers[f.name]) for f in files)


def _part_files(part: str, sizes: Mapping[str, int], max_bytes: int) -> list[ShardFile]:
    names = sorted(sizes)
    bad = [n for n in names if isinstance(sizes[n], bool) or not isinstance(sizes[n], int) or sizes[n] < 0]
    if bad:
        raise CheckpointError(f"plan_shards: the {part} size of {bad[0]!r} is {sizes[bad[0]]!r}, not a byte count >= 0")
    # the fewest contiguous runs that fit max_bytes (greedy filling is optimal for that), then the
    # smallest capacity that keeps that many: runs of about equal bytes
    count = len(_greedy_runs(names, sizes, max_bytes))
    low, high = max(1, -(-sum(sizes.values()) // max(count, 1))), max_bytes
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if len(_greedy_runs(names, sizes, mid)) <= count else (mid + 1, high)
    groups = _greedy_runs(names, sizes, low) or [[]]  # an empty part is still one (empty) file
    single, _ = PARTS[part]
    stem = single.removesuffix(".safetensors")
    return [ShardFile(single if len(groups) == 1 else f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors",
                      part, tuple(g), sum(sizes[n] for n in g)) for i, g in enumerate(groups, 1)]


def _greedy_runs(names: list[str], sizes: Mapping[str, int], capacity: int) -> list[list[str]]:
    """``names`` in order, each run filled until the next tensor would pass ``capacity`` bytes (a
    larger tensor is a run of its own)."""
    runs: list[list[str]] = []
    held = 0
    for n in names:
        if runs and runs[-1] and held + sizes[n] <= capacity:
            runs[-1].append(n)
            held += sizes[n]
        else:
            runs.append([n])
            held = sizes[n]
    return runs


def shard_index(files: list[ShardFile] | tuple[ShardFile, ...], total_size: int) -> dict[str, Any]:
    """The ``*.safetensors.index.json`` of a sharded part (the HF layout): its tensor bytes and each
    tensor's file."""
    weight_map = {n: f.name for f in files for n in f.tensors}
    return {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}


# ---------------------------------------------------------------------- writing
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(arrays, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def begin_checkpoint(path: str | os.PathLike) -> Path:
    """The empty temporary directory beside ``path`` that the writers fill and ``commit`` renames
    (``recover_interrupted_writes`` removes one that never got there)."""
    return temp_sibling(path)


def write_shard(tmp_dir: str | os.PathLike, file: ShardFile, tensors: Mapping[str, np.ndarray]) -> str:
    """Write the plan's ``file`` with ``tensors`` (exactly its names) into ``tmp_dir``, fsynced; return
    its sha256, also left in ``tmp_dir`` for ``commit``. A failure is a ``CheckpointError``."""
    target = Path(tmp_dir) / file.name
    try:
        return _write_shard(Path(tmp_dir), file, tensors)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot write checkpoint shard {target}: {_write_failure(e)}") from None


def _write_shard(tmp_dir: Path, file: ShardFile, tensors: Mapping[str, np.ndarray]) -> str:
    if set(tensors) != set(file.tensors):
        extra, missing = sorted(set(tensors) - set(file.tensors)), sorted(set(file.tensors) - set(tensors))
        raise CheckpointError(f"shard {file.name}: the plan assigns it {len(file.tensors)} tensors; got "
                              f"{len(extra)} others ({extra[:3]}) and lacks {len(missing)} ({missing[:3]})")
    _write_tensors(tmp_dir / file.name, dict(tensors))
    digest = _sha256(tmp_dir / file.name)
    write_text_atomic(tmp_dir / f".{file.name}{_HASH_SUFFIX}", digest)
    return digest


def wait_for_shards(tmp_dir: str | os.PathLike, plan: tuple[ShardFile, ...], *, timeout_s: float,
                    poll_s: float = 0.05) -> None:
    """Return once every file of ``plan`` in ``tmp_dir`` has its digest beside it (``write_shard``
    leaves it last, atomically: the file is complete); a ``CheckpointError`` naming the files still
    missing after ``timeout_s`` seconds."""
    tmp = Path(tmp_dir)
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [f for f in plan if not (tmp / f".{f.name}{_HASH_SUFFIX}").is_file()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise CheckpointError(f"{tmp}: {len(missing)} shard(s) not written after {timeout_s:g}s: "
                                  + ", ".join(f"{f.name} (writer {f.writer})" for f in missing[:4]))
        time.sleep(poll_s)


class _Shape(NamedTuple):
    """A tensor's shape as ``check_params`` reads it (from a shard header, without the data)."""

    shape: tuple[int, ...]


def _header(file: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, bytes) of every tensor in a safetensors file, from its header alone."""
    out = {}
    with safe_open(str(file), framework="numpy") as f:
        for name in f.keys():
            view = f.get_slice(name)
            shape = tuple(view.get_shape())
            out[name] = (shape, math.prod(shape) * np.dtype(_DTYPES[view.get_dtype()]).itemsize)
    return out


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def commit(
    tmp_dir: str | os.PathLike,
    path: str | os.PathLike,
    plan: tuple[ShardFile, ...],
    config: dict[str, Any],
    *,
    hashes: Mapping[str, str] | None = None,
    state_meta: dict[str, Any] | None = None,
    extra_files: dict[str, str | os.PathLike | bytes] | None = None,
    overwrite: bool = False,
    kind: str = "canonical",
) -> Path:
    """Finish the checkpoint the writers of ``plan`` left in ``tmp_dir`` and rename it to ``path``.

    ``hashes`` (file -> sha256, what ``write_shard`` returned) may leave out files: their writers'
    digests are read from ``tmp_dir``. Checks every file's header against the plan (and, canonical,
    against the spec in ``config["model"]``), writes the index files of sharded parts, ``config.json``,
    ``state.json``, the ``extra_files`` and the manifest. On any error ``tmp_dir`` is left for the
    caller to remove (``save_checkpoint`` does; ``recover_interrupted_writes`` does at a resume).
    """
    tmp, path = Path(tmp_dir), Path(path)
    _check_kind(kind, config)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True to replace it)")
    digests = dict(hashes or {})
    headers: dict[str, dict[str, tuple[tuple[int, ...], int]]] = {}
    for file in plan:
        sidecar = tmp / f".{file.name}{_HASH_SUFFIX}"
        if file.name not in digests:
            if not sidecar.is_file():
                raise CheckpointError(f"{path}: shard {file.name} (writer {file.writer}) was not written")
            digests[file.name] = sidecar.read_text().strip()
        sidecar.unlink(missing_ok=True)
        headers[file.name] = _header(tmp / file.name)
        if set(headers[file.name]) != set(file.tensors):
            raise CheckpointError(f"{path}: shard {file.name} does not hold the tensors the plan assigns it")
    model = {n: _Shape(shape) for f in plan if f.part == "model" for n, (shape, _) in headers[f.name].items()}
    _check_model(kind, config, model, where=f"parameters for checkpoint {path}")
    for part, (_, index) in PARTS.items():
        files = [f for f in plan if f.part == part]
        if len(files) > 1:
            total = sum(size for f in files for _, size in headers[f.name].values())
            write_json_atomic(tmp / index, shard_index(files, total), sort_keys=True)
            digests[index] = _sha256(tmp / index)
    write_json_atomic(tmp / CONFIG_FILE, config, sort_keys=True)
    if state_meta is not None:
        write_json_atomic(tmp / STATE_META_FILE, state_meta, sort_keys=True)
    for name, source in (extra_files or {}).items():
        if Path(name).name != name or name in _RESERVED or _PART_FILE.match(name) or name.startswith("."):
            raise CheckpointError(f"extra file name {name!r} must be a plain file name other than "
                                  f"{sorted(_RESERVED)} and the model/state safetensors and index names")
        if isinstance(source, bytes):
            write_bytes_atomic(tmp / name, source)
        else:
            shutil.copyfile(source, tmp / name)
    files = sorted(p.name for p in tmp.iterdir())
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": kind,
        "files": {name: digests[name] if name in digests else _sha256(tmp / name) for name in files},
    }
    write_json_atomic(tmp / MANIFEST_FILE, manifest, sort_keys=True)
    move_into_place(tmp, path, replace=True)
    return path


def _check_kind(kind: str, config: dict[str, Any]) -> None:
    if kind not in KINDS:
        raise CheckpointError(f"checkpoint kind={kind!r} must be one of {', '.join(KINDS)}")
    if kind == "canonical" and "model" not in config:
        raise CheckpointError("config must contain a 'model' section (the ModelSpec fields)")


def _check_model(kind: str, config: dict[str, Any], params: Mapping[str, Any], *, where: str) -> None:
    """Canonical: ``params`` (anything with a ``.shape``) are the spec's table; named: not empty."""
    if kind == "canonical":
        check_params(ModelSpec.from_dict(config["model"]), dict(params), where=where)
    elif not params:
        raise CheckpointError(f"{where}: a named checkpoint needs at least one tensor")


def save_checkpoint(
    path: str | os.PathLike,
    params: dict[str, np.ndarray],
    config: dict[str, Any],
    *,
    state_tensors: dict[str, np.ndarray] | None = None,
    state_meta: dict[str, Any] | None = None,
    extra_files: dict[str, str | os.PathLike | bytes] | None = None,
    overwrite: bool = False,
    kind: str = "canonical",
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Atomically write a checkpoint of ``kind`` (``KINDS``) to ``path`` and return it: the plan,
    ``write_shard`` and ``commit`` of one writer holding every tensor.

    Canonical: ``config`` must hold the spec under ``"model"`` (a run config dict or just
    ``{"model": ...}``); ``params`` are validated against that spec before anything is written.
    Named: ``params`` are a task's own name -> array, written as given (float32); ``config`` is the
    run config. ``extra_files`` maps a file name (e.g. ``tokenizer.json``) to a path to copy or to
    bytes; they are hashed like the rest. A part larger than ``max_shard_bytes`` is sharded.
    """
    path = Path(path)
    _check_kind(kind, config)
    params = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    _check_model(kind, config, params, where=f"parameters for checkpoint {path}")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True to replace it)")
    state = None if state_tensors is None else {k: np.asarray(v) for k, v in state_tensors.items()}
    plan = plan_shards({k: v.nbytes for k, v in params.items()}, max_shard_bytes=max_shard_bytes,
                       state_sizes=None if state is None else {k: v.nbytes for k, v in state.items()})
    tmp = None
    try:
        tmp = begin_checkpoint(path)
        for file in plan:
            source = params if file.part == "model" else state
            _write_shard(tmp, file, {n: source[n] for n in file.tensors})
        commit(tmp, path, plan, config, state_meta=state_meta, extra_files=extra_files, overwrite=True, kind=kind)
    except (OSError, SafetensorError) as e:  # a full disk, a vanished or read-only directory
        raise CheckpointError(f"cannot write checkpoint {path}: {_write_failure(e)}; the partial write was "
                              "removed and the previous checkpoints are intact") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # already gone after the rename
    return path


def _write_failure(e: OSError | SafetensorError) -> str:
    """Why a write failed, in a few words: "the disk is full (ENOSPC)" when it is."""
    text = str(e)
    # safetensors wraps the OS error in its own text: IoError(Os { code: 28, kind: StorageFull, ... })
    full = getattr(e, "errno", None) == errno.ENOSPC
    if full or "StorageFull" in text or os.strerror(errno.ENOSPC) in text:
        return "the disk is full (ENOSPC: No space left on device)"
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)}{where})"
    return text


# ---------------------------------------------------------------------- verifying and reading
def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check the manifest, every file hash and that every shard an index names is listed; return
    the manifest or raise CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (does not exist)")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST_FILE} (torn or not a checkpoint)")
    manifest = read_json(manifest_path, error=CheckpointError)
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME
            or not isinstance(manifest.get("files"), dict)
            or not all(isinstance(d, str) for d in manifest["files"].values())):
        raise CheckpointError(f"{manifest_path}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{manifest_path}: format version {manifest.get('version')!r}, "
                              f"this code reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if manifest.setdefault("kind", "canonical") not in KINDS:
        raise CheckpointError(f"{manifest_path}: kind {manifest['kind']!r} is not one of {', '.join(KINDS)}")
    for required in (CONFIG_FILE, MODEL_FILE):
        if required not in manifest["files"] and not (required == MODEL_FILE and MODEL_INDEX_FILE in manifest["files"]):
            raise CheckpointError(f"{path}: manifest lists no {required}")
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is listed in the manifest but missing")
        actual = _sha256(file)
        if actual != digest:
            raise CheckpointError(f"{file}: sha256 mismatch (manifest {digest[:12]}..., "
                                  f"file {actual[:12]}...): the file is corrupt or truncated")
    for part in PARTS:
        unlisted = sorted(set((_index(path, manifest, part) or {}).values()) - set(manifest["files"]))
        if unlisted:
            raise CheckpointError(f"{path}: {PARTS[part][1]} names {unlisted[0]}, which the manifest does not list")
    return manifest


def _index(path: Path, manifest: dict[str, Any], part: str) -> dict[str, str] | None:
    """tensor name -> shard file of a sharded ``part`` of a verified directory; None when unsharded."""
    index = PARTS[part][1]
    if index not in manifest["files"]:
        return None
    data = read_json(path / index, error=CheckpointError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and _PART_FILE.match(f)
                                                   for f in weight_map.values()):
        raise CheckpointError(f"{path / index}: not a safetensors index (a weight_map of shard file names)")
    return weight_map


def _shards(weight_map: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """file -> its tensor names, sorted."""
    out: dict[str, list[str]] = {}
    for name, file in sorted(weight_map.items(), key=lambda kv: (kv[1], kv[0])):
        out.setdefault(file, []).append(name)
    return {f: tuple(names) for f, names in out.items()}


def _read_part(path: Path, manifest: dict[str, Any], part: str, lazy: bool = False
               ) -> tuple[dict[str, Any], dict[str, tuple[str, ...]]]:
    """Every tensor of ``part`` (none when absent; ``lazy``: a ``TensorSlices`` each) and its files;
    a shard whose tensors differ from the index is corrupt."""
    single, index = PARTS[part]
    if lazy:
        reader = _reader(path, manifest, part)
        return reader.lazy(), _shards(reader.weight_map)
    weight_map = _index(path, manifest, part)
    if weight_map is None:
        if single not in manifest["files"]:
            return {}, {}
        tensors = load_file(str(path / single))
        return tensors, {single: tuple(sorted(tensors))}
    tensors: dict[str, np.ndarray] = {}
    shards = _shards(weight_map)
    for file, names in shards.items():
        loaded = load_file(str(path / file))
        if set(loaded) != set(names):
            raise ValueError(f"{file} holds {sorted(loaded)[:3]}..., not the tensors {index} assigns it")
        tensors.update(loaded)
    return tensors, shards


def load_checkpoint(path: str | os.PathLike, *, load_state: bool = True, allow_named: bool = False,
                    lazy: bool = False) -> Checkpoint:
    """Verify and load a checkpoint; raise CheckpointError on any problem, before returning data.

    A named checkpoint (not a decoder) is refused unless ``allow_named``. ``lazy``: ``params`` and
    ``state_tensors`` hold a ``TensorSlices`` per tensor (shapes checked from the headers), no data."""
    return _read_checkpoint(Path(path), verify_checkpoint(path), load_state, allow_named, lazy)


def _read_checkpoint(path: Path, manifest: dict[str, Any], load_state: bool, allow_named: bool,
                     lazy: bool = False) -> Checkpoint:
    """The checkpoint of a directory whose ``manifest`` was verified."""
    kind = manifest.get("kind", "canonical")
    try:
        config = read_json(path / CONFIG_FILE, error=CheckpointError)
        if not isinstance(config, dict):
            raise ValueError(f"{CONFIG_FILE} holds a {type(config).__name__}, not an object")
        if kind == "named" and not allow_named:
            raise CheckpointError(f"{path}: a named-tensor checkpoint of task {config.get('task', '?')!r}, not "
                                  "a decoder: its parameters are that task's own model, with no ModelSpec to "
                                  "build; only the training engines resume it")
        spec = ModelSpec.from_dict(config.get("model", {})) if kind == "canonical" else None
        params, shards = _read_part(path, manifest, "model", lazy)
        if spec is not None:
            check_params(spec, params, where=f"{path / next(iter(shards), MODEL_FILE)}")
    except (SpecError, OSError, ValueError, AttributeError, SafetensorError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    state_tensors: dict[str, Any] = {}
    state_meta: dict[str, Any] = {}
    if load_state:
        # a valid manifest only says the files are the ones written: a writer's bug or an edit
        # before hashing can still leave them unreadable, which is a corrupt checkpoint too
        try:
            state_tensors, _ = _read_part(path, manifest, "state", lazy)
            if STATE_META_FILE in manifest["files"]:
                state_meta = read_json(path / STATE_META_FILE, error=ValueError)
                if not isinstance(state_meta, dict):
                    raise ValueError(f"{STATE_META_FILE} holds a {type(state_meta).__name__}, not an object")
        except (OSError, ValueError, SafetensorError) as e:
            raise CheckpointError(f"{path}: unreadable training state: {' '.join(str(e).split())}") from None
    return Checkpoint(path, config, spec, params, state_tensors, state_meta, kind, shards)


def open_checkpoint(path: str | os.PathLike, *, load_state: bool = True, allow_named: bool = False) -> Checkpoint:
    """``load_checkpoint(resolve_checkpoint(path))`` with every file hashed once: ``path`` itself, or
    for a directory of ``step_<N>`` checkpoints the newest one that verifies."""
    found, manifest = _resolve(Path(path))
    if manifest is None:
        return load_checkpoint(found, load_state=load_state, allow_named=allow_named)
    return _read_checkpoint(found, manifest, load_state, allow_named)


class TensorReader:
    """The tensors of one part of a verified checkpoint, read one at a time: ``read(name)`` whole or
    ``read_slice(name, index)`` (e.g. ``(slice(0, 64), slice(None))``: only those bytes are read).
    Every file's hash is checked when it is opened (``open_tensors``), before anything is read."""

    def __init__(self, path: Path, weight_map: dict[str, str]):
        self.path = path
        self._weight_map = weight_map
        self._open: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self._weight_map)

    @property
    def weight_map(self) -> dict[str, str]:
        """tensor name -> its file."""
        return dict(self._weight_map)

    def lazy(self) -> dict[str, TensorSlices]:
        """A ``TensorSlices`` per tensor (headers read, no data)."""
        return {name: TensorSlices(self, name, self.shape(name)) for name in self.names}

    def _view(self, name: str) -> Any:
        if name not in self._weight_map:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in this checkpoint")
        file = self._weight_map[name]
        if file not in self._open:
            try:
                self._open[file] = safe_open(str(self.path / file), framework="numpy")
            except (OSError, SafetensorError) as e:
                raise CheckpointError(f"{self.path / file}: {e}") from None
        return self._open[file].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._view(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._view(name)[:]

    def read_slice(self, name: str, index: Any) -> np.ndarray:
        """``tensor[index]`` for basic indexing (slices and integers), read from the file alone."""
        return self._view(name)[index]

    def close(self) -> None:
        self._open.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TensorSlices(NamedTuple):
    """One tensor of a checkpoint, not read yet: its ``shape`` (from the header) and ``read(index)``,
    that slice alone (``TensorReader.read_slice``; None: the whole tensor)."""

    reader: TensorReader
    name: str
    shape: tuple[int, ...]

    def read(self, index: Any = None) -> np.ndarray:
        return self.reader.read(self.name) if index is None else self.reader.read_slice(self.name, index)


def open_tensors(path: str | os.PathLike, *, part: str = "model") -> TensorReader:
    """A ``TensorReader`` of ``part`` (``"model"`` or ``"state"``) of the checkpoint at ``path`` (or the
    newest valid one of a directory of them), after verifying every file."""
    if part not in PARTS:
        raise CheckpointError(f"open_tensors part={part!r} must be one of {', '.join(PARTS)}")
    found, manifest = _resolve(Path(path))
    manifest = verify_checkpoint(found) if manifest is None else manifest
    return _reader(found, manifest, part)


def _reader(found: Path, manifest: dict[str, Any], part: str) -> TensorReader:
    """The ``TensorReader`` of ``part`` of the verified directory ``found``."""
    weight_map = _index(found, manifest, part)
    single = PARTS[part][0]
    if weight_map is None and single in manifest["files"]:
        try:
            weight_map = {name: single for name in _header(found / single)}
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{found / single}: {e}") from None
    return TensorReader(found, weight_map or {})


_STEP_DIR = re.compile(r"^step_(\d+)$")


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` for every ``step_<N>`` directory, newest first (not verified)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found, reverse=True)


_INTERRUPTED = re.compile(r"^\.(step_\d+)\.(tmp|old)-")


def recover_interrupted_writes(checkpoints_dir: str | os.PathLike) -> list[str]:
    """Clean what an interrupted ``save_checkpoint`` left in ``checkpoints_dir``; one message per entry.

    ``.step_N.tmp-*`` is a write that never reached its rename: never a valid checkpoint, removed.
    ``.step_N.old-*`` is the previous ``step_N`` moved aside while an overwrite swapped the new one in:
    removed when ``step_N`` is in place, renamed back to ``step_N`` when the swap was cut between
    its two renames and it verifies (it is then the only copy of that step).
    """
    root = Path(checkpoints_dir)
    done: list[str] = []
    if not root.is_dir():
        return done
    for child in sorted(root.iterdir()):
        m = _INTERRUPTED.match(child.name)
        if not m or not child.is_dir():
            continue
        target = root / m.group(1)
        if m.group(2) == "old" and not target.exists():
            try:
                verify_checkpoint(child)
            except CheckpointError:
                pass
            else:
                os.rename(child, target)
                done.append(f"restored {target} from the interrupted overwrite {child.name}")
                continue
        shutil.rmtree(child, ignore_errors=True)
        done.append(f"removed {child} (left by an interrupted checkpoint write)")
    return done


def _newest_valid(checkpoints_dir: str | os.PathLike
                  ) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, str]]]:
    """(newest checkpoint that verifies, its manifest, ``(path, reason)`` for each newer one skipped)."""
    skipped: list[tuple[Path, str]] = []
    for _, path in list_checkpoints(checkpoints_dir):
        try:
            return path, verify_checkpoint(path), skipped
        except CheckpointError as e:
            skipped.append((path, str(e)))
    return None, None, skipped


def latest_valid_checkpoint(
    checkpoints_dir: str | os.PathLike,
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and ``(path, reason)`` for each newer one skipped."""
    path, _, skipped = _newest_valid(checkpoints_dir)
    return path, skipped


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a directory of ``step_<N>`` checkpoints the newest valid one."""
    return _resolve(Path(path))[0]


def _resolve(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """``resolve_checkpoint`` and, when it had to verify the one it picked, that one's manifest."""
    if (path / MANIFEST_FILE).exists() or not list_checkpoints(path):
        return path, None
    found, manifest, skipped = _newest_valid(path)
    if found is None:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise CheckpointError(f"{path}: no valid step_<N> checkpoint ({reasons})")
    return found, manifest
