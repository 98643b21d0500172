"""Tasks and the batch format every part of the pipeline agrees on.

Each batch holds one task (a design rule of the project): task-homogeneous batches, one compiled step per
task shape. A batch is a dict of arrays with a leading batch axis B (host-local numpy out of the
Grain pipeline, global jax arrays in the train step):

  target         (B, H, W, 3) float32 pixels in [-1, 1]                  images decoded on the host
  target_latents (B, h, w, C) float32 codec latents (scaled, shifted)    instead of `target`, when
                                                                         the dataset holds latents
  cond           (B, K, H, W, 3) float32 condition pixels                edit/perception (K=1),
  cond_latents   (B, K, h, w, C) float32 condition latents               compose (K=num_compose_refs)
  prompt_ids     (B, L) int32  image-pass text: the T2I prompt, or the edit/perception/compose
                               instruction (absent for caption/vqa)
  caption_ids    (B, L) int32  text-pass target: the caption; for vqa the question then the answer
                               (caption with input.caption_prompt: that prompt, then the caption)
  prefix_len     (B,) int32    vqa (caption with a prompt): leading caption_ids tokens (the question,
                               with its EOS) that are given, never masked and never scored; else 0
  teacher_image  (B, Dt) float32  frozen-teacher feature of the target image   (optional)
  teacher_text   (B, Dt) float32  frozen-teacher feature of the caption        (optional)

Token ids use the T5 layout (pad 0, eos 1, unk 2), sequences are EOS-padded to L (docs/method.md, "Backbone").
"""

from __future__ import annotations

TASKS = ("t2i", "edit", "perception", "compose", "caption", "vqa")

# Tasks whose batches run the image pass (flow matching on the target image).
IMAGE_PASS_TASKS = ("t2i", "edit", "perception", "compose")
# Tasks with condition images, and how many.
CONDITION_TASKS = ("edit", "perception", "compose")
# Tasks whose records and batches are alike (one condition image and an instruction): a dataset
# prepared for one may feed the other's mixture. The official loader shuffles its edit and
# perception files into one dataset, which `data.edit = "EDIT:size,PERCEPTION:size"` reproduces.
RECORD_FAMILIES = {"perception": "edit"}


def record_family(task: str) -> str:
    """The task whose records `task`'s records are (itself, or edit for perception)."""
    return RECORD_FAMILIES.get(task, task)


def num_conditions(task: str, num_compose_refs: int) -> int:
    if task in ("edit", "perception"):
        return 1
    if task == "compose":
        return num_compose_refs
    return 0


def check_task(task: str, where: str = "task") -> str:
    if task not in TASKS:
        raise ValueError(f"{where}: unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return task
