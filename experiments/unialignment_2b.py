"""UniAlignment at the paper's scale: the ~2.1B SD3-medium MMDiT of docs/method.md ("Architecture"), trained on T5-XXL
features and SD3 VAE latents with the three-stage recipe below.

Model: 24 joint blocks, width 1536 (24 heads x 64), patch 2, 16 latent channels, T5-XXL context
(width 4096, 256 tokens), text head over 32100 tokens, sin-cos table 192 x 192 cropped to the grid,
alignment tap at block 8, adapters 1536 -> 2048 -> 3584 (Qwen2.5-VL-7B features).

Recipe (the paper's stage table was not available; the split and stages 2-3 are our choice):
  generation  40k steps  t2i (+ captioning through the text pass, both alignments)
  editing     30k steps  + edit and perception: even steps t2i, odd steps one stream of edit and
                         perception examples. As the official loader (which shuffles its edit and
                         perception files into one dataset), `data.edit` mixes both per example in
                         proportion to their sizes ("data/edit:size,data/perception:size")
  unified     10k steps  + composition, captioning and VQA (edit: the same mixed stream)
Every stage uses the official `config_unify.py` optimisation: AdamW lr 3e-5, wd 0.01, 2000 linear
warm-up steps then constant, clip 2.0 (global norm), global batch 384 at 512 px.

Data: point `config.data.<task>` at prepared datasets (`unialignment prepare`), e.g.
  --config.data.t2i=gs://BUCKET/data/sharegpt4o_t2i,gs://BUCKET/data/blip3o_t2i
Weights: `text_encoder.weights` (T5-XXL safetensors), `codec.weights` (SD3 VAE directory),
`tokenizer.path` (T5 spiece.model), `text_encoder.mask_embedding` (the official aligned MASK row:
  unialignment convert-mask --source checkpoint/mask_token_emb.00-of-01.pth --out weights/mask_token_emb.safetensors
or `=none` to keep T5's stock <extra_id_0> row on purpose; train refuses an empty value);
initialise the DiT with `unialignment import`.

Run (every worker of a TPU pod slice runs the same command):
  unialignment train --config experiments/unialignment_2b.py --workdir gs://BUCKET/runs/ua2b
Plan memory first (AOT compile on 8 simulated devices, nothing allocated):
  unialignment inspect --config experiments/unialignment_2b.py --compile --batch 8 --cpu_devices 8
"""

from unialignment_jax.config import base_config, new_stages, stage


def get_config(arg=None):
    del arg
    c = base_config()  # the base schema carries the 2B model, T5-XXL and SD3 VAE values
    c.input.update(dict(resolution=512, latent_downsample=8, text_length=256, num_compose_refs=3))
    c.batch_size = 384
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.sharding.rules = "fsdp"
    c.model.update(dict(remat="dots_no_batch", dtype="bfloat16"))
    c.text_encoder.dtype = "bfloat16"
    c.tokenizer.update(dict(kind="sentencepiece", path="weights/t5/spiece.model"))
    c.text_encoder.weights = "weights/t5"
    c.text_encoder.mask_embedding = "weights/mask_token_emb.safetensors"
    c.codec.weights = "weights/sd3_vae"
    c.data.update(dict(t2i="data/t2i", edit="data/edit:size,data/perception:size", perception="data/perception",
                       compose="data/compose", caption="data/caption", vqa="data/vqa"))
    official = dict(lr=3e-5, warmup_steps=2000, lr_schedule="constant", accum_steps=12)
    c.stages = new_stages()
    c.stages.generation = stage(steps=40_000, tasks="t2i", **official)
    c.stages.editing = stage(steps=30_000, tasks="t2i,edit", **official)
    c.stages.unified = stage(steps=10_000, tasks="t2i,edit,compose,caption,vqa", **official)
    c.checkpoint_every = 5000
    c.keep_checkpoint_every = 20_000
    c.ema.decay = 0.9999
    return c
