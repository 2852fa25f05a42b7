"""sdft_kernels: fused LM-head + cross-entropy + teacher-divergence loss.

Imports torch only at import time; triton is imported when a Triton kernel is first used.
"""

from .fused_loss import default_impl, fused_linear_sdft_loss
from .options import LossOptions
from .loss_output import SDFTLossOutput
from .reference import reference_sdft_loss
from .workspace import kept_workspace_bytes, release_workspace

__all__ = ["fused_linear_sdft_loss", "default_impl", "reference_sdft_loss", "LossOptions", "SDFTLossOutput",
           "release_workspace", "kept_workspace_bytes"]
__version__ = "0.1.0"
