"""SDFTTrainer: a Trainer script becomes SDFT by changing the class."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from sdft import SDFTLoss, SDFTTrainer
from sdft.teacher import FrozenCopy
from tests.sdft.tiny_models import tiny_model


def _collate(rows):
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a two-token prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_sdft_trainer_trains_and_logs(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 40, (int(torch.randint(5, 9, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(32)]
    ds = Dataset.from_list(rows)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                             num_train_epochs=6, learning_rate=3e-3, logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, remove_unused_columns=False)
    trainer = SDFTTrainer(model=model, args=args, train_dataset=ds, data_collator=_collate,
                          teacher=FrozenCopy(model), sdft_loss=SDFTLoss(kl_weight=0.5))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(losses) >= 10
    assert losses[-1] < 0.8 * losses[0], losses
    assert kls[0] == pytest.approx(0.0, abs=1e-5) and max(kls) > 0  # teacher = start: KL starts at 0


def test_trainer_gradient_accumulation_matches_large_batch(tmp_path):
    """With num_items_in_batch, 2 x 4 accumulated equals one batch of 8 (one SGD step)."""
    rows = [{"input_ids": list(range(3, 3 + n))} for n in (4, 5, 4, 5, 9, 8, 9, 8)]  # unequal token counts per micro-batch
    ds = Dataset.from_list(rows)
    results = []
    for bs, accum in ((8, 1), (4, 2)):
        model = tiny_model("llama")
        args = TrainingArguments(output_dir=str(tmp_path / f"{bs}"), per_device_train_batch_size=bs,
                                 gradient_accumulation_steps=accum, max_steps=1, learning_rate=1e-2, optim="sgd",
                                 lr_scheduler_type="constant", report_to=[], use_cpu=True, seed=0,
                                 save_strategy="no", remove_unused_columns=False, dataloader_drop_last=False)
        trainer = SDFTTrainer(model=model, args=args, train_dataset=ds, data_collator=_collate,
                              teacher=FrozenCopy(tiny_model("llama", seed=1)))
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(ds)
        trainer.train()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


def test_plain_model_under_ddp_is_refused_with_advice(tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29541")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = tiny_model("llama")
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
        trainer = SDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"input_ids": [3, 4, 5]}]),
                              data_collator=_collate, teacher=FrozenCopy(model))
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        batch = _collate([{"input_ids": [3, 4, 5, 6]}])
        with pytest.raises(RuntimeError, match="pass model=SDFTModel"):
            trainer.compute_loss(wrapped, batch)
    finally:
        dist.destroy_process_group()
