"""`evaluate --suite val_loss`: the training losses at fixed noise levels on held-out data.

The SD3 validation protocol: the image loss is evaluated at a fixed set of sigmas (here K = 8
levels at the midpoints (k + 0.5) / K) instead of the random logit-normal draw, with fixed noise, so
that curves are comparable across runs and checkpoints; the text (masked-diffusion) loss likewise at
fixed t = (k + 0.5) / K with fixed masks. Everything else is the training objective itself
(`objectives.unified.dual_stream_loss` with the image and text terms, weight 1 each, explicit draws,
no CFG dropout), so the numbers are the `loss/image` and `loss/text` of training, conditioned on
the level. Noise and masks are drawn per example from (seed, example index, level): the result
does not depend on the batch size. Images are encoded with the codec's posterior mean.

`text_shuffled` is the same text loss with each caption paired with the next example's image (the
batch's images rolled by one; same masks): how much the understanding branch reads the image. A
text head that ignores the image scores the same on both; the gap is what the image tells it.

Data: the `validation` split of each task's configured sources (`data/pipeline.make_eval_iterator`;
held-out Shapes scenes for the demo), the first `limit` examples (rounded down to whole batches).
A progress bar per task counts the examples evaluated (unialignment_jax/progress.py).
"""

from __future__ import annotations

import numpy as np

from unialignment_jax import progress

NUM_LEVELS = 8


def levels(k: int = NUM_LEVELS) -> np.ndarray:
    return ((np.arange(k) + 0.5) / k).astype(np.float32)


def objective_options(config, tokenizer):
    from unialignment_jax.objectives import unified

    o = config.objective
    return unified.ObjectiveOptions(
        flow_loss=o.flow_loss, timestep_shift=o.timestep_shift, cfg_dropout=0.0,
        text_normalize=o.text_normalize, contrastive_group_size=o.contrastive_group_size or None,
        antithetic_group_size=o.antithetic_group_size or None, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)


def build_eval_fn(run, task: str, k: int):
    """jit-able (params, text_state, codec_state, batch, indices, seed)
    -> {'image': (K,), 'text': (K,), 'text_shuffled': (K,)}."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from unialignment_jax import tasks as tasks_lib
    from unialignment_jax.objectives import text_diffusion, unified

    frozen, graphdef = run.frozen, run.graphdef
    options = objective_options(run.config, frozen.tokenizer)
    mask_id = frozen.tokenizer.mask_id
    has_image = task in tasks_lib.IMAGE_PASS_TASKS
    weights = unified.LossWeights(image=1.0 if has_image else 0.0, text=1.0, contrastive=0.0, align_image=0.0,
                                  align_text=0.0)
    lv = jnp.asarray(levels(k))

    def fn(params, text_state, codec_state, batch, indices, seed):
        codec = nnx.merge(frozen.codec_graphdef, codec_state)
        batch = dict(batch)
        if "target" in batch:
            batch["target_latents"] = codec.encode(batch.pop("target"))
        if "cond" in batch:
            cond = batch.pop("cond")
            b, kk = cond.shape[:2]
            lat = codec.encode(cond.reshape((b * kk,) + cond.shape[2:]))
            batch["cond_latents"] = lat.reshape((b, kk) + lat.shape[1:])
        batch.pop("teacher_image", None)
        batch.pop("teacher_text", None)
        x0 = batch["target_latents"]
        b = x0.shape[0]
        base = jax.random.key(seed)

        def one_level(j):
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), j))(indices)
            draws = {}
            if has_image:
                draws["sigma"] = jnp.full((b,), lv[j], jnp.float32)
                draws["noise"] = jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, 0), x0.shape[1:]))(keys)
                draws["cfg_drop"] = jnp.zeros((b,), bool)
            t = jnp.full((b,), lv[j], jnp.float32)
            u = jax.vmap(lambda kk: jax.random.uniform(jax.random.fold_in(kk, 1), batch["caption_ids"].shape[1:]))(keys)
            draws["text_t"] = t
            draws["text_mask"] = text_diffusion.mask_from_uniform(u, t, eps=options.text_noise_eps,
                                                                  prefix_len=batch.get("prefix_len"))
            model = nnx.merge(graphdef, params)
            loss = lambda batch, weights: unified.dual_stream_loss(
                model, frozen.text_encoder(text_state), batch, None, task=task,
                null_features=run.frozen.arrays["null_features"], mask_id=mask_id, weights=weights,
                options=options, draws=draws)[1]
            metrics = loss(batch, weights)
            # The text pass sees only the target latent: rolling it pairs every caption with another image.
            shuffled = dict(batch, target_latents=jnp.roll(x0, 1, axis=0))
            text_only = unified.LossWeights(image=0.0, text=1.0, contrastive=0.0, align_image=0.0, align_text=0.0)
            return (metrics.get("loss/image", jnp.float32(jnp.nan)), metrics["loss/text"],
                    loss(shuffled, text_only)["loss/text"])

        image, text, text_shuffled = jax.lax.map(one_level, jnp.arange(k))
        return {"image": image, "text": text, "text_shuffled": text_shuffled}

    return fn


def evaluate(run, params, tasks, *, limit: int = 256, batch_size: int = 0, seed: int = 0,
             k: int = NUM_LEVELS) -> dict:
    """{task: {'image': mean, 'text': mean, 'text_shuffled': mean, '<key>_levels': [...] for each, 'n': examples}}."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from unialignment_jax.data import pipeline
    from unialignment_jax.models import create

    config, mesh = run.config, run.mesh
    shards = int(mesh.shape["data"]) * int(mesh.shape["fsdp"])
    b = batch_size or min(int(config.batch_size), max(limit, 1))
    b = -(-b // shards) * shards
    results = {}
    for task in tasks:
        it = pipeline.make_eval_iterator(config, task, split="validation", batch_size=b, process_index=0,
                                         process_count=1)
        fn = jax.jit(build_eval_fn(run, task, k), out_shardings=NamedSharding(mesh, PartitionSpec()))
        sums = {"image": np.zeros(k), "text": np.zeros(k), "text_shuffled": np.zeros(k)}
        n = 0
        with progress.bar(max(limit, b) // b * b, f"val_loss/{task}", unit="ex") as bar:
            while n + b <= max(limit, b):
                try:
                    host = next(it)
                except StopIteration:
                    break
                batch = {key: _put(v, mesh) for key, v in host.items()}
                indices = _put(np.arange(n, n + b, dtype=np.int32), mesh)
                with create.sharding_context(mesh, run.rules):
                    out = jax.device_get(fn(params, run.frozen.arrays["text"], run.frozen.arrays["codec"], batch,
                                            indices, np.uint32(seed)))
                for key in sums:
                    sums[key] += np.asarray(out[key], np.float64) * b
                n += b
                bar.update(b)
        close = getattr(it, "close", None)
        if close:
            close()
        if n == 0:
            raise ValueError(f"val_loss: no {task} validation batch of {b} examples (limit {limit})")
        r = {"n": n, "sigmas": levels(k).tolist()}
        for key in sums:
            per = sums[key] / n
            if np.all(np.isnan(per)):
                continue
            r[key] = float(per.mean())
            r[f"{key}_levels"] = [float(v) for v in per]
        results[task] = r
    return results


def _put(x, mesh):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    x = np.asarray(x)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (x.ndim - 1))))
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def table_rows(results: dict) -> list[list]:
    rows = []
    for task, r in results.items():
        rows.append([task, r.get("image", float("nan")), r.get("text", float("nan")),
                     r.get("text_shuffled", float("nan")), r["n"]])
    return rows
