"""The canonical checkpoint: one directory format that both backends read and write.

```
<dir>/model.safetensors   canonical parameter names (llm.spec), float32, (out, in) linears
<dir>/config.json         the full resolved run config; its "model" entry is the ModelSpec
<dir>/state.safetensors   optional: optimizer moments etc. under canonical-derived names
<dir>/state.json          optional: step, schedule, RNG, data cursor (JSON-safe values)
<dir>/manifest.json       format version, kind and the sha256 of every other file
```

Two kinds (the manifest's ``kind``; absent reads as ``canonical``):

* ``canonical`` -- ``model.safetensors`` is the parameter table of the ModelSpec in
  ``config.json``'s ``"model"``, checked against it on writing and loading: a decoder either backend
  (and ``llm.load``, the HF export, ``training.init_from``) can build.
* ``named`` -- a task's own model that is not a ModelSpec decoder (``TrainingTask.canonical=False``,
  e.g. the ``regression`` MLP): ``model.safetensors`` holds the task half's parameters under its own
  names (torch ``state_dict`` keys, flax NNX paths), ``Checkpoint.spec`` is None, and only a loader
  that asks for it (``allow_named=True``: the training engines' resume) gets one; every other loader
  refuses it with a ``CheckpointError`` saying it is not a decoder. Same files, hashes and atomic
  rename as a canonical one.

Writes go to a sibling temporary directory that is renamed into place, so a crash never leaves a
half-written checkpoint under the final name. Loading verifies every hash first and refuses a torn
or corrupt directory as a whole (``CheckpointError``); nothing is loaded partially. No pickle.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from llm.io import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    STATE_META_FILE,
    atomic_directory,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)
from llm.spec import ModelSpec, SpecError, check_params

FORMAT_NAME = "llm-canonical-checkpoint"
FORMAT_VERSION = 1
KINDS = ("canonical", "named")  # manifest.json "kind" (see the module docstring)
_RESERVED = {MODEL_FILE, CONFIG_FILE, STATE_FILE, STATE_META_FILE, MANIFEST_FILE}

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "KINDS",
    "save_checkpoint",
    "load_checkpoint",
    "open_checkpoint",
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
    ``"canonical"``, ``spec`` its ModelSpec) or the task half's own names (``"named"``, ``spec`` None)."""

    path: Path
    config: dict[str, Any]
    spec: ModelSpec | None
    params: dict[str, np.ndarray]
    state_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    state_meta: dict[str, Any] = field(default_factory=dict)
    kind: str = "canonical"


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
) -> Path:
    """Atomically write a checkpoint of ``kind`` (``KINDS``) to ``path`` and return it.

    Canonical: ``config`` must hold the spec under ``"model"`` (a run config dict or just
    ``{"model": ...}``); ``params`` are validated against that spec before anything is written.
    Named: ``params`` are a task's own name -> array, written as given (float32); ``config`` is the
    run config. ``extra_files`` maps a file name (e.g. ``tokenizer.json``) to a path to copy or to
    bytes; they are hashed like the rest.
    """
    path = Path(path)
    if kind not in KINDS:
        raise CheckpointError(f"checkpoint kind={kind!r} must be one of {', '.join(KINDS)}")
    params = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    if kind == "canonical":
        if "model" not in config:
            raise CheckpointError("config must contain a 'model' section (the ModelSpec fields)")
        check_params(ModelSpec.from_dict(config["model"]), params, where=f"parameters for checkpoint {path}")
    elif not params:
        raise CheckpointError(f"parameters for checkpoint {path}: a named checkpoint needs at least one tensor")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists (pass overwrite=True to replace it)")

    try:
        with atomic_directory(path, replace=True) as tmp:
            _write_tensors(tmp / MODEL_FILE, params)
            write_json_atomic(tmp / CONFIG_FILE, config, sort_keys=True)
            if state_tensors is not None:
                _write_tensors(tmp / STATE_FILE, {k: np.asarray(v) for k, v in state_tensors.items()})
            if state_meta is not None:
                write_json_atomic(tmp / STATE_META_FILE, state_meta, sort_keys=True)
            for name, source in (extra_files or {}).items():
                if Path(name).name != name or name in _RESERVED:
                    raise CheckpointError(f"extra file name {name!r} must be a plain file name other than "
                                          f"{sorted(_RESERVED)}")
                if isinstance(source, bytes):
                    write_bytes_atomic(tmp / name, source)
                else:
                    shutil.copyfile(source, tmp / name)
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "kind": kind,
                "files": {name: _sha256(tmp / name) for name in files},
            }
            write_json_atomic(tmp / MANIFEST_FILE, manifest, sort_keys=True)
    except (OSError, SafetensorError) as e:  # a full disk, a vanished or read-only directory
        raise CheckpointError(f"cannot write checkpoint {path}: {_write_failure(e)}; the partial write was "
                              "removed and the previous checkpoints are intact") from None
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


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check the manifest and every file hash; return the manifest or raise CheckpointError."""
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
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: format version {manifest.get('version')!r}, "
                              f"this code reads version {FORMAT_VERSION}")
    if manifest.setdefault("kind", "canonical") not in KINDS:
        raise CheckpointError(f"{manifest_path}: kind {manifest['kind']!r} is not one of {', '.join(KINDS)}")
    for required in (MODEL_FILE, CONFIG_FILE):
        if required not in manifest["files"]:
            raise CheckpointError(f"{path}: manifest lists no {required}")
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is listed in the manifest but missing")
        actual = _sha256(file)
        if actual != digest:
            raise CheckpointError(f"{file}: sha256 mismatch (manifest {digest[:12]}..., "
                                  f"file {actual[:12]}...): the file is corrupt or truncated")
    return manifest


def load_checkpoint(path: str | os.PathLike, *, load_state: bool = True, allow_named: bool = False) -> Checkpoint:
    """Verify and load a checkpoint; raise CheckpointError on any problem, before returning data.

    A named checkpoint (not a decoder) is refused unless ``allow_named``."""
    return _read_checkpoint(Path(path), verify_checkpoint(path), load_state, allow_named)


def _read_checkpoint(path: Path, manifest: dict[str, Any], load_state: bool, allow_named: bool) -> Checkpoint:
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
        params = load_file(str(path / MODEL_FILE))
        if spec is not None:
            check_params(spec, params, where=f"{path / MODEL_FILE}")
    except (SpecError, OSError, ValueError, AttributeError, SafetensorError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    state_tensors: dict[str, np.ndarray] = {}
    state_meta: dict[str, Any] = {}
    if load_state:
        # a valid manifest only says the files are the ones written: a writer's bug or an edit
        # before hashing can still leave them unreadable, which is a corrupt checkpoint too
        try:
            if STATE_FILE in manifest["files"]:
                state_tensors = load_file(str(path / STATE_FILE))
            if STATE_META_FILE in manifest["files"]:
                state_meta = read_json(path / STATE_META_FILE, error=ValueError)
                if not isinstance(state_meta, dict):
                    raise ValueError(f"{STATE_META_FILE} holds a {type(state_meta).__name__}, not an object")
        except (OSError, ValueError, SafetensorError) as e:
            raise CheckpointError(f"{path}: unreadable training state: {' '.join(str(e).split())}") from None
    return Checkpoint(path, config, spec, params, state_tensors, state_meta, kind)


def open_checkpoint(path: str | os.PathLike, *, load_state: bool = True, allow_named: bool = False) -> Checkpoint:
    """``load_checkpoint(resolve_checkpoint(path))`` with every file hashed once: ``path`` itself, or
    for a directory of ``step_<N>`` checkpoints the newest one that verifies."""
    found, manifest = _resolve(Path(path))
    if manifest is None:
        return load_checkpoint(found, load_state=load_state, allow_named=allow_named)
    return _read_checkpoint(found, manifest, load_state, allow_named)


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
