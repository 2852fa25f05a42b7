"""sdft: self-distillation fine-tuning for Hugging Face causal LMs.

The loss (``SDFTLoss``, ``causal_lm_loss``, ``SDFTModel``), teacher sources (``sdft.teacher``),
parameter-group freezing (``sdft.freezing``) and the Trainer (``SDFTTrainer``).
"""

from sdft_kernels import SDFTLossOutput, fused_linear_sdft_loss

from .integration import SDFTModel, causal_lm_loss
from .loss import SDFTLoss

__all__ = ["SDFTLoss", "SDFTLossOutput", "SDFTModel", "SDFTTrainer", "causal_lm_loss", "fused_linear_sdft_loss"]


def __getattr__(name):
    # transformers' Trainer is heavy to import: load it only when asked for.
    if name == "SDFTTrainer":
        from .trainer import SDFTTrainer

        return SDFTTrainer
    raise AttributeError(f"module 'sdft' has no attribute {name!r}")
