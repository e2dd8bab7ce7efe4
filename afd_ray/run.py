"""The recipe table: ``run.method`` -> the recipe that runs it, each inside the runtime (afd_ray.runtime).

    run(cfg)                          a new run (or the same run name with the same config: continued)
    run(None, resume=RUN_DIR)         continue RUN_DIR after its last complete checkpoint, saved config
    run(None, resume=RUN_DIR, overrides=["run.iterations=8"])   ... with changes (recorded as an event)
"""

from __future__ import annotations

from pathlib import Path

from afd_ray import sft
from afd_ray.config import Config, ConfigError
from afd_ray.methods import baselines, irl, irlignment
from afd_ray.runtime.rundir import RunDir

# every recipe: run(cfg, rd, echo) -> RunDir; the runtime owns rd (config, checkpoints, metrics, report)
RECIPES = {
    "irl": irl.run,
    "aihf": lambda cfg, rd, echo: (irl.run if cfg.run.aihf_form == "bilevel" else baselines.run)(cfg, rd, echo),
    "rlhf": irl.run,
    "inverse_rlignment": irlignment.run,
    "dpo": baselines.run,
    "ipo": baselines.run,
    "bt_rm": baselines.run,
    "spin": baselines.run,
    "sft": sft.run,
}


def open_run(cfg: Config | None, resume: str | Path | None, overrides: list[str] | None = None
             ) -> tuple[Config, RunDir]:
    """The config and run directory of a new run (``cfg``) or of a resumed one (``resume``: the saved
    config with ``overrides`` applied and validated)."""
    if resume is None:
        return cfg, RunDir.open(cfg)
    if cfg is not None:
        raise ConfigError("--resume continues a run with its saved config: give overrides, not a config")
    path = Path(resume)
    # run.stop_after belongs to the invocation that set it: a resume runs to the end unless told again
    saved = RunDir(path).saved_config(["run.stop_after=0", *(overrides or [])])
    if saved is None:
        raise ConfigError(f"--resume {resume}: not a run directory (no config.yaml in it)")
    if Path(saved.run.output_dir).resolve() != path.parent.resolve() or saved.run.name != path.name:
        saved.run.output_dir, saved.run.name = str(path.parent), path.name  # the directory was moved
    rd = RunDir.open(saved, resume=True)
    rd.event("resume", overrides=list(overrides or []))
    return saved, rd


def run(cfg: Config | None = None, resume: str | Path | None = None, echo=print,
        overrides: list[str] | None = None) -> RunDir:
    """Start (or continue) the run of ``cfg``, or resume the run directory ``resume``."""
    cfg, rd = open_run(cfg, resume, overrides)
    try:
        return RECIPES[cfg.run.method](cfg, rd, echo)
    finally:
        rd.close()
