"""Random projections of gradient rows: one seeded matrix shared by every process, run and gradient type.

- `TrakProjector`: TRAK's Rademacher projection, as LESS/ROSE use it. trak's `CudaProjector` (fast_jl)
  on CUDA when it is installed, otherwise trak's `BasicProjector`. `BasicProjector` regenerates its
  matrix block by block on every call; when the matrix fits `cache_bytes` we materialize exactly the
  same blocks once, which gives the same numbers ~15x faster.
- `SparseJLProjector` ("sjlt", the CPU default): a sparse Johnson-Lindenstrauss transform (Kane &
  Nelson 2014). Each input coordinate lands in `nnz` output rows with random signs, so a row costs
  O(nnz * n_params) instead of O(dim * n_params) and no matrix is stored. Its inner-product
  distortion matches a dense Rademacher matrix at the same dim (tests/test_projection.py).

Projectors are described by a JSON-able dict (`describe()`), stored with every gradient store so
that stores built with different matrices are never mixed.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

PROJECTION_TYPES = ("sjlt", "trak")


class Projector(Protocol):
    input_dim: int
    dim: int

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """[rows, input_dim] float -> [rows, dim] float32."""

    def describe(self) -> dict:
        """What identifies the matrix: two projectors with equal descriptions project identically."""

    @property
    def implementation(self) -> str:
        """Which code computes it, for the log."""


class SparseJLProjector:
    """Sparse JL transform: out[:, h_s(j)] += sign_s(j) * x[:, j] / sqrt(nnz), for s < nnz."""

    name = "sjlt"

    def __init__(self, input_dim: int, dim: int = 8192, seed: int = 0, nnz: int = 4, chunk: int = 1 << 22):
        if nnz < 1 or dim < 1:
            raise ValueError(f"sjlt needs dim >= 1 and nnz >= 1, got dim={dim}, nnz={nnz}")
        self.input_dim, self.dim, self.seed, self.nnz, self.chunk = input_dim, dim, seed, nnz, chunk
        self._plan: list[tuple[int, int, torch.Tensor, torch.Tensor]] | None = None
        # The hash plan costs (4 + 4) * nnz bytes per input coordinate: keep it when that is small.
        if input_dim * nnz * 8 <= 2 << 30:
            self._plan = list(self._chunks())

    def _chunks(self):
        for start in range(0, self.input_dim, self.chunk):
            end = min(start + self.chunk, self.input_dim)
            # One generator per chunk, seeded from (seed, chunk index): the plan does not depend on
            # the device or on how many chunks were generated before.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + start // self.chunk)
            buckets = torch.randint(0, self.dim, (self.nnz, end - start), generator=g)
            signs = torch.randint(0, 2, (self.nnz, end - start), generator=g, dtype=torch.int8).float() * 2 - 1
            yield start, end, buckets, signs / math.sqrt(self.nnz)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[-1] != self.input_dim:
            raise ValueError(f"projector built for {self.input_dim} parameters, got rows of {grads.shape[-1]}")
        grads = grads.float()
        out = torch.zeros(grads.shape[0], self.dim, dtype=torch.float32, device=grads.device)
        for start, end, buckets, signs in self._plan if self._plan is not None else self._chunks():
            block = grads[:, start:end]
            buckets, signs = buckets.to(grads.device), signs.to(grads.device)
            for s in range(self.nnz):
                out.index_add_(1, buckets[s], block * signs[s])
        return out

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
    ):
        from trak.projectors import BasicProjector, ProjectionType

        self.input_dim, self.dim, self.seed, self.block_size = input_dim, dim, seed, block_size
        self.device = torch.device(device)
        self.backend = "basic"
        self._matrix: torch.Tensor | None = None
        self._impl = None
        if self.device.type == "cuda":
            try:
                import fast_jl  # noqa: F401
                from trak.projectors import CudaProjector

                self._impl = CudaProjector(
                    grad_dim=input_dim, proj_dim=dim, seed=seed, proj_type=ProjectionType.rademacher,
                    device=self.device, max_batch_size=max_batch_size,
                )
                self.backend = "cuda"
            except ImportError:
                pass  # fast_jl missing: BasicProjector below
        if self._impl is None:
            self._impl = BasicProjector(
                grad_dim=input_dim, proj_dim=dim, seed=seed, proj_type=ProjectionType.rademacher,
                device=self.device, block_size=block_size, dtype=torch.float32,
            )
            if input_dim * dim * 4 <= cache_bytes:
                self._matrix = self._materialize_basic()

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
            return self._impl.project(grads.half().contiguous(), model_id=0).float()
        return self._impl.project(grads, model_id=0)

    def describe(self) -> dict:
        # BasicProjector and CudaProjector draw different matrices from the same seed.
        return {"type": f"trak_{self.backend}", "dim": self.dim, "seed": self.seed,
                "block_size": self.block_size if self.backend == "basic" else None, "input_dim": self.input_dim}

    @property
    def implementation(self) -> str:
        if self.backend == "cuda":
            return "trak CudaProjector (fast_jl)"
        return "trak BasicProjector" + (" (matrix cached)" if self._matrix is not None else "")


def build_projector(kind: str, input_dim: int, dim: int = 8192, seed: int = 0,
                    device: str | torch.device = "cpu", **kwargs) -> Projector:
    """`kind`: "sjlt" (fast default), "trak" (TRAK Rademacher, CudaProjector when fast_jl works), or "auto"
    (trak's CudaProjector on CUDA with fast_jl, sjlt elsewhere)."""
    if kind == "auto":
        kind = "trak" if torch.device(device).type == "cuda" and _has_fast_jl() else "sjlt"
    if kind == "sjlt":
        return SparseJLProjector(input_dim, dim, seed, **kwargs)
    if kind == "trak":
        return TrakProjector(input_dim, dim, seed, device=device, **kwargs)
    raise ValueError(f"unknown projection type {kind!r}; choose one of {PROJECTION_TYPES + ('auto',)}")


def _has_fast_jl() -> bool:
    try:
        import fast_jl  # noqa: F401
    except ImportError:
        return False
    return True
