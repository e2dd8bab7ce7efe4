"""Supervised fine-tuning as a Ray Train job (TorchTrainer + DeepSpeed ZeRO; afd_ray/sft.py).

    python jobs/sft.py --config cpu                                    # SmolLM2 on the offline demonstrations
    python jobs/sft.py --config cpu sft.num_workers=2 sft.packing=true model.lora_r=8
    python jobs/sft.py --config cpu run.name=sft1                      # again with the same name: resumes
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/sft.py --config cpu

The run directory holds sft/model (pi_SFT, HF format), sft/ray_train (Ray Train checkpoints) and report.md.
"""

import sys

from afd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(method="sft", doc=__doc__))
