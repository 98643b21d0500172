"""The rows of `unialignment prepare` (data/prepare.py is the command): manifest lines parsed and
their images read (data/manifests.py, in worker processes with --workers), then per batch the
codec latents and teacher features, each row checked against the RecordSpec; a bad row is
reported with its manifest line and reason and skipped (`--strict`: the first is fatal)."""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Iterator

import numpy as np
from etils import epath

from unialignment_jax.data import images as image_lib
from unialignment_jax.data import manifests
from unialignment_jax.data.manifests import Row, RowOptions, process_star
from unialignment_jax.data.records import RecordError, RecordSpec, new_record

log = logging.getLogger(__name__)


class PrepareError(Exception):
    """A fatal error while preparing (exit code 1)."""

    exit_code = 1


# ------------------------------------------------------------------------------ report


@dataclasses.dataclass
class PrepareReport:
    manifests: list
    task: str
    split: str
    out: str = ""
    read: int = 0
    written: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    bad: list = dataclasses.field(default_factory=list)  # (manifest, line, reason, detail)
    num_shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    complete: bool = False
    error: str = ""

    def add_bad(self, manifest: str, line: int, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.bad.append((manifest, line, reason, detail))

    def summary(self, max_lines: int = 200) -> str:
        lines = [f"prepare {self.task} ({self.split}): {', '.join(self.manifests)}",
                 f"  rows read:    {self.read}",
                 f"  rows written: {self.written}",
                 f"  rows skipped: {sum(self.skipped.values())}"]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"    {reason}: {n}")
        if self.bad:
            lines.append("  bad rows:")
            for manifest, line, reason, detail in self.bad[:max_lines]:
                lines.append(f"    {manifest}:{line}: {reason}" + (f": {detail}" if detail else ""))
            if len(self.bad) > max_lines:
                lines.append(f"    ... {len(self.bad) - max_lines} more (all in prepare_report.json)")
        if self.complete:
            lines.append(f"  dataset: {self.out} ({self.num_shards} ArrayRecord files, "
                         f"{self.bytes / 2 ** 20:.1f} MiB, {self.seconds:.1f} s)")
        else:
            lines.append(f"  nothing written: {self.error}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return dict(manifests=self.manifests, task=self.task, split=self.split, out=self.out, read=self.read,
                    written=self.written, skipped=dict(self.skipped),
                    bad=[dict(manifest=m, line=n, reason=r, detail=d) for m, n, r, d in self.bad],
                    num_shards=self.num_shards, bytes=self.bytes, seconds=round(self.seconds, 3),
                    complete=self.complete, error=self.error)


# ------------------------------------------------------------------------------ options


@dataclasses.dataclass
class PrepareOptions:
    manifests: list
    out: str
    task: str
    split: str
    row: RowOptions
    spec: RecordSpec
    strict: bool = False
    num_shards: int = 0
    min_shards: int = 8
    batch_size: int = 16
    workers: int = 0
    overwrite: bool = False
    codec_config: Any = None
    teacher: str = ""
    teacher_path: str | None = None
    teacher_device: str = "cpu"
    teacher_dtype: str = "float32"
    max_report_lines: int = 200
    compression: str = "uncompressed"


# ------------------------------------------------------------------------------ codec / teacher


class _LatentEncoder:
    """uint8 pixels (B, R, R, 3) -> latents (B, h, w, C) through the config's codec (jitted; the
    VAE gives its posterior mean: `encode(pixels, rng=None)`). Batches are padded to `batch_size`
    so the encoder compiles once."""

    def __init__(self, config, batch_size: int):
        try:
            from unialignment_jax.models.encoders import build_codec
        except ImportError as e:
            raise PrepareError(f"--latents: the codec factory models/encoders.py:build_codec is unavailable ({e})")
        import jax
        from flax import nnx

        codec = build_codec(config)
        graphdef, state = nnx.split(codec)
        self.state = state
        self.batch_size = batch_size
        self.encode = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x, rng=None))

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(pixels), self.batch_size):
            chunk = image_lib.normalize(pixels[i:i + self.batch_size])
            n = len(chunk)
            if n < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(self.encode(self.state, chunk), dtype=np.float32)[:n])
        return np.concatenate(out)


def _load_teacher(opts: PrepareOptions):
    from unialignment_jax.data import teachers

    return teachers.build_teacher(opts.teacher, path=opts.teacher_path, dim=opts.spec.teacher_dim,
                                  device=opts.teacher_device, dtype=opts.teacher_dtype)


# ------------------------------------------------------------------------------ the rows


class Preparer:
    """Manifest rows -> (key, record) pairs for the TFDS builder, counting into the report."""

    def __init__(self, opts: PrepareOptions, report: PrepareReport):
        self.opts, self.report = opts, report
        self.encoder = None
        self.teacher = None
        self.bar = None  # the progress bar, set by prepare() around the build
        spec = opts.spec
        if spec.has_latents:
            self.encoder = _LatentEncoder(opts.codec_config, opts.batch_size)
            r = opts.row.resolution
            lat = self.encoder(np.zeros((1, r, r, 3), np.uint8))
            spec = dataclasses.replace(spec, latent_shape=tuple(int(x) for x in lat.shape[1:]))
        if opts.teacher:
            self.teacher = _load_teacher(opts)
            spec = dataclasses.replace(spec, teacher_dim=int(self.teacher.dim))
        self.spec = spec

    def _lines(self) -> Iterator[tuple]:
        multi = len(self.opts.manifests) > 1
        for i, path in enumerate(self.opts.manifests):
            base = epath.Path(path).name
            with epath.Path(path).open("rb") as f:
                for n, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    self.report.read += 1
                    self._show_progress()
                    yield path, (f"{i}/{base}:{n}" if multi else f"{base}:{n}"), n, raw

    def _show_progress(self, update: int = 1) -> None:
        """The bar (rows read; written and skipped so far), or without one a log line per 10,000 rows."""
        r = self.report
        self.bar.update(update)
        if not self.bar.disable:
            self.bar.set_postfix_str(f"written {r.written}, skipped {sum(r.skipped.values())}", refresh=not update)
        elif update and r.read % 10_000 == 0:
            log.info("prepare: %d rows read, %d written, %d skipped", r.read, r.written, sum(r.skipped.values()))

    def _results(self) -> Iterator[tuple[str, tuple]]:
        o = self.opts
        if o.workers <= 0:
            for path, key, n, raw in self._lines():
                yield path, manifests.process_line(o.row, key, n, raw)
            return
        import concurrent.futures
        import multiprocessing

        chunk = 32 * o.workers
        with concurrent.futures.ProcessPoolExecutor(o.workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            buf = []
            for item in self._lines():
                buf.append(item)
                if len(buf) == chunk:
                    yield from zip([b[0] for b in buf], ex.map(process_star, [(o.row, *b[1:]) for b in buf], chunksize=8))
                    buf = []
            if buf:
                yield from zip([b[0] for b in buf], ex.map(process_star, [(o.row, *b[1:]) for b in buf], chunksize=8))

    def _bad(self, manifest: str, line: int, reason: str, detail: str) -> None:
        self.report.add_bad(manifest, line, reason, detail)
        msg = f"{manifest}:{line}: {reason}" + (f": {detail}" if detail else "")
        if self.opts.strict:
            raise PrepareError(f"bad row (--strict): {msg}")
        log.warning("skipping %s", msg)

    def _latents(self, rows: list[Row]) -> list[dict]:
        spec, k = self.spec, self.spec.num_cond
        lat_t = self.encoder(np.stack([r.pixels[-1] for r in rows]))
        lat_c = None
        if k:
            lat_c = self.encoder(np.stack([p for r in rows for p in r.pixels[:-1]]))
            lat_c = lat_c.reshape(len(rows), k, *lat_t.shape[1:])
        out = []
        for j in range(len(rows)):
            d = {"target_latents": lat_t[j].astype(spec.latent_dtype)}
            if k:
                d["cond_latents"] = lat_c[j].astype(spec.latent_dtype)
            bad = [n for n, a in d.items() if not np.isfinite(a).all()]
            out.append(("codec failed", f"non-finite {bad[0]}") if bad else d)
        return out

    def _teacher_features(self, rows: list[Row]) -> list[dict]:
        texts = [r.texts["caption"] if self.spec.task != "vqa" else f"{r.texts['question']} {r.texts['caption']}"
                 for r in rows]
        fi = np.asarray(self.teacher.encode_images([r.pixels[-1] for r in rows]), np.float16)
        ft = np.asarray(self.teacher.encode_texts(texts), np.float16)
        return [{"teacher_image": fi[j], "teacher_text": ft[j]}
                if np.isfinite(fi[j]).all() and np.isfinite(ft[j]).all() else ("teacher failed", "non-finite features")
                for j in range(len(rows))]

    @staticmethod
    def _per_row(fn, rows: list[Row], reason: str) -> list:
        """fn over the batch; if it raises, row by row, so one bad row cannot fail the others."""
        try:
            return fn(rows)
        except Exception as e:  # noqa: BLE001 (reported per row below)
            if len(rows) == 1:
                return [(reason, f"{type(e).__name__}: {e}")]
            log.warning("%s on a batch (%s: %s); retrying row by row", reason, type(e).__name__, e)
            return [Preparer._per_row(fn, [r], reason)[0] for r in rows]

    def _finish(self, batch: list[tuple[str, Row]]) -> Iterator[tuple[str, dict]]:
        spec, k = self.spec, self.spec.num_cond
        rows = [r for _, r in batch]
        extra = [{} for _ in rows]
        for fn, reason, on in ((self._latents, "codec failed", self.encoder),
                               (self._teacher_features, "teacher failed", self.teacher)):
            if on is None:
                continue
            todo = [j for j, e in enumerate(extra) if isinstance(e, dict)]
            for j, res in zip(todo, self._per_row(fn, [rows[j] for j in todo], reason)):
                extra[j] = {**extra[j], **res} if isinstance(res, dict) else res
        for (manifest, row), arrays in zip(batch, extra):
            if not isinstance(arrays, dict):
                self._bad(manifest, row.line, *arrays)
                continue
            if spec.has_images:
                arrays["target_image"] = row.encoded[-1]
                if k:
                    arrays["cond_images"] = list(row.encoded[:-1])
            rec = new_record(spec.task, key=row.key, **row.texts, **arrays)
            try:
                spec.validate(rec)
            except RecordError as e:
                self._bad(manifest, row.line, "invalid record", str(e))
                continue
            self.report.written += 1
            yield row.key, rec

    def examples(self) -> Iterator[tuple[str, dict]]:
        batch = []
        for manifest, res in self._results():
            if res[0] == "bad":
                self._bad(manifest, *res[1:])
                continue
            batch.append((manifest, res[1]))
            if len(batch) == self.opts.batch_size:
                yield from self._finish(batch)
                batch = []
        if batch:
            yield from self._finish(batch)
        self._show_progress(update=0)  # the final counts
