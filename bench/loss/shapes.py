"""The problem shapes each device is benchmarked at.

A shape is ``N`` tokens, hidden size ``D`` and vocabulary ``V``. One logits GEMM costs
``2 N D V`` FLOPs; the grids below are sized from that count.

CPU (fp32, 2 cores at ~40 GFLOP/s): the headline shape N=2048, D=512, V=32768 runs every
group and every contender; the sweeps (V up to 131072, N up to 4096, D from 256 to 1024) run
the forward+backward group only and are centred on D=256, so that the whole grid is about
15 minutes and the largest materialised reference (N=1024, V=131072) stays near 4 GB.

GPU (bf16): the LM heads of three real models at N = 4096, 8192 and 16384 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Group names. The headline is forward+backward of the full objective.
FWD_BWD = "fwd_bwd"        # CE + KL, forward and backward
FWD = "fwd"                # CE + KL, forward only (no gradients requested)
CE_FWD_BWD = "ce_fwd_bwd"  # cross-entropy only (no teacher), forward and backward
GROUPS = (FWD_BWD, FWD, CE_FWD_BWD)


@dataclass(frozen=True)
class Shape:
    N: int
    D: int
    V: int
    model: Optional[str] = None   # whose LM head this is, if a real one
    groups: tuple = GROUPS        # which groups run at this shape
    headline: bool = False        # the shape the targets are judged at

    @property
    def label(self) -> str:
        base = f"N={self.N} D={self.D} V={self.V}"
        return f"{self.model} {base}" if self.model else base


def _sweep(N, D, V):
    # Sweeps only need the headline group: they feed the time/memory-vs-V and -vs-N plots.
    return Shape(N, D, V, groups=(FWD_BWD,))


CPU_HEADLINE = (2048, 512, 32768)  # the shape the CPU targets are judged at
CPU_GRID = (
    Shape(*CPU_HEADLINE, headline=True),
    # V sweep at N=1024, D=256
    _sweep(1024, 256, 32768),
    _sweep(1024, 256, 65536),
    _sweep(1024, 256, 131072),
    # N sweep at D=256, V=32768 (N=1024 above)
    _sweep(2048, 256, 32768),
    _sweep(4096, 256, 32768),
    # the top of the D range
    _sweep(1024, 1024, 32768),
)

# A tiny grid for CI smoke runs (seconds): two vocabularies so that the V plot has a line.
CPU_QUICK_GRID = (
    Shape(128, 64, 2048),
    Shape(128, 64, 4096, groups=(FWD_BWD,)),
)

# (model, D, V) of the real heads.
GPU_HEADS = (
    ("Llama-3-8B", 4096, 128256),
    ("Qwen2.5-7B", 3584, 152064),
    ("Gemma-2-2B", 2304, 256000),
)
GPU_TOKENS = (4096, 8192, 16384)
GPU_HEADLINE = ("Llama-3-8B", 8192)

GPU_GRID = tuple(
    Shape(N, D, V, model=model, headline=(model, N) == GPU_HEADLINE)
    for model, D, V in GPU_HEADS
    for N in GPU_TOKENS
)

GPU_QUICK_GRID = (
    Shape(1024, 1024, 32768),
    Shape(1024, 1024, 65536, groups=(FWD_BWD,)),
)


def grid(device: str, quick: bool) -> tuple:
    if device == "cpu":
        return CPU_QUICK_GRID if quick else CPU_GRID
    return GPU_QUICK_GRID if quick else GPU_GRID
