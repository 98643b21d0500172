"""The training loop's helpers, in-process: interval means of logged scalars, the progress line and
log-line process tags, Ctrl-C / SIGTERM stop requests, the profile window, W&B runs (offline).
tests/test_train.py runs them inside real training runs."""

import io
import logging
import signal
import sys

import pytest

from unialignment_jax import config as config_lib
from unialignment_jax.training import metrics, profiler, stop, wandb_run


def test_interval_means_skip_nonfinite_steps_but_count_them():
    acc = metrics.IntervalMeans()
    acc.add({"loss": 2.0, "loss/text": 4.0, "lr": 1.0, "finite": 1.0, "nonfinite_run": 0.0},
            examples=8, flops=100.0, seconds=1.0)
    acc.add({"loss": float("nan"), "lr": 2.0, "finite": 0.0, "nonfinite_run": 1.0},
            examples=8, flops=100.0, seconds=1.0)
    acc.add({"loss": 3.0, "lr": 3.0, "finite": 1.0, "nonfinite_run": 0.0}, examples=8, flops=100.0, seconds=2.0)
    row = acc.pop(peak_flops_per_second=50.0)
    assert row["loss"] == 2.5  # the skipped step's nan is left out
    assert row["loss/text"] == 4.0  # only the step that reported it
    assert row["lr"] == 2.0 and row["finite"] == pytest.approx(2 / 3)  # over all steps
    assert row["nonfinite_run"] == 0.0  # the last step's
    assert row["examples_per_sec"] == 24 / 4 and row["flops_utilization"] == 300 / 4 / 50
    # The next interval starts empty; one where every step was skipped shows their values.
    acc.add({"loss": float("inf"), "finite": 0.0, "nonfinite_run": 2.0}, examples=8, flops=1.0, seconds=1.0)
    row = acc.pop(50.0)
    assert row["loss"] == float("inf") and row["finite"] == 0.0 and row["nonfinite_run"] == 2.0


def test_progress_line_only_where_enabled():
    for enabled, expected in ((True, "step 3/10 [s/t2i] loss 1.5000"), (False, "")):
        out = io.StringIO()
        p = metrics.Progress(10, 0, "off", stream=out, enabled=enabled)
        p.update(3, "s", "t2i", {"loss": 1.5, "examples_per_sec": 2.0})
        p.close()
        assert out.getvalue().startswith(expected) and (enabled or out.getvalue() == "")
    out = io.StringIO()  # on a terminal: a bar redrawn in place
    p = metrics.Progress(10, 0, "on", stream=out)
    p.update(5, "s", "t2i", {"loss": 1.5, "examples_per_sec": 2.0})
    assert out.getvalue().startswith("\r[##########..........] step 5/10 [s/t2i] loss 1.5000")


def test_log_lines_carry_the_process_index_on_several_hosts():
    logger = logging.getLogger("test_process_tag")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        metrics.tag_logs_with_process(index=0, count=1, logger=logger)  # one process: unchanged
        logger.warning("one")
        metrics.tag_logs_with_process(index=3, count=4, logger=logger)
        metrics.tag_logs_with_process(index=3, count=4, logger=logger)  # idempotent
        logger.warning("two")
    finally:
        logger.removeHandler(handler)
    assert out.getvalue().splitlines() == ["WARNING one", "[p3] WARNING two"]


def test_ctrl_c_requests_a_stop_and_a_second_one_aborts():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    request = stop.StopRequest(multi_process=False)
    request.install()
    try:
        assert not request.reached(1)
        signal.raise_signal(signal.SIGINT)
        assert request.signal == "SIGINT" and request.reached(1)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)  # preemption: still a request, never the default kill
        assert request.signal == "SIGTERM"
    finally:
        request.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("value, message", [("3", "START:STOP"), ("a:b", "START:STOP"), ("0:2", "1 <= START"),
                                            ("5:3", "1 <= START")])
def test_bad_profile_windows_name_the_key(repo_root, value, message):
    with pytest.raises(config_lib.ConfigError, match=f"config.profile = '{value}'.*{message}"):
        config_lib.load(f"{repo_root}/experiments/demo.py:tiny", [f"--config.profile={value}"])
    assert profiler.parse("") is None and profiler.parse("2:3") == (2, 3)


def test_wandb_missing_names_the_extra(repo_root, monkeypatch):
    config = config_lib.load(f"{repo_root}/experiments/demo.py:tiny", ["--config.wandb.project=p"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python spells "not installed"
    with pytest.raises(config_lib.ConfigError, match=r"wandb.project .* pip install unialignment_jax\[wandb\]"):
        wandb_run.check_installed(config)


def test_wandb_offline_run_resumes_with_the_workdir(repo_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    config = config_lib.load(f"{repo_root}/experiments/demo.py:tiny",
                             ["--config.wandb.project=unit", "--config.wandb.mode=offline"])
    assert wandb_run.start(config_lib.load(f"{repo_root}/experiments/demo.py:tiny"), tmp_path) is None
    run = wandb_run.start(config, tmp_path)
    run.log(1, {"loss": 0.125})
    run.finish()
    run_id = (tmp_path / wandb_run.ID_FILE).read_text().strip()
    run = wandb_run.start(config, tmp_path)  # the resumed training run
    run.log(2, {"loss": 0.0625})
    run.finish()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, and "-1" after it when both runs started within the same second
    assert len(runs) == 2 and all(f"-{run_id}" in r.name for r in runs), runs
    assert b"0.0625" in (runs[-1] / f"run-{run_id}.wandb").read_bytes()
