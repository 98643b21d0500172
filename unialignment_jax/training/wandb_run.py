"""Optional Weights & Biases logging: `config.wandb.project` set (and `pip install unialignment_jax[wandb]`).

Process 0 logs the same scalars as TensorBoard at the same steps, with the resolved config as the run
config. The run id is kept in `W/wandb_run_id`, so a resumed training run continues the same
W&B run. wandb's own files go under `W/wandb/` for a local workdir (WANDB_DIR, when set, wins).
`wandb.mode` "" leaves the choice to wandb (WANDB_MODE, else online); "offline" never reaches the
network (`wandb sync W/wandb/offline-run-*` uploads later).
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Mapping

from unialignment_jax import config as config_lib
from unialignment_jax import paths

ID_FILE = "wandb_run_id"
INSTALL = "pip install unialignment_jax[wandb]"


def check_installed(config) -> None:
    """Raises ConfigError when the config asks for W&B and wandb is not installed."""
    if not config.wandb.project:
        return
    try:
        import wandb  # noqa: F401  (optional dependency, imported only when a run asks for it)
    except ImportError:
        raise config_lib.ConfigError(
            f"config.wandb.project = {config.wandb.project!r} needs the wandb package: {INSTALL}") from None


class WandbRun:
    def __init__(self, run):
        self._run = run

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def finish(self) -> None:
        self._run.finish()


def start(config, workdir) -> WandbRun | None:
    """The W&B run of this workdir (resumed when W/wandb_run_id exists), or None when
    `config.wandb.project` is ""."""
    cfg = config.wandb
    if not cfg.project:
        return None
    import wandb  # optional dependency, imported only when a run asks for it

    id_file = paths.epath.Path(workdir) / ID_FILE
    resumed = id_file.exists()
    run_id = id_file.read_text().strip() if resumed else uuid.uuid4().hex[:12]
    if not resumed:
        id_file.write_text(run_id + "\n")  # before init: a crash during start-up resumes the same run
    # wandb writes <dir>/wandb/; None: WANDB_DIR, else the current directory.
    local_dir = None if paths.is_remote(workdir) or os.environ.get("WANDB_DIR") else os.fspath(workdir)
    run = wandb.init(project=cfg.project, entity=cfg.entity or None, name=cfg.name or None, mode=cfg.mode or None,
                     id=run_id, resume="allow", dir=local_dir, config=config.to_dict())
    logging.info("wandb: %s run %s (project %s)", "resumed" if resumed else "new", run_id, cfg.project)
    return WandbRun(run)
