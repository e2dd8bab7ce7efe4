"""The bi-level IRL job (DESIGN.md Sec. 1; seeds/004 Eq. 21); any run.method works here too.

    python jobs/irl_ultrachat.py --config cpu                          # the embedded default, 2 CPU cores
    python jobs/irl_ultrachat.py --config ultrachat-8gpu policy.lr=5e-7
    python jobs/irl_ultrachat.py --resume runs/irl-20261126-101500     # continue after the last checkpoint
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/irl_ultrachat.py --config cpu
"""

import sys

from afd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(doc=__doc__))
