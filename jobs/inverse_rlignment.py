"""Inverse-RLignment (seeds/000 Sec. 3.2): SFT -> discriminator reward model -> Best-of-N curve.

    python jobs/inverse_rlignment.py --config cpu                      # offline data, SmolLM2
    python jobs/inverse_rlignment.py --config cpu bon.data_choice=init_demo bon.n=1,4,16,64
    python jobs/inverse_rlignment.py --config cpu bon.compare_choices=init_demo,sft_demo   # Table 1 side by side
    python jobs/inverse_rlignment.py --config hh-harmless              # GPT-2 on HH-RLHF Harmless (GPU)
    python jobs/inverse_rlignment.py --config cpu bon.rl_iterations=5  # then RL on the learned reward

The run directory holds sft/model, reward_model, bon/N*.jsonl (selected responses; bon_<choice>/ for
bon.compare_choices, bon_compare/ for bon.compare_reward), bon.json and report.md.
"""

import sys

from afd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(method="inverse_rlignment", doc=__doc__))
