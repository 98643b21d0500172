"""Sampling: the flow-matching image sampler with CFG (image.py), the masked-diffusion text sampler
(text.py), their time grids (schedule.py), task pipelines (pipeline.py: `Sampler`), opening a
trained run (restore.py), the `sample` command (command.py) and the in-training hook (hook.py)."""
