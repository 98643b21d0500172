"""Paths that may be local or cloud URIs (`gs://bucket/...`, `s3://...`): one abstraction, etils
`epath` (the one Orbax, Grain and TFDS already use), for every path the command line takes.

Most code opens paths with `epath.Path(p)` directly. The helpers here cover what `os.path` did
(absolute paths that leave URIs alone) and the libraries that only read or write local files
(safetensors, sentencepiece, PIL on a path, TFDS's final renames): `local_copy` brings a remote
file or directory into a temporary local one; `staged_output` lets a writer fill a local directory
that is uploaded to the remote destination when it completes (nothing is uploaded on failure).

Reaching gs:// needs a filesystem backend: `pip install gcsfs` (fsspec), or TensorFlow (not used
by this project); Orbax checkpoints on gs:// also need `google-cloud-storage` (Orbax asks it about
the bucket's layout; TensorStore reads and writes the arrays with its own GCS driver). Tests
register an in-memory filesystem as `gs://` (tests/fake_bucket.py, the `bucket` fixture).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath


def is_remote(path) -> bool:
    """True for URIs with a scheme other than file:// (gs://, s3://, ...)."""
    text = os.fspath(path) if not isinstance(path, str) else path
    return "://" in text and not text.startswith("file://")


def absolute(path) -> str:
    """A path as the command line gives it, made independent of the working directory: `~`
    expanded, relative paths made absolute, `.` / `..` / trailing slashes normalised (symlinks are
    kept, not resolved); URIs unchanged but for a trailing slash; "" (unset) stays "".

    Orbax refuses relative checkpoint paths, and a run's config.json must name files that a later
    command, started from another directory, still finds."""
    text = os.fspath(path)
    if not text:
        return text
    if is_remote(text):
        scheme, _, rest = text.partition("://")
        return f"{scheme}://{rest.rstrip('/') or rest}"
    return os.path.abspath(os.path.expanduser(text))


def join(base, *parts) -> str:
    """`os.path.join` that keeps URIs (`gs://b/x` + `y` -> `gs://b/x/y`); an absolute or remote
    part starts over, as with os.path.join."""
    out = os.fspath(base)
    for part in parts:
        part = os.fspath(part)
        if is_remote(part) or os.path.isabs(part):
            out = part
        else:
            out = os.fspath(epath.Path(out) / part) if is_remote(out) else os.path.join(out, part)
    return out


def parent(path) -> str:
    """`os.path.dirname` that keeps URIs."""
    return os.fspath(epath.Path(path).parent) if is_remote(path) else os.path.dirname(os.fspath(path))


def exists(path) -> bool:
    """`os.path.exists` for local paths, epath for URIs."""
    return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def is_file(path) -> bool:
    """`os.path.isfile` for local paths, epath for URIs."""
    return epath.Path(path).is_file() if is_remote(path) else os.path.isfile(path)


def is_dir(path) -> bool:
    """`os.path.isdir` for local paths, epath for URIs (a bucket "directory" is a key prefix)."""
    return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path) -> list[str]:
    """`os.listdir` for local paths (names), epath for URIs."""
    return [p.name for p in epath.Path(path).iterdir()] if is_remote(path) else os.listdir(path)


def open_file(path, mode: str = "r"):
    """`open` for local paths, `epath.Path(path).open` for URIs (a bucket object is written whole
    when the file is closed and cannot be appended to or written at an offset)."""
    return epath.Path(path).open(mode) if is_remote(path) else open(path, mode)


def copy_tree(src, dst, last: tuple[str, ...] = ()) -> None:
    """Copy a file or a directory tree from `src` to `dst` (either may be remote). Files named in
    `last` are copied after everything else in their directory (e.g. the marker a reader looks
    for, so that a reader never finds a half-copied dataset)."""
    src, dst = epath.Path(src), epath.Path(dst)
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in sorted(src.iterdir(), key=lambda c: c.name in last):
            copy_tree(child, dst / child.name, last)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with src.open("rb") as fin, dst.open("wb") as fout:
            shutil.copyfileobj(fin, fout, length=16 << 20)


@contextlib.contextmanager
def local_copy(path) -> Iterator[str]:
    """A local path with the contents of `path`: itself when local, else a temporary copy of the
    remote file or directory (same base name), removed afterwards."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    src = epath.Path(path)
    if not src.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    with tempfile.TemporaryDirectory(prefix="unialignment-") as tmp:
        local = os.path.join(tmp, src.name or "data")
        copy_tree(src, local)
        yield local


@contextlib.contextmanager
def staged_output(path, last: tuple[str, ...] = ()) -> Iterator[str]:
    """A local directory to write `path`'s contents into: `path` itself when local; else a
    temporary directory uploaded to `path` when the block completes without an exception (files
    named in `last` uploaded last in their directory, as in `copy_tree`)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="unialignment-out-") as tmp:
        local = os.path.join(tmp, epath.Path(path).name or "out")
        yield local
        if os.path.exists(local):
            copy_tree(local, path, last)


__all__ = ["is_remote", "absolute", "join", "parent", "exists", "is_file", "is_dir", "listdir", "open_file",
           "copy_tree", "local_copy", "staged_output", "epath"]
