"""Files on disk and the command lines: the one home of the file names, atomic writes, JSON reads and
the argument-parser base every ``python -m llm.*`` command uses.

* File names of a checkpoint and a run directory (``MODEL_FILE``, ``CONFIG_FILE``, ``TOKENIZER_FILE``,
  ...): ``llm.checkpoint`` documents the checkpoint layout, ``llm.run`` the run directory.
* ``write_bytes_atomic`` / ``write_text_atomic`` / ``write_json_atomic``: the data goes to a hidden
  sibling, is fsynced, and is renamed over ``path`` (then the directory is fsynced), so a reader sees
  the old file or the new one, never a torn one.
* ``atomic_directory(path)``: the same for a whole directory (checkpoints, exported models, token
  caches): fill the temporary sibling it yields; it is renamed into place only when the block ends
  without an exception, and removed otherwise. ``temp_sibling`` / ``move_into_place`` are its two
  halves, for a directory filled by several writers (a sharded checkpoint).
* ``read_json(path, error=...)``: bad UTF-8 or bad JSON is one line naming the file, raised as the
  caller's error class.
* ``CliParser``: argparse whose usage errors are one ``error:`` line on stderr and exit status 2.

This module must not import torch or jax.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_FILE", "MANIFEST_FILE", "METRICS_FILE", "MODEL_FILE", "PLOT_FILE", "STATE_FILE",
           "STATE_META_FILE", "SUMMARY_FILE", "TOKENIZER_FILE", "CliParser", "atomic_directory", "fsync_dir",
           "move_into_place", "read_json", "temp_sibling", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]

# a canonical checkpoint (llm.checkpoint)
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"  # also the run directory's resolved config
STATE_FILE = "state.safetensors"
STATE_META_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"  # in checkpoints, run directories and token caches
# a run directory (llm.run)
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename inside it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` (parents made) by fsynced temporary sibling and rename; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666: the umask decides, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``write_bytes_atomic`` of ``text`` in UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2,
                      sort_keys: bool = False) -> Path:
    """``obj`` as JSON (``indent``, ``sort_keys``; non-ASCII kept as is) plus a newline, atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


@contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``path`` to fill; on a clean exit it is fsynced and renamed
    to ``path`` (``move_into_place``). On any exception it is removed."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        move_into_place(tmp, path, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after the rename


def temp_sibling(path: str | os.PathLike) -> Path:
    """A new empty directory ``.<name>.tmp-*`` beside ``path`` (parents made): where a directory
    that ``move_into_place`` renames to ``path`` is filled."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def move_into_place(tmp: Path, path: str | os.PathLike, *, replace: bool = False) -> None:
    """Fsync the filled directory ``tmp`` and rename it to ``path``: an existing ``path`` is swapped
    out (``.<name>.old-*``) and deleted when ``replace``, else the rename's OSError propagates unless
    ``path`` is an empty directory."""
    path = Path(path)
    fsync_dir(tmp)
    if replace and (path.exists() or path.is_symlink()):
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(path, old)
        os.rename(tmp, path)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.rename(tmp, path)
    fsync_dir(path.parent)


def read_json(path: str | os.PathLike, *, error: type[Exception] = ValueError) -> Any:
    """The JSON value in ``path``. Text that is not UTF-8 or not JSON raises ``error`` with one line
    naming the file and the position; a missing or unreadable file is the OSError of reading it."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


class CliParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, ``[<error_label>: ]error: <message> (see --help)``,
    on stderr with exit status 2, and no usage block. Subcommand parsers get the class through
    ``add_subparsers(parser_class=CliParser)``."""

    def __init__(self, *args: Any, error_label: str = "", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.error_label = error_label

    def error(self, message: str) -> None:  # type: ignore[override]
        label = f"{self.error_label}: " if self.error_label else ""
        self.exit(2, f"{label}error: {message} (see --help)\n")
