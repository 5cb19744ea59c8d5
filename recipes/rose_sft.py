"""ROSE end to end: warm-up LoRA SFT -> reward-oriented selection -> final SFT on the selection.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/rose_sft.py \
        --config recipes/tiny/rose/config_tiny.yaml
"""

import sys

from trl import ModelConfig, SFTConfig

from rose_trl.config import ROSEConfig
from rose_trl.run.pipeline import recipe_parser, run
from rose_trl.utils.errors import exit_code


def main(rose_args: ROSEConfig, sft_args: SFTConfig, model_args: ModelConfig):
    result = run(rose_args, sft_args, model_args)
    print(f"selection: {result['selection']}")
    if result["final_model"]:
        print(f"final model: {result['final_model']}")


if __name__ == "__main__":
    parser = recipe_parser()
    # A bad option, file or record is one line and exit code 2 (rose_trl/utils/errors.py); a bug keeps its traceback.
    sys.exit(exit_code("rose_sft.py", lambda: main(*parser.parse_args_and_config())))
