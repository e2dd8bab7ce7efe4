"""Where each iteration's metrics go besides ``metrics.jsonl`` (DESIGN.md Sec. 6).

- TensorBoard event files, always, under ``RUN_DIR/tensorboard`` (``tensorboard --logdir runs/``). On resume
  the writer purges the events of iterations after the last complete checkpoint, as metrics.jsonl does.
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

    def __init__(self, run_dir: Path, run_name: str, purge_after: int | None = None):
        self.run_name = run_name
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; a broken install should not stop training
            log.warning("tensorboard is not importable: no event files for %s", run_dir)
        else:
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                     purge_step=None if purge_after is None else purge_after + 1)
        self._gauges: dict[str, object] = {}

    def log(self, m: dict, step: int) -> None:
        scalars = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
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
