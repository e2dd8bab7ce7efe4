"""The bi-level IRL job (DESIGN.md Sec. 1; seeds/004 Eq. 21).

    python jobs/irl_ultrachat.py --config cpu                          # the embedded default, 2 CPU cores
    python jobs/irl_ultrachat.py --config ultrachat-8gpu policy.lr=5e-7
    python jobs/irl_ultrachat.py --resume runs/irl-20261126-101500     # continue after the last checkpoint
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/irl_ultrachat.py --config cpu
"""

import argparse
import logging
import sys

from afd_ray.config import ConfigError, describe, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="afd_ray: inverse RL from demonstrations on Ray",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", default="cpu", help="preset name (afd_ray/presets) or YAML path")
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
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from afd_ray.run import run

    try:
        run(cfg, resume=args.resume)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
