"""Sampler speed: the image sampler's overhead over its model calls, and the text sampler's cache.

Image: wall time of one `Sampler.generate` call (T5 prompt encoding, the jitted Euler loop with
guidance, decoding: one compiled computation) against `steps x` one jitted forward of the DiT at the
batch the loop runs (2B with guidance: both branches in one call; B without), measured interleaved
in the same process. overhead = sampler / (steps x forward) - 1 (target: <= 10%). Also reported
against steps x 2 x forward(B) (guidance as two calls).

Text: the `ddpm_cache` sampler with the cache on vs off (the same compiled program; the uncached loop
calls the model every step), for several step counts at one text length. Which steps leave x
unchanged does not depend on the model (a still-masked token is revealed with probability dt / t
whatever p_theta is), so a random model gives the representative speed-up.

Model: the medium CPU shape (width 384 = 6 x 64, 8 joint blocks, 128 px through the pixel codec ->
32 x 32 x 48 latents -> 256 image tokens, 64 text tokens) with the demo's tiny T5 and byte
tokenizer, random weights (perturbed away from AdaLN-Zero), float32, one device by default.

Run:  python benchmarks/sampling.py [--which image,text] [--batch 4] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--which", default="image,text")
    p.add_argument("--devices", type=int, default=1, help="simulated CPU devices (mesh fsdp=N)")
    p.add_argument("--batch", type=int, default=4, help="images / texts per sampler call")
    p.add_argument("--image_steps", default="10,25,50")
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--text_steps", default="32,64,128,256")
    p.add_argument("--text_length", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def medium_config(text_length: int):
    from unialignment_jax import config as config_lib

    c = config_lib.load(os.path.join(ROOT, "experiments", "demo.py"))
    c.unlock()
    c.model.update(dict(num_layers=8, num_heads=6, head_dim=64, sample_size=32, pos_embed_max_size=32, block_depth=4))
    c.input.update(dict(resolution=128, text_length=text_length))
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    config_lib.validate(c)
    c.lock()
    return c


def random_params(config, mesh, rules, scale=0.05):
    """Random DiT parameters on the mesh, every leaf perturbed (AdaLN-Zero's zero heads would make
    the image model's output trivially zero)."""
    import jax
    from flax import nnx

    from unialignment_jax.models import create
    from unialignment_jax.models.mmdit import DiTConfig, UniAlignmentDiT
    from unialignment_jax.sampling.restore import dit_spec

    graphdef, abstract = dit_spec(config, mesh, rules)

    def init():
        with nnx.use_eager_sharding(False):
            params = nnx.to_pure_dict(nnx.state(UniAlignmentDiT(DiTConfig.from_config(config.model),
                                                                rngs=nnx.Rngs(0))))
        leaves, tree = jax.tree.flatten(params)
        return jax.tree.unflatten(tree, [x + scale * jax.random.normal(jax.random.fold_in(jax.random.key(1), i),
                                                                       x.shape, x.dtype)
                                         for i, x in enumerate(leaves)])

    with create.sharding_context(mesh, rules):
        return graphdef, jax.jit(init, out_shardings=jax.tree.map(lambda s: s.sharding, abstract))()


def timed(fn, repeats):
    import jax

    jax.block_until_ready(fn())  # compile + warm up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return min(out)  # the least disturbed run (the machine may be shared)


def main():
    args = parse()
    from unialignment_jax.cli import simulated_device_env

    os.environ.update(simulated_device_env(args.devices))
    import jax
    import numpy as np
    from flax import nnx

    from unialignment_jax.models import create
    from unialignment_jax.parallel import mesh as mesh_lib
    from unialignment_jax.parallel import rules as rules_lib
    from unialignment_jax.sampling import pipeline
    from unialignment_jax.training import encoders as encoders_lib

    config = medium_config(args.text_length)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = rules_lib.get_rules(config.sharding.rules)
    frozen = encoders_lib.build_frozen(config, mesh, rules)
    graphdef, params = random_params(config, mesh, rules)
    sampler = pipeline.Sampler(config, mesh, rules, frozen, graphdef, batch_size=args.batch)
    b = sampler.batch_size
    result = {"backend": jax.default_backend(), "devices": jax.device_count(), "batch": b,
              "model": "width 384, 8 blocks, 256 image + %d text tokens" % args.text_length}

    if "image" in args.which:
        side = sampler.latent_shape
        rng = np.random.default_rng(0)

        def forward_fn(n):
            x = sampler._batch(rng.standard_normal((n,) + side).astype(np.float32))
            ctx = sampler._batch(rng.standard_normal((n, args.text_length, 64)).astype(np.float32))
            t = sampler._batch(np.full((n,), 500.0, np.float32))
            f = jax.jit(lambda p, x, c, t: nnx.merge(graphdef, p)(x, c, t)["velocity"])

            def call():
                with create.sharding_context(mesh, rules):
                    return f(params, x, ctx, t)
            return call

        fwd_b, fwd_2b = forward_fn(b), forward_fn(2 * b)
        prompts = ["a large red circle at the top left and a small blue square at the center."] * b
        rows = []
        for steps in [int(s) for s in args.image_steps.split(",")]:
            for guidance in (1.0, args.guidance):
                settings = pipeline.Settings(image_steps=steps, guidance=guidance)
                sample = lambda: sampler.generate(params, "t2i", prompts, settings=settings)
                sample()  # compile
                t_f1, t_f2, t_s = [], [], []
                for _ in range(args.repeats):  # interleaved
                    t_f1.append(timed(fwd_b, 1))
                    t_f2.append(timed(fwd_2b, 1))
                    t0 = time.perf_counter()
                    sample()
                    t_s.append(time.perf_counter() - t0)
                f1, f2, s = min(t_f1), min(t_f2), min(t_s)
                model = steps * (f2 if guidance > 1 else f1)
                rows.append({"steps": steps, "guidance": guidance, "sampler_s": s, "per_image_s": s / b,
                             "forward_B_s": f1, "forward_2B_s": f2, "model_calls_s": model,
                             "overhead": s / model - 1.0,
                             "overhead_vs_two_calls": (s / (steps * 2 * f1) - 1.0) if guidance > 1 else None})
        result["image"] = rows

    if "text" in args.which:
        from unialignment_jax.data import shapes
        from unialignment_jax.data import shapes_tasks

        images = np.stack([shapes.render(shapes_tasks.make_example("caption", "test", i).target, sampler.resolution)
                           for i in range(b)])
        rows = []
        for steps in [int(s) for s in args.text_steps.split(",")]:
            settings = pipeline.Settings(text_steps=steps, text_order="random")  # the official ddpm_cache
            run = lambda cache: sampler.describe_ids(params, "caption", images, settings=settings, use_cache=cache)
            ids_c, _, calls_c = run(True)
            ids_u, _, calls_u = run(False)
            assert np.array_equal(ids_c, ids_u)
            t_c, t_u = [], []
            for _ in range(args.repeats):
                for cache, acc in ((True, t_c), (False, t_u)):
                    t0 = time.perf_counter()
                    run(cache)
                    acc.append(time.perf_counter() - t0)
            c, u = min(t_c), min(t_u)
            rows.append({"steps": steps, "length": args.text_length, "cached_s": c, "uncached_s": u,
                         "speedup": u / c, "model_calls_cached": calls_c, "model_calls_uncached": calls_u})
        result["text"] = rows

    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['backend']} x{result['devices']}, batch {b}, {result['model']}")
    for r in result.get("image", []):
        extra = "" if r["overhead_vs_two_calls"] is None else f" (vs 2 calls of B: {100 * r['overhead_vs_two_calls']:+.1f}%)"
        print(f"image  steps {r['steps']:3d} guidance {r['guidance']:4.1f}: {r['per_image_s'] * 1e3:8.1f} ms/image; "
              f"sampler {r['sampler_s']:.3f} s vs steps x forward {r['model_calls_s']:.3f} s: "
              f"overhead {100 * r['overhead']:+.1f}%{extra}")
    for r in result.get("text", []):
        print(f"text   steps {r['steps']:3d} length {r['length']}: cached {r['cached_s']:.3f} s "
              f"({r['model_calls_cached']} calls), uncached {r['uncached_s']:.3f} s "
              f"({r['model_calls_uncached']} calls): speed-up {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()
