"""Random projections of gradient rows: one seeded matrix shared by every process, run and gradient type.

- `SparseJLProjector` ("sjlt", the default on CPU and GPU): a sparse Johnson-Lindenstrauss transform
  (Kane & Nelson 2014). Each input coordinate lands in `nnz` output rows with random signs, so a row
  costs O(nnz * n_params) instead of O(dim * n_params) and no matrix is stored. Its inner-product
  distortion matches a dense Rademacher matrix at the same dim (tests/test_projection.py).
- `TrakProjector`: TRAK's Rademacher projection, as LESS/ROSE use it. "trak" is trak's
  `BasicProjector` on any device; it regenerates its matrix block by block on every call, and when the
  matrix fits `cache_bytes` we materialize exactly the same blocks once (same numbers, ~15x faster).
  "trak_cuda" is trak's `CudaProjector` (fast_jl), LESS's GPU projector. It is never picked
  automatically: on an H100 its scores tracked exact cosine scores much worse than BasicProjector's
  or sjlt's (mean Spearman 0.42 vs 0.79 and 0.79, docs/results/distributed.md).

Projectors are described by a JSON-able dict (`describe()`), stored with every gradient store so
that stores built with different matrices are never mixed.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


PROJECTION_TYPES = ("sjlt", "trak", "trak_cuda")


class Projector(Protocol):
    input_dim: int
    dim: int

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """[rows, input_dim] float -> [rows, dim] float32."""

    def describe(self) -> dict:
        """What identifies the matrix: two projectors with equal descriptions project identically."""

    @property
    def supports_slices(self) -> bool:
        """Whether `add_projection` can project a slice of the input coordinates (the fused gradient path)."""

    def add_projection(self, out: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """out [rows, dim] += projection of `values` [rows, n], the input coordinates [start, start + n):
        summed over slices that cover the input, equal to `project` of the whole rows."""

    @property
    def implementation(self) -> str:
        """Which code computes it, for the log."""


class SparseJLProjector:
    """Sparse JL transform: out[:, h_s(j)] += sign_s(j) * x[:, j] / sqrt(nnz), for s < nnz."""

    name = "sjlt"

    def __init__(
        self,
        input_dim: int,
        dim: int = 8192,
        seed: int = 0,
        nnz: int = 4,
        chunk: int = 1 << 22,
        cache_bytes: int = 4 << 30,
    ):
        if nnz < 1 or dim < 1:
            raise ValueError(f"sjlt needs dim >= 1 and nnz >= 1, got dim={dim}, nnz={nnz}")
        self.input_dim = input_dim
        self.dim = dim
        self.seed = seed
        self.nnz = nnz
        self.chunk = chunk
        # The hash plan costs 5 bytes (int32 bucket, int8 sign) per input coordinate and nnz: it is kept,
        # on the device that projects, when that fits `cache_bytes` (7B LoRA r=128: 2.7 GB), and
        # regenerated chunk by chunk on every call otherwise.
        self._cache = self.caches_plan(input_dim, nnz, cache_bytes)
        self._plan: list[tuple[int, int, torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def caches_plan(input_dim: int, nnz: int = 4, cache_bytes: int = 4 << 30) -> bool:
        """Whether the hash plan of `input_dim` coordinates is kept (then slices can be projected: the fused path)."""
        return input_dim * nnz * 5 <= cache_bytes

    def _chunks(self):
        for start in range(0, self.input_dim, self.chunk):
            end = min(start + self.chunk, self.input_dim)
            # One generator per chunk, seeded from (seed, chunk index): the plan does not depend on
            # the device or on how many chunks were generated before.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + start // self.chunk)
            buckets = torch.randint(0, self.dim, (self.nnz, end - start), generator=g).int()
            signs = torch.randint(0, 2, (self.nnz, end - start), generator=g, dtype=torch.int8) * 2 - 1
            yield start, end, buckets, signs

    def _plan_on(self, device: torch.device):
        if not self._cache:
            return ((s, e, b.to(device), g.to(device)) for s, e, b, g in self._chunks())
        if self._plan is None or self._plan[0][2].device != device:
            self._plan = [(s, e, b.to(device), g.to(device)) for s, e, b, g in self._chunks()]
        return self._plan

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[-1] != self.input_dim:
            raise ValueError(f"projector built for {self.input_dim} parameters, got rows of {grads.shape[-1]}")
        grads = grads.float()
        out = torch.zeros(grads.shape[0], self.dim, dtype=torch.float32, device=grads.device)
        scale = 1 / math.sqrt(self.nnz)
        for start, end, buckets, signs in self._plan_on(grads.device):
            block = grads[:, start:end]
            for s in range(self.nnz):
                # int64 at use: index_add_ with int32 indices is ~12x slower on the CPU.
                out.index_add_(1, buckets[s].long(), block * signs[s])
        return out.mul_(scale)

    @property
    def supports_slices(self) -> bool:
        # Slices read the cached plan; regenerating a whole chunk of it for every layer would cost more
        # than the fused path saves.
        return self._cache

    def add_projection(self, out: torch.Tensor, values: torch.Tensor, start: int) -> None:
        end = start + values.shape[-1]
        if start < 0 or end > self.input_dim:
            raise ValueError(f"coordinates [{start}, {end}) are outside the projector's {self.input_dim} inputs")
        scale = 1 / math.sqrt(self.nnz)
        values = values.float()
        for c_start, c_end, buckets, signs in self._plan_on(values.device):
            lo, hi = max(start, c_start), min(end, c_end)
            if lo >= hi:
                continue
            block = values[:, lo - start : hi - start]
            for s in range(self.nnz):
                out.index_add_(
                    1,
                    buckets[s, lo - c_start : hi - c_start].long(),
                    block * signs[s, lo - c_start : hi - c_start],
                    alpha=scale,
                )

    def describe(self) -> dict:
        return {"type": self.name, "dim": self.dim, "seed": self.seed, "nnz": self.nnz, "input_dim": self.input_dim}

    implementation = "sparse JL transform (rose_trl)"


class TrakProjector:
    """TRAK's Rademacher projection (LESS/ROSE-compatible stores)."""

    name = "trak"

    def __init__(
        self,
        input_dim: int,
        dim: int = 8192,
        seed: int = 0,
        device: str | torch.device = "cpu",
        block_size: int = 128,
        max_batch_size: int = 16,
        cache_bytes: int = 4 << 30,
        backend: str = "basic",
    ):
        from trak.projectors import BasicProjector, ProjectionType

        self.input_dim = input_dim
        self.dim = dim
        self.seed = seed
        self.block_size = block_size
        self.device = torch.device(device)
        self.backend = backend
        self._matrix: torch.Tensor | None = None
        if backend == "cuda":
            if self.device.type != "cuda" or not _has_fast_jl():
                raise ValueError(
                    "projection_type 'trak_cuda' needs a CUDA device and fast_jl "
                    "(pip install -e '.[fast]' on a GPU machine); use 'sjlt' or 'trak' otherwise"
                )
            from trak.projectors import CudaProjector

            self._impl = CudaProjector(
                grad_dim=input_dim,
                proj_dim=dim,
                seed=seed,
                proj_type=ProjectionType.rademacher,
                device=self.device,
                max_batch_size=max_batch_size,
            )
        elif backend == "basic":
            self._impl = BasicProjector(
                grad_dim=input_dim,
                proj_dim=dim,
                seed=seed,
                proj_type=ProjectionType.rademacher,
                device=self.device,
                block_size=block_size,
                dtype=torch.float32,
            )
            if self.caches_matrix(input_dim, dim, cache_bytes):
                self._matrix = self._materialize_basic()
        else:
            raise ValueError(f"unknown trak backend {backend!r}; use 'basic' or 'cuda'")

    @staticmethod
    def caches_matrix(input_dim: int, dim: int, cache_bytes: int = 4 << 30) -> bool:
        """Whether BasicProjector's whole matrix is built once and kept (then slices can be projected)."""
        return input_dim * dim * 4 <= cache_bytes

    def _materialize_basic(self) -> torch.Tensor:
        """The exact matrix BasicProjector multiplies by, block by block, built once."""
        impl = self._impl
        blocks = []
        for ind in range(impl.num_blocks):
            impl.generate_sketch_matrix(impl.generator_states[ind])
            width = min((ind + 1) * impl.block_size, self.dim) - ind * impl.block_size
            blocks.append(impl.proj_matrix[:, :width].clone())
        return torch.cat(blocks, dim=1)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[-1] != self.input_dim:
            raise ValueError(f"projector built for {self.input_dim} parameters, got rows of {grads.shape[-1]}")
        grads = grads.to(self.device, torch.float32)
        if self._matrix is not None:
            return grads @ self._matrix
        if self.backend == "cuda":
            # float32 in: fast_jl takes it, and half would flush small (SGD) gradients to zero.
            return self._impl.project(grads.contiguous(), model_id=0).float()
        return self._impl.project(grads, model_id=0)

    @property
    def supports_slices(self) -> bool:
        return self._matrix is not None  # rows of the cached matrix; trak's own projectors take whole rows

    def add_projection(self, out: torch.Tensor, values: torch.Tensor, start: int) -> None:
        out.addmm_(values.to(self.device, torch.float32), self._matrix[start : start + values.shape[-1]])

    def describe(self) -> dict:
        # BasicProjector and CudaProjector draw different matrices from the same seed.
        return {
            "type": f"trak_{self.backend}",
            "dim": self.dim,
            "seed": self.seed,
            "block_size": self.block_size if self.backend == "basic" else None,
            "input_dim": self.input_dim,
        }

    @property
    def implementation(self) -> str:
        if self.backend == "cuda":
            return "trak CudaProjector (fast_jl)"
        return "trak BasicProjector" + (" (matrix cached)" if self._matrix is not None else "")


def build_projector(
    kind: str, input_dim: int, dim: int = 8192, seed: int = 0, device: str | torch.device = "cpu", **kwargs
) -> Projector:
    """`kind`: "sjlt" (fast, default), "trak" (trak's BasicProjector), "trak_cuda" (trak's CudaProjector,
    fast_jl) or "auto" (the measured best for the device: sjlt on CPU and on GPU)."""
    if kind in ("auto", "sjlt"):
        return SparseJLProjector(input_dim, dim, seed, **kwargs)
    if kind in ("trak", "trak_cuda"):
        return TrakProjector(
            input_dim, dim, seed, device=device, backend="cuda" if kind == "trak_cuda" else "basic", **kwargs
        )
    raise ValueError(f"unknown projection type {kind!r}; choose one of {PROJECTION_TYPES + ('auto',)}")


def projects_slices(kind: str, input_dim: int, dim: int = 8192) -> bool:
    """Whether `build_projector(kind, input_dim, dim)` (default settings) projects slices of the parameters, i.e.
    whether the run's gradient passes take the fused path, without building the projector."""
    if kind in ("auto", "sjlt"):
        return SparseJLProjector.caches_plan(input_dim)
    if kind == "trak":
        return TrakProjector.caches_matrix(input_dim, dim)
    if kind == "trak_cuda":
        return False
    raise ValueError(f"unknown projection type {kind!r}; choose one of {PROJECTION_TYPES + ('auto',)}")


def _has_fast_jl() -> bool:
    try:
        import fast_jl  # noqa: F401
    except ImportError:
        return False
    return True
