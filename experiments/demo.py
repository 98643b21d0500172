"""The embedded default: a tiny UniAlignment trained on the Shapes world on the CPU in minutes.

The same architecture and three-stage recipe as experiments/unialignment_2b.py at toy scale: a
4-block MMDiT of width 128; 32 x 32 images through the exact pixel codec (space-to-depth by 4 ->
8 x 8 x 48 "latents", patch 1 -> 64 image tokens); a small random T5 encoder (2 layers, width 256) on the
Shapes world's closed word vocabulary (32 tokens per text); Shapes-world teacher features
(exact, 64-d) for the intrinsic alignment. Stages: t2i (with the dual-stream caption loss) ->
+ edit and perception -> + compose, caption, VQA.

Toy-scale choices, each measured (docs/quality.md):
  * patch 1, not 2: a 2 x 2 x 48 = 192-d patch into a 128-wide model cannot carry the noise that
    the velocity target (noise - x0) contains; with patch 2 the x0 error at sigma = 1 stayed at
    0.51 against 0.09 for predicting the mean image, with patch 1 it is 0.15 after 500 steps;
  * word tokens, not bytes: a 3-shape caption is 118 bytes but 28 words, so with bytes the
    32-token prompt held only the first shape;
  * a random T5 that passes word order on: its relative-position bias drawn with std 6 (HF's init:
    d_model**-0.5), 16 heads of width 16 over 256 dimensions. The DiT's text stream has no positions
    of its own, so whatever it knows of word order comes from the frozen T5's features. With HF's
    init the captions came out as bags of words; against 4 heads of width 16 at std 2, the masked
    caption NLL at 30% / 60% masking after 1000 steps fell from 0.59 / 1.11 to 0.47 / 0.71 nats;
  * remat "dots": every matmul output kept, the elementwise work recomputed in the backward pass;
    the same numbers, 1.3-1.4x faster steps than "none" on XLA:CPU;
  * the caption task asks "What shapes?" (input.caption_prompt; official: no prompt). With no
    given token, every position of an all-MASK text looks the same to the DiT, so the sampler's
    first words land at random places; the prompt is an anchor to count positions from. The
    official sampler stays an option in `sample` / `evaluate` (docs/quality.md).

Run (8 simulated CPU devices, mesh data=2 x fsdp=4):
  bash launch/local.sh train --config experiments/demo.py --workdir runs/demo
or, in an installed environment:
  unialignment train --config experiments/demo.py --workdir runs/demo --cpu_devices 8
It writes a sample grid every 250 steps (W/samples/step_<n>.png and .txt, and TensorBoard): t2i
and edits of held-out scenes next to their targets, and captions. A grid costs about 12 s here, the
first one 45 s (it compiles the three samplers), on 8 simulated devices on 2 CPU cores.
Variants, combined with commas (`experiments/demo.py:long,no_align`): `tiny` (2 blocks, 14 steps;
tests), `long` (twice the steps: 2000, the figures in docs/quality.md), `no_align` (both alignment
weights 0: the ablation).
"""

from unialignment_jax.config import base_config, new_stages, stage
from unialignment_jax.data.shapes import VOCABULARY
from unialignment_jax.data.tokenizers import WordTokenizer

_VOCAB = WordTokenizer(VOCABULARY)  # 72 Shapes tokens + specials + 100 sentinels: 175 ids
# T5's embedding table padded to a multiple of 16 rows (176; T5-XXL's is 32128 for 32100 ids) so
# that its vocab axis divides the tensor axis of small meshes (the rows past 175 are never fed).
_VOCAB_ROWS = -(-_VOCAB.vocab_size // 16) * 16

DEMO_STEPS = (400, 300, 300)
# The caption task's given question (input.caption_prompt; official: none). Its 4 tokens (with EOS)
# and the longest caption's 28 (with EOS) fill the 32-token text exactly.
CAPTION_PROMPT = "What shapes?"
_T5_WIDTH = 256


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.log_every = 10
    c.checkpoint_every = 100
    c.sample_every = 250  # one grid per stage or so: 250 (t2i), 500 (+ edit), 750 and 1000 (all tasks)
    c.model.update(dict(
        num_layers=4, num_heads=4, head_dim=32, patch_size=1,
        remat="dots",  # on XLA:CPU 1.3-1.4x faster steps than "none" (docs/performance.md)
        in_channels=48, out_channels=48,  # the pixel codec: 3 x 4 x 4
        sample_size=8, pos_embed_max_size=12,
        context_dim=_T5_WIDTH,
        vocab_size=_VOCAB.vocab_size,  # the text head covers the tokenizer exactly (official: 32100)
        timestep_dim=64, num_null_tokens=8, block_depth=2,
        adapter_hidden=128, adapter_out=64,  # the Shapes teacher's width
    ))
    c.input.update(dict(resolution=32, latent_downsample=4, text_length=32, num_compose_refs=3,
                        caption_prompt=CAPTION_PROMPT))
    c.text_encoder.update(dict(preset="custom", d_model=_T5_WIDTH, num_layers=2, num_heads=16,
                               d_kv=_T5_WIDTH // 16, d_ff=2 * _T5_WIDTH,
                               vocab_size=_VOCAB_ROWS, mask_token_id=_VOCAB.mask_id,
                               relative_attention_bias_std=6.0,
                               dtype="float32", param_dtype="float32"))
    c.tokenizer.update(dict(kind="words", vocabulary="shapes"))
    c.codec.kind = "pixel"
    c.mesh.update(dict(data=2, fsdp=-1, tensor=1))
    c.sharding.rules = "fsdp"
    c.batch_size = 16
    c.optimizer.update(dict(weight_decay=0.0, grad_clip=1.0))
    c.ema.decay = 0.999

    common = dict(lr=1e-3, warmup_steps=20)
    c.stages = new_stages()
    c.stages.generation = stage(steps=DEMO_STEPS[0], tasks="t2i", **common)
    c.stages.editing = stage(steps=DEMO_STEPS[1], tasks="t2i,edit,perception", **common)
    c.stages.unified = stage(steps=DEMO_STEPS[2], tasks="t2i,edit,perception,compose,caption,vqa", **common)

    variants = [v for v in (arg or "").split(",") if v]
    unknown = sorted(set(variants) - {"tiny", "long", "no_align"})
    if unknown:
        raise ValueError(f"experiments/demo.py: unknown variant {unknown[0]!r} (known: tiny, long, no_align; "
                         "combine with commas: long,no_align)")
    if "tiny" in variants:
        c.model.num_layers, c.model.block_depth = 2, 1
        # The tests train this on 2-process simulated-device meshes (XLA:CPU collectives are fragile
        # there, docs/scaling.md "Simulated devices"): with remat "dots" and the 256-wide T5, the
        # 2-process resume test died (a hang, then lost coordination heartbeats) on the 2-core CI
        # machine; with remat "none" and the earlier 64-wide T5 it passes. Remat numerics are covered
        # by the remat tests.
        c.model.remat = "none"
        c.model.context_dim = 64
        c.text_encoder.update(dict(d_model=64, num_heads=4, d_kv=16, d_ff=128, relative_attention_bias_std=2.0))
        c.log_every, c.checkpoint_every = 2, 4
        c.batch_size = 8
        # 4 + 4 + 6 steps: the last stage trains each of its six tasks once, and the run ends with
        # one sample grid (4 sampling steps: what it shows at this size does not matter).
        for name, steps in zip(c.stages.keys(), (4, 4, 6)):
            c.stages[name].steps = steps
            c.stages[name].warmup_steps = 2
        c.sample_every, c.sample.steps = 14, 4
    if "long" in variants:
        for name, steps in zip(c.stages.keys(), DEMO_STEPS):
            c.stages[name].steps = 2 * steps
    if "no_align" in variants:
        for name in c.stages.keys():
            c.stages[name].loss_weights.align_image = 0.0
            c.stages[name].loss_weights.align_text = 0.0
    return c
