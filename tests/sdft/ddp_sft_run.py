"""One SDFTSFTTrainer run under ``torchrun`` (DDP, gloo, CPU), for
``test_trl.test_two_processes_under_ddp_equal_the_materialised_objective``.

Usage: ``torchrun --nproc_per_node=2 -m tests.sdft.ddp_sft_run OUT_DIR``. Each process saves
the micro-batches it trained on (``batches-<rank>.pt``); rank 0 also the trained weights
(``weights.pt``) and the logs (``log_history.pt``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import trl

from sdft import SDFTLoss
from sdft.teacher import FrozenCopy
from sdft.trl import SDFTSFTTrainer
from tests.sdft import trl_fixtures as fx

KL_WEIGHT, TAU, LR = 0.7, 0.5, 0.1


class Recording(SDFTSFTTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.recorded.append({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def main(out: Path) -> None:
    tok = fx.tokenizer()
    args = trl.SFTConfig(output_dir=str(out / "run"), bf16=False, per_device_train_batch_size=2, max_steps=1,
                         logging_steps=1,
                         learning_rate=LR, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                         weight_decay=0.0, warmup_steps=0, report_to=[], use_cpu=True, seed=0,
                         save_strategy="no", ddp_backend="gloo")
    trainer = Recording(model=fx.model(len(tok), dtype=torch.float64), args=args,
                        train_dataset=fx.prompt_completion(n=8), processing_class=tok,
                        teacher=FrozenCopy(fx.model(len(tok), seed=1, dtype=torch.float64)),
                        loss=SDFTLoss(kl_weight=KL_WEIGHT, temperature=TAU))
    trainer.recorded = []
    trainer.train()
    rank = trainer.args.process_index
    torch.save(trainer.recorded, out / f"batches-{rank}.pt")
    if rank == 0:
        torch.save({n: p.detach() for n, p in trainer.model.named_parameters()}, out / "weights.pt")
        torch.save(trainer.state.log_history, out / "log_history.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
