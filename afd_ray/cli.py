"""The command line shared by the jobs in ``jobs/``: a preset or YAML, ``section.key=value`` overrides,
``--resume RUN_DIR [overrides]``, ``--help-config``. Exit status 2 on a configuration error (the message
names the key), 3 when a run stops by itself (restarts used up, non-finite values): it is resumable."""

from __future__ import annotations

import argparse
import logging
import sys

from afd_ray.config import ConfigError, describe, load_config


def main(argv=None, *, method: str | None = None, default_config: str = "cpu", doc: str = "") -> int:
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--config", default=None, help=f"preset name (afd_ray/presets) or YAML path "
                                                       f"(default: {default_config})")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue RUN_DIR after its last complete checkpoint with its saved config; overrides "
                             "given with it change that config (e.g. run.iterations=8 extends the run)")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. policy.lr=1e-6")
    args = parser.parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = list(args.overrides)
    given = [o for o in overrides if o.startswith("run.method=")]
    if method is not None and given and given[-1] != f"run.method={method}":
        print(f"config error: this job runs run.method={method}; got {given[-1]}", file=sys.stderr)
        return 2
    from afd_ray.run import run
    from afd_ray.runtime.guard import NonFiniteError
    from afd_ray.runtime.loop import RunStopped
    from afd_ray.workers.handles import WeightSyncError

    try:
        if args.resume is not None:
            if args.config is not None:
                raise ConfigError("--resume RUN_DIR uses the run's saved config: drop --config (give changes as "
                                  "section.key=value overrides)")
            if given:
                raise ConfigError("--resume cannot change run.method")
            _same_method(args.resume, method)
            run(None, resume=args.resume, overrides=overrides)
        else:
            if method is not None:
                overrides = [f"run.method={method}"] + overrides
            run(load_config(args.config or default_config, overrides))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (RunStopped, NonFiniteError, WeightSyncError) as e:
        print(f"run stopped: {e}", file=sys.stderr)
        return 3
    return 0


def _same_method(run_dir: str, method: str | None) -> None:
    """A job for one method (jobs/sft.py, ...) resumes only runs of that method."""
    from afd_ray.runtime.rundir import RunDir

    saved = RunDir(run_dir).saved_config() if method else None
    if saved is not None and saved.run.method != method:
        raise ConfigError(f"{run_dir} is a run.method={saved.run.method} run; this job runs run.method={method}: "
                          f"resume it with jobs/irl_ultrachat.py --resume {run_dir}")
