"""Prompt lists: `unialignment sample --prompts FILE` and the in-training grids' `config.sample.prompts`.

A prompt file is UTF-8 text with one prompt per line (blank lines skipped), local or a URI
(`gs://...`, through etils epath: unialignment_jax/paths.py). `config.sample.prompts` is "" (the
sample hook's defaults for the run's data), a path ending in `.txt` (a prompt file), or prompts
separated by '|'.
"""

from __future__ import annotations

from unialignment_jax import paths


class PromptError(ValueError):
    """A prompt file or value that gives no prompts; the message names it."""


def read_prompt_file(path: str, what: str) -> list[str]:
    """The non-blank lines of `path`, stripped; `what` names the file in errors (e.g. '--prompts x.txt')."""
    try:
        with paths.open_file(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PromptError(f"{what}: cannot read ({e.strerror or e})") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PromptError(f"{what}: not UTF-8 text ({e})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise PromptError(f"{what}: no prompts (one prompt per line)")
    return prompts


def from_config(value: str) -> list[str] | None:
    """`config.sample.prompts` as a list, or None for "" (the hook's defaults)."""
    value = str(value).strip()
    if not value:
        return None
    if value.endswith(".txt"):
        return read_prompt_file(value, f"config.sample.prompts = {value!r}")
    prompts = [p.strip() for p in value.split("|") if p.strip()]
    if not prompts:
        raise PromptError(f"config.sample.prompts = {value!r}: no prompts (separate them with '|')")
    return prompts


__all__ = ["PromptError", "read_prompt_file", "from_config"]
