"""The command line shared by the jobs in ``jobs/``: a preset or YAML, ``section.key=value`` overrides,
``--resume RUN_DIR``, ``--help-config``. Exit status 2 on a configuration error (the message names the key)."""

from __future__ import annotations

import argparse
import logging
import sys

from afd_ray.config import ConfigError, describe, load_config


def main(argv=None, *, method: str | None = None, default_config: str = "cpu", doc: str = "") -> int:
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--config", default=default_config, help="preset name (afd_ray/presets) or YAML path")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue RUN_DIR after its last complete iteration (its saved config is used; "
                             "run.iterations and run.stop_after may be overridden)")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. policy.lr=1e-6")
    args = parser.parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = list(args.overrides)
    if method is not None:
        given = [o for o in overrides if o.startswith("run.method=")]
        if given and given[-1] != f"run.method={method}":
            print(f"config error: this job runs run.method={method}; got {given[-1]}", file=sys.stderr)
            return 2
        overrides = [f"run.method={method}"] + overrides
    try:
        cfg = load_config(args.config, overrides)
        from afd_ray.run import run

        run(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0
