"""The run directory: config, metrics, events, checkpoints.

    config.yaml             the resolved config (a different config under the same run name is an error
                            unless the run is resumed, which records the change in events.jsonl)
    metrics.jsonl           one line per finished iteration, each iteration exactly once (a resumed or
                            recovered run first drops the lines after its last complete checkpoint)
    events.jsonl            restarts, resumes, config changes, non-finite stops
    tensorboard/            the same metrics as TensorBoard events (afd_ray.telemetry; also Ray gauges)
    logs/<role>-<rank>.log  each actor's output (afd_ray.workers.logs; run.verbose=true: the console)
    checkpoints/iter_NNNNNN/  one complete iteration: what the recipe saved + manifest.json
    checkpoints/latest.json the last complete iteration (written last, atomically)
    report.md               the recipe's report (afd_ray.eval.report)

A checkpoint is written into ``.iter_NNNNNN.partial``; ``commit`` checks that every file each rank
reported is there with its size and that every rank of every learner group reported files, fsyncs them,
writes ``manifest.json``, renames the directory and only then points ``latest.json`` at it. A crash at
any point leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from afd_ray import faults
from afd_ray.config import Config, ConfigError, load_config
from afd_ray.runtime.files import append_line, atomic_write, fsync_dir, fsync_file, read_lines

log = logging.getLogger("afd_ray")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete: a rank's files are missing or shorter than the rank wrote them."""


@dataclass
class Checkpoint:
    iteration: int
    path: Path


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``section.key: old -> new`` for every value that differs between two ``Config.to_dict()``."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def default_name(cfg: Config) -> str:
    return cfg.run.name or f"{cfg.run.method}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.ckpt = self.path / "checkpoints"
        self._telemetry = None
        self._purge_after: int | None = None
        self.config: Config | None = None  # set by open: the run's resolved config (for the metric sinks)

    # ---- config ---------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, cfg: Config, resume: bool = False) -> RunDir:
        """The run directory of ``cfg`` (``run.output_dir/run.name``), created or reopened. Reopening under
        a different config is an error unless ``resume`` (then the change is recorded as an event)."""
        rd = cls(Path(cfg.run.output_dir) / default_name(cfg))
        cfg.run.name = rd.path.name  # saved resolved, so a resume compares like with like
        saved = rd.saved_config()
        if saved is not None:
            diff = config_diff(saved.to_dict(), cfg.to_dict())
            if diff and not resume:
                raise ConfigError(
                    f"run.name={rd.path.name!r}: {rd.path} already holds a run with another config ("
                    + "; ".join(diff[:6]) + (" ..." if len(diff) > 6 else "") + "). Pick another run.name, or "
                    f"continue that run with its changes: --resume {rd.path} section.key=value ...")
            if diff:
                rd.event("config_change", changes=diff)
        rd.ckpt.mkdir(parents=True, exist_ok=True)
        atomic_write(rd.path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        rd.config = cfg
        return rd

    def saved_config(self, overrides: list[str] | None = None) -> Config | None:
        f = self.path / "config.yaml"
        return load_config(str(f), overrides) if f.is_file() else None

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def latest(self) -> Checkpoint | None:
        """The last complete checkpoint. ``latest.json`` names it; when that file is missing, empty or
        damaged (a crash while it was written), the newest ``iter_*`` with a manifest is used."""
        f = self.ckpt / "latest.json"
        t = None
        if f.is_file():
            try:
                t = int(json.loads(f.read_text())["iteration"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("%s is damaged (%r); looking for the newest complete checkpoint instead", f,
                            f.read_text()[:80])
        if t is not None and (self.ckpt / f"iter_{t:06d}").is_dir():
            return Checkpoint(t, self.ckpt / f"iter_{t:06d}")
        complete = sorted(p for p in self.ckpt.glob("iter_*") if (p / "manifest.json").is_file())
        if not complete:
            return None
        return Checkpoint(int(complete[-1].name.removeprefix("iter_")), complete[-1])

    def begin(self, t: int) -> Path:
        tmp = self.ckpt / f".iter_{t:06d}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, t: int, tmp: Path, written: dict[str, dict[int, dict[str, int]]], keep: int) -> Path:
        """Verify, fsync and publish the partial checkpoint ``tmp`` of iteration ``t``.

        ``written[group][rank]`` maps each file a rank wrote (relative to ``tmp``) to its size; every rank
        of every group must have reported at least one file. Files the driver wrote itself (loop state)
        are included by listing ``tmp`` for what no rank claimed."""
        problems, sizes = [], {}
        for group, ranks in written.items():
            for rank, files in ranks.items():
                if not files:
                    problems.append(f"{group} rank {rank} wrote no files")
                for rel, size in files.items():
                    p = tmp / rel
                    if not p.is_file():
                        problems.append(f"{group} rank {rank}: {rel} is missing")
                    elif p.stat().st_size != size:
                        problems.append(f"{group} rank {rank}: {rel} has {p.stat().st_size} bytes, the rank wrote {size}")
                    sizes[rel] = size
        if problems:
            raise CheckpointError(f"checkpoint of iteration {t} in {tmp} is incomplete: " + "; ".join(problems))
        for p in sorted(tmp.rglob("*")):  # the files the driver wrote itself (ranks fsync their own)
            rel = str(p.relative_to(tmp))
            if p.is_file() and rel not in sizes:
                sizes[rel] = p.stat().st_size
                fsync_file(p)
        for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, key=lambda p: -len(p.parts)):
            fsync_dir(d)
        atomic_write(tmp / "manifest.json", json.dumps({"iteration": t, "files": sizes}, indent=0))
        faults.point("driver.commit")  # tests: the driver dies with every file written, before the rename
        final = self.ckpt / f"iter_{t:06d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(self.ckpt)
        atomic_write(self.ckpt / "latest.json", json.dumps({"iteration": t}))
        done = sorted(p for p in self.ckpt.glob("iter_*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    # ---- metrics and events ---------------------------------------------------------------------------------

    def append_metrics(self, m: dict) -> None:
        """One line of metrics.jsonl (fsynced), then the same numbers to TensorBoard and Ray gauges."""
        append_line(self.path / "metrics.jsonl", m)
        if self._telemetry is None:
            from afd_ray.telemetry import Telemetry

            self._telemetry = Telemetry(self.path, self.path.name, purge_after=self._purge_after, config=self.config)
        self._telemetry.log(m, int(m.get("iteration", m.get("step", 0))))

    def metrics(self) -> list[dict]:
        return read_lines(self.path / "metrics.jsonl")

    def truncate_metrics(self, last_iteration: int) -> None:
        """Keep the lines of iterations up to the last complete checkpoint: the ones after it run again."""
        kept = [m for m in self.metrics() if m["iteration"] <= last_iteration]
        atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))
        if self._telemetry is not None:  # a recovery inside the job: reopen with the purge
            self._telemetry.close()
            self._telemetry = None
        self._purge_after = last_iteration  # TensorBoard drops its events after this step too

    def event(self, kind: str, **fields) -> None:
        """A line of events.jsonl: what happened to the run besides its iterations."""
        self.path.mkdir(parents=True, exist_ok=True)
        append_line(self.path / "events.jsonl", {"event": kind, "time": time.time(), **fields})

    def events(self) -> list[dict]:
        return read_lines(self.path / "events.jsonl")

    def close(self) -> None:
        if self._telemetry is not None:
            self._telemetry.close()
            self._telemetry = None
