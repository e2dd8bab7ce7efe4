"""Where each iteration's metrics go besides ``metrics.jsonl`` (DESIGN.md Sec. 6).

- TensorBoard event files, always, under ``RUN_DIR/tensorboard`` (``tensorboard --logdir runs/``). On resume
  the writer purges the events of iterations after the last complete checkpoint, as metrics.jsonl does.
- Weights & Biases when ``run.wandb_project`` is set (``pip install wandb``; ``run.wandb_mode=offline`` needs
  no network): the resolved config, every metric against ``iteration`` (``step`` for SFT), and on close
  the report's PNG plots as images. The wandb run id is the run directory's name, so a resumed run logs
  into the same wandb run; iterations run again after a resume are logged again (wandb keeps both points).
- Ray custom metrics (``ray.util.metrics.Gauge``, tagged with the run name) when Ray is up: they reach the
  Ray dashboard's Metrics view (Prometheus / Grafana) from the driver, including under ``ray job submit``.
  Every numeric metric is a gauge ``afd_ray_<key>`` with ``/`` replaced by ``_``; Prometheus sees it with
  Ray's ``ray_`` prefix, e.g. rollout tokens/s as ``ray_afd_ray_throughput_rollout_tokens_per_s{run="..."}``
  and the policy phase seconds as ``ray_afd_ray_time_policy``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

log = logging.getLogger("afd_ray")

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


def gauge_name(key: str) -> str:
    """The Prometheus-safe name of metric ``key`` ("rollout/kl" -> "afd_ray_rollout_kl")."""
    return "afd_ray_" + _UNSAFE.sub("_", key)


class Telemetry:
    """One run's metric sinks. ``log(m, step)`` takes the dict that goes to metrics.jsonl."""

    def __init__(self, run_dir: Path, run_name: str, purge_after: int | None = None, config=None):
        self.run_name, self.run_dir = run_name, Path(run_dir)
        self._tb = None
        self._wandb = _wandb_run(self.run_dir, run_name, config) if config is not None else None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; a broken install should not stop training
            log.warning("tensorboard is not importable: no event files for %s", run_dir)
        else:
            if purge_after is not None:
                _after_existing_events(self.run_dir / "tensorboard")
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"),
                                     purge_step=None if purge_after is None else purge_after + 1)
        self._gauges: dict[str, object] = {}

    def log(self, m: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            if "iteration" not in scalars and "step" not in scalars:
                scalars = {**scalars, "iteration": float(step)}
            self._wandb.log(scalars)
        self._set_gauges(scalars)

    def _set_gauges(self, scalars: dict[str, float]) -> None:
        import ray

        if not ray.is_initialized():
            return
        from ray.util.metrics import Gauge

        for k, v in scalars.items():
            g = self._gauges.get(k)
            if g is None:
                g = self._gauges[k] = Gauge(gauge_name(k), description=f"afd_ray metric {k}", tag_keys=("run",))
            g.set(v, tags={"run": self.run_name})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            import wandb

            plots = {f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(self.run_dir.glob("*.png"))}
            if plots:
                self._wandb.log(plots)
            self._wandb.finish()
            self._wandb = None


def _after_existing_events(logdir: Path) -> None:
    """Wait, if need be, until the second after the newest event file's. TensorBoard reads a run's event
    files in name order, whose first key is the creation second and the last a per-process counter: a
    purging writer opened within the same second as the last one could sort before it (counter "10" < "9"
    as text) and its purge would not apply to the events it should drop."""
    import time

    stamps = [int(part) for p in logdir.glob("events.out.tfevents.*")
              if (part := p.name.split(".")[3]).isdigit()]
    while stamps and time.time() < max(stamps) + 1:
        time.sleep(0.05)


def _wandb_run(run_dir: Path, run_name: str, config):
    """The wandb run of ``config.run.wandb_project`` (None when unset): id = the run name, config = the
    resolved config, every metric plotted against ``iteration`` or ``step``."""
    if not config.run.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        raise RuntimeError("run.wandb_project is set but wandb is not installed: pip install wandb") from None
    run = wandb.init(project=config.run.wandb_project, name=run_name, id=_UNSAFE.sub("-", run_name),
                     resume="allow", dir=str(run_dir), config=config.to_dict(), mode=config.run.wandb_mode or None,
                     settings=wandb.Settings(silent=True, console="off"))
    axis = "step" if config.run.method == "sft" else "iteration"
    run.define_metric(axis)
    run.define_metric("*", step_metric=axis)
    return run
