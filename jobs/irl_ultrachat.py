"""The bi-level IRL job (DESIGN.md Sec. 1): `python jobs/irl_ultrachat.py --config PRESET_OR_YAML [key=value ...]`."""

import argparse
import sys

from afd_ray.config import ConfigError, describe, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="cpu", help="preset name (afd_ray/presets) or YAML path")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. policy.lr=1e-6")
    args = parser.parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"afd_ray: config {args.config!r} is valid (method={cfg.run.method}, policy.algo={cfg.policy.algo}).")
    print("The IRL driver (Ray actors, vLLM rollout, DeepSpeed learners) is not built yet; nothing was run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
