"""SDFTTrainer: a Trainer script becomes SDFT by changing the class."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from sdft import SDFTLoss, SDFTModel, SDFTTrainer, causal_lm_loss
from sdft_kernels import kept_workspace_bytes
from sdft.teacher import FrozenCopy
from sdft.trainer import count_loss_targets
from tests.sdft.decoder_activity import DecoderActivity
from tests.sdft.tiny_models import perturbed_copy, tiny_model
from tests.sdft.train_fixtures import free_port


def _padded(rows):
    """Right-padded ``input_ids`` (pad id 0) and their ``attention_mask``."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return ids, mask


def _collate(rows):
    ids, mask = _padded(rows)
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
                          teacher=FrozenCopy(model), loss=SDFTLoss(kl_weight=0.5))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(losses) >= 10
    assert losses[-1] < 0.8 * losses[0], losses
    assert kls[0] == pytest.approx(0.0, abs=1e-5) and max(kls) > 0  # teacher = start: KL starts at 0


class _KeptBytes(TrainerCallback):
    """The CPU chunk buffers the loss keeps, after each optimizer step."""

    def __init__(self):
        self.after_steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.after_steps.append(kept_workspace_bytes())


@pytest.mark.parametrize("fails", [False, True])
def test_train_frees_the_kept_chunk_buffers_when_it_ends(tmp_path, fails):
    """Kept between steps (the next step reuses them), freed when ``train`` returns or raises."""
    model = tiny_model("llama")
    rows = [{"input_ids": list(range(3, 3 + n))} for n in (5, 7, 6, 8, 5, 6, 7, 8)]
    kept = _KeptBytes()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4,
                             save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False)
    batches = []

    def collate(batch):  # with ``fails``, the third batch raises (after a step or two: the loader reads ahead)
        batches.append(batch)
        if fails and len(batches) == 3:
            raise RuntimeError("a bad batch")
        return _collate(batch)

    trainer = SDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collate,
                          teacher=FrozenCopy(model), loss=SDFTLoss(kl_weight=1.0), callbacks=[kept])
    if fails:
        with pytest.raises(RuntimeError, match="a bad batch"):
            trainer.train()
    else:
        trainer.train()
    assert kept.after_steps and all(b > 0 for b in kept.after_steps), kept.after_steps
    assert kept_workspace_bytes() == 0


def _labels_are_inputs(rows):
    """A collator that sets labels = input_ids, padding included (as many do): position 0 is
    labelled, and pad ids sit in the labels. Neither may count as a target."""
    ids, mask = _padded(rows)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def _full_batch_objective(student, teacher_model, batch, kl_weight, tau):
    """The SDFT objective of one whole batch from the models' own logits, in float64."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    z_s = student(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    with torch.no_grad():
        z_t = teacher_model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    targets = batch["labels"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    counted = targets != -100
    ce = F.cross_entropy(z_s.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
    kl = (F.softmax(z_t / tau, -1) * (F.log_softmax(z_t / tau, -1) - F.log_softmax(z_s / tau, -1))).sum(-1)
    return (ce + kl_weight * tau**2 * (kl * counted).sum()) / counted.sum()


@pytest.mark.parametrize("wrap", ["plain", "SDFTModel"])
def test_accumulated_step_equals_the_full_batch_objective(tmp_path, wrap):
    """2 micro-batches x 2 rows, accumulated, move the weights exactly as one SGD step on the
    objective of all 4 rows computed independently from the models' own logits."""
    rows = [{"input_ids": list(range(3, 3 + n))} for n in (4, 7, 9, 5)]  # unequal counts per micro-batch
    lr, kl_weight, tau = 0.5, 0.7, 0.5
    teacher_model = perturbed_copy(tiny_model("llama"), scale=0.2)
    oracle = tiny_model("llama")
    _full_batch_objective(oracle, teacher_model, _labels_are_inputs(rows), kl_weight, tau).backward()
    expected = {n: p.detach() - lr * p.grad for n, p in oracle.named_parameters()}

    student = tiny_model("llama")
    loss = SDFTLoss(kl_weight=kl_weight, temperature=tau)
    model = student if wrap == "plain" else SDFTModel(student, FrozenCopy(teacher_model), loss)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=lr, optim="sgd", lr_scheduler_type="constant",
                             max_grad_norm=0.0, weight_decay=0.0, report_to=[], use_cpu=True, seed=0,
                             save_strategy="no", remove_unused_columns=False)
    ds = Dataset.from_list(rows)
    trainer = SDFTTrainer(model=model, args=args, train_dataset=ds, data_collator=_labels_are_inputs,
                          teacher=FrozenCopy(teacher_model) if wrap == "plain" else None,
                          loss=loss if wrap == "plain" else None)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(ds)
    trainer.train()
    for name, param in student.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name].float(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{wrap} {name}: {m}")


def _bf16_args(tmp_path, **extra) -> TrainingArguments:
    """bf16 mixed precision (autocast) on CPU, or on the GPU if there is one."""
    settings = dict(output_dir=str(tmp_path), bf16=True, use_cpu=not torch.cuda.is_available(),
                    per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, learning_rate=0.1,
                    optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
                    report_to=[], seed=0, save_strategy="no", remove_unused_columns=False)
    return TrainingArguments(**{**settings, **extra})


@pytest.mark.parametrize("wrap", ["plain", "SDFTModel"])
def test_bf16_reaches_the_decoder_as_in_the_trainer(tmp_path, wrap):
    """TrainingArguments(bf16=True): HF's Trainer runs the model's own forward under accelerate's
    autocast; SDFTTrainer, which runs the decoder itself, must run it under the same autocast:
    its linear layers return bfloat16, its states on the first micro-batch are the Trainer's,
    and each step's logged loss is the Trainer's to bfloat16 resolution."""
    rows = [{"input_ids": list(range(3, 3 + n))} for n in (4, 7, 9, 5, 6, 8, 5, 7)]
    runs = {}
    for name in ("Trainer", "SDFTTrainer"):
        student = tiny_model("llama")
        activity = DecoderActivity(student)
        if name == "Trainer":
            trainer = Trainer(model=student, args=_bf16_args(tmp_path / name), train_dataset=Dataset.from_list(rows),
                              data_collator=_collate)
        else:
            model = student if wrap == "plain" else SDFTModel(student, check_head=False)
            trainer = SDFTTrainer(model=model, args=_bf16_args(tmp_path / name), data_collator=_collate,
                                  train_dataset=Dataset.from_list(rows), check_head=False)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
        trainer.train()
        runs[name] = activity, [h["loss"] for h in trainer.state.log_history if "loss" in h]
    (theirs, their_losses), (ours, our_losses) = runs["Trainer"], runs["SDFTTrainer"]
    assert theirs.dtypes[True] == ours.dtypes[True] == {torch.bfloat16}
    first = theirs.states[True][0]
    torch.testing.assert_close(ours.states[True][0], first, rtol=1e-6, atol=1e-6 * float(first.abs().max()))
    assert len(our_losses) == len(their_losses) == 2
    for our_loss, their_loss in zip(our_losses, their_losses):
        assert our_loss == pytest.approx(their_loss, rel=2.0**-8)


def test_moe_auxiliary_term_is_logged_under_bf16(tmp_path):
    """An MoE student's load-balancing term (aux) is logged from an SDFTModel as from the plain
    student, under bf16 too, where accelerate rebuilds the model's returned tuple: aux, aux_loss
    and the loss's metrics are fields of the output, which that rebuild keeps."""
    from transformers import AutoModelForCausalLM

    from tests.sdft.tiny_models import VOCAB, tiny_config

    rows = [{"input_ids": list(range(3, 3 + n))} for n in (4, 7, 9, 5)]
    logged = {}
    for wrap in ("plain", "SDFTModel"):
        torch.manual_seed(0)
        student = AutoModelForCausalLM.from_config(tiny_config("mixtral", vocab_size=VOCAB, output_router_logits=True,
                                                               router_aux_loss_coef=0.5))
        loss = SDFTLoss(metrics=True)
        trainer = SDFTTrainer(model=student if wrap == "plain" else SDFTModel(student, loss=loss),
                              args=_bf16_args(tmp_path / wrap), train_dataset=Dataset.from_list(rows),
                              data_collator=_collate, loss=loss if wrap == "plain" else None)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
        trainer.train()
        logged[wrap] = [entry["aux"] for entry in trainer.state.log_history if "loss" in entry]
        if wrap == "SDFTModel":
            # The prepared model's forward is accelerate's: autocast, then the outputs rebuilt in float32.
            assert getattr(trainer.model, "_original_forward", None) is not None
            batch = {k: v.to(trainer.args.device) for k, v in _collate(rows[:2]).items()}
            with torch.no_grad():
                _, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
            assert out.aux is not None and out.aux_loss is not None
            assert out.entropy.shape == out.top1.shape == (int(batch["input_ids"][:, 1:].numel()),)
    assert len(logged["plain"]) == 2 and min(logged["plain"]) > 0
    assert logged["SDFTModel"] == pytest.approx(logged["plain"], rel=1e-6)


def test_count_loss_targets_counts_what_the_loss_counts():
    batch = _labels_are_inputs([{"input_ids": [5, 6, 7]}, {"input_ids": [5, 6, 7, 8, 9]}])
    batch["labels"][1, 2] = -100
    assert int(count_loss_targets(batch)) == 2 + 3  # shifted, padding and -100 left out
    out = causal_lm_loss(tiny_model("llama"), batch)
    assert int(out.n_tokens) == 5
    batch["labels"][1, 3] = 7  # ignore_index of another loss
    assert int(count_loss_targets(batch, ignore_index=7)) == 4


def test_plain_model_under_ddp_runs_its_forward_through_the_wrapper(tmp_path, monkeypatch):
    """A plain model under DDP (one gloo process here; two in test_trl): the loss runs inside
    the wrapper's forward, which DDP needs to synchronise the gradients, and gives the loss and
    gradients of the model alone (FSDP and DeepSpeed: test_sharding)."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = tiny_model("llama")
        teacher = FrozenCopy(perturbed_copy(model))
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
        trainer = SDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"input_ids": [3, 4, 5]}]),
                              data_collator=_collate, teacher=teacher)
        batch = _collate([{"input_ids": [3, 4, 5, 6, 7]}, {"input_ids": [8, 9, 10]}])
        expected = causal_lm_loss(model, batch, teacher, trainer.loss)
        expected.loss.backward()
        expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()

        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        forwards = []
        wrapped.register_forward_hook(lambda *_: forwards.append(1))
        loss = trainer.compute_loss(wrapped.train(), batch)
        loss.backward()
        assert forwards == [1]
        torch.testing.assert_close(loss, expected.loss, rtol=1e-6, atol=0)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-5, atol=1e-7)

        # bf16=True: the autocast reaches the student's and the teacher's decoders through the
        # wrapper as well (the Trainer's autocast is not on this wrapper's module).
        bf16 = SDFTTrainer(model=model, args=_bf16_args(tmp_path / "bf16"), data_collator=_collate,
                           train_dataset=Dataset.from_list([{"input_ids": [3, 4, 5]}]), teacher=teacher)
        student_activity, teacher_activity = DecoderActivity(model), DecoderActivity(teacher.model)
        bf16.compute_loss(wrapped, batch).backward()
        assert student_activity.dtypes[True] == teacher_activity.dtypes[False] == {torch.bfloat16}
    finally:
        dist.destroy_process_group()


def test_build_trainers_optimizer_from_the_wrapped_model_decays_by_the_students_names(tmp_path):
    """build_trainer's AdamW is built from the model as the Trainer holds it when it creates its
    optimizer, here under FSDP1 (its parameter names carry the wrapper's prefixes), and weight
    decay goes to the student's matrices by their names: with more than one process FSDP1's
    parameters are flat 1-D shards, whose shapes no longer tell."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from sdft.trainer import build_trainer

    student = tiny_model("llama")
    expected = {name for name, p in student.named_parameters() if p.dim() >= 2}
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                             weight_decay=0.1)
    trainer = build_trainer(student, args, Dataset.from_list([{"input_ids": [3, 4, 5]}]), _collate)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(trainer.model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                           device_id=torch.device("cpu"), use_orig_params=True)
        names = {id(p): n.replace("_fsdp_wrapped_module.", "").removeprefix("student.")
                 for n, p in wrapped.named_parameters()}
        assert any("_fsdp_wrapped_module" in n for n, _ in wrapped.named_parameters())
        optimizer = trainer.create_optimizer(wrapped)
        decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
        undecayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
        assert decayed == expected and undecayed == set(names.values()) - expected
    finally:
        dist.destroy_process_group()


def test_sdft_loss_is_the_former_name_of_loss(tmp_path):
    """``loss=`` as on build_trainer, SDFTModel and causal_lm_loss; ``sdft_loss=`` still works
    for one release, with a FutureWarning naming the new keyword."""
    import warnings

    loss = SDFTLoss(kl_weight=0.5)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.warns(FutureWarning, match=r"SDFTTrainer\(sdft_loss=\.\.\.\) is renamed SDFTTrainer\(loss=\.\.\.\)"):
        trainer = SDFTTrainer(model=tiny_model("llama"), args=args, sdft_loss=loss)
    assert trainer.loss is loss
    with pytest.warns(FutureWarning, match=r"SDFTTrainer.sdft_loss is renamed SDFTTrainer.loss"):
        assert trainer.sdft_loss is loss
    with pytest.raises(TypeError, match="both loss= and sdft_loss="):
        SDFTTrainer(model=tiny_model("llama"), args=args, loss=loss, sdft_loss=loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert SDFTTrainer(model=tiny_model("llama"), args=args, loss=loss).loss is loss
    assert not [w for w in caught if "sdft_loss" in str(w.message)]


@pytest.mark.parametrize("wrap", ["plain", "SDFTModel"])
def test_evaluation_reports_the_objective_and_gives_compute_metrics_the_students_logits(tmp_path, wrap):
    """evaluate() reports eval_loss, the row-weighted mean over the evaluation batches of each
    batch's objective computed independently from the models' own logits; compute_metrics gets
    the student's logits and the labels."""
    rows = [{"input_ids": list(range(3, 3 + n))} for n in (4, 7, 9, 5, 6)]  # batches of 2, 2, 1
    kl_weight, tau = 0.7, 0.5
    teacher_model = perturbed_copy(tiny_model("llama"), scale=0.2)
    student = tiny_model("llama")
    batches = [_labels_are_inputs(rows[i:i + 2]) for i in range(0, len(rows), 2)]
    with torch.no_grad():
        objectives = [_full_batch_objective(student, teacher_model, b, kl_weight, tau) for b in batches]
    expected = sum(len(b["input_ids"]) * float(o) for b, o in zip(batches, objectives)) / len(rows)

    seen = []

    def compute_metrics(prediction):
        seen.append(prediction)
        return {"n": len(prediction.predictions)}

    loss = SDFTLoss(kl_weight=kl_weight, temperature=tau)
    model = student if wrap == "plain" else SDFTModel(student, FrozenCopy(teacher_model), loss)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True,
                             remove_unused_columns=False)
    trainer = SDFTTrainer(model=model, args=args, eval_dataset=Dataset.from_list(rows),
                          data_collator=_labels_are_inputs, compute_metrics=compute_metrics,
                          teacher=FrozenCopy(teacher_model) if wrap == "plain" else None,
                          loss=loss if wrap == "plain" else None)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    (prediction,) = seen
    # Padded to the longest row across batches by the Trainer (labels with -100, logits with it too).
    assert prediction.predictions.shape[:2] == prediction.label_ids.shape == (5, 9)
    with torch.no_grad():
        logits = student(**{k: v for k, v in batches[1].items() if k != "labels"}).logits
    torch.testing.assert_close(torch.from_numpy(prediction.predictions[2:4]), logits, rtol=1e-5, atol=1e-5)
    assert (prediction.label_ids[:2, :7] == batches[0]["labels"].numpy()).all()
