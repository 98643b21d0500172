"""gs:// in memory for the cloud-path tests (test_paths.py, test_cloud_sample_eval.py): an fsspec
`MemoryFileSystem` registered for the gs / gcs schemes (what gcsfs does for real buckets), which,
like a bucket, writes objects whole and cannot append to one. Tests take conftest.py's `bucket`
fixture (`registered()` below); `FakeBucket.store` holds the objects, in the order written."""

from __future__ import annotations

import contextlib
from typing import Iterator

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class FakeBucket(MemoryFileSystem):
    """gs:// in memory. Objects are written whole: no append (as GCS)."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):
        super().__init__(*args, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError("a bucket object cannot be appended to")
        return super()._open(path, mode, **kwargs)


@contextlib.contextmanager
def registered() -> Iterator[str]:
    """An empty FakeBucket as gs:// (and gcs://) while the block runs; yields "gs://test-bucket"."""
    from etils.epath import backend

    saved = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
    for p in ("gs", "gcs"):
        fsspec.register_implementation(p, FakeBucket, clobber=True)
    FakeBucket.store.clear()
    FakeBucket.pseudo_dirs[:] = [""]
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the filesystem per scheme
    try:
        yield "gs://test-bucket"
    finally:
        FakeBucket.store.clear()
        backend.fsspec_backend._get_filesystem.cache_clear()
        for p, impl in saved.items():
            if impl is not None:
                fsspec.register_implementation(p, impl, clobber=True)
