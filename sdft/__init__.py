"""sdft: self-distillation fine-tuning for Hugging Face causal LMs.

The loss (``SDFTLoss``, ``causal_lm_loss``, ``SDFTModel``), teacher sources (``sdft.teacher``),
parameter-group freezing (``sdft.freezing``), the Trainer (``SDFTTrainer``) and, with TRL
installed, its ``SFTTrainer`` with the SDFT loss (``SDFTSFTTrainer``, :mod:`sdft.trl`).
"""

from sdft_kernels import SDFTLossOutput, fused_linear_sdft_loss

from .integration import SDFTModel, causal_lm_loss
from .loss import SDFTLoss

__all__ = ["SDFTLoss", "SDFTLossOutput", "SDFTModel", "SDFTTrainer", "causal_lm_loss", "fused_linear_sdft_loss"]


def __getattr__(name):
    # transformers' Trainer is heavy to import, and TRL optional: load them only when asked for.
    if name == "SDFTTrainer":
        from .trainer import SDFTTrainer

        return SDFTTrainer
    if name == "SDFTSFTTrainer":  # not in __all__: a star import must not need TRL
        try:
            from .trl import SDFTSFTTrainer
        except ModuleNotFoundError as error:
            if error.name != "trl" and not (error.name or "").startswith("trl."):
                raise
            raise ImportError("sdft.SDFTSFTTrainer extends TRL's SFTTrainer: pip install 'sdft-kernels[trl]'") from error
        return SDFTSFTTrainer
    raise AttributeError(f"module 'sdft' has no attribute {name!r}")
