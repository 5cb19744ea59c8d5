"""ROSE selection from the saved checkpoints of a finished LoRA warm-up (LESS-style offline mode).

    accelerate launch --config_file accelerate_configs/multi_cpu.yaml recipes/rose_select.py \
        --config recipes/tiny/rose/select_tiny.yaml
Every process extracts its share of the pool; the selection is the same for any number of processes.
"""

import sys

from trl import ModelConfig, TrlParser

from rose_trl.config import ROSEConfig, SelectConfig
from rose_trl.run.pipeline import run_offline
from rose_trl.utils.errors import exit_code


def main(rose_args: ROSEConfig, model_args: ModelConfig, select_args: SelectConfig):
    print(f"selection: {run_offline(rose_args, model_args, select_args)}")


if __name__ == "__main__":
    parser = TrlParser((ROSEConfig, ModelConfig, SelectConfig))
    # A bad option, file or record is one line and exit code 2 (rose_trl/utils/errors.py); a bug keeps its traceback.
    sys.exit(exit_code("rose_select.py", lambda: main(*parser.parse_args_and_config())))
