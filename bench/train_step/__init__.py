"""The training-step benchmark: one optimizer step of SFT against SDFT per teacher source
(``python -m bench.train_step``)."""
