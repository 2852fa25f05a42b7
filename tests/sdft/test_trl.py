"""SDFTSFTTrainer: TRL's SFTTrainer with the SDFT loss.

Checked against code we did not write: SFTTrainer's own loss and gradients (kl_weight 0), and a
materialised plain-torch objective computed from the models' own logits over the very
micro-batches the trainer saw (with a teacher).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

trl = pytest.importorskip("trl")
import datasets  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from sdft import SDFTLoss  # noqa: E402
from sdft.teacher import AdapterDisabled, FrozenCopy  # noqa: E402
from sdft.trl import SDFTSFTTrainer  # noqa: E402
from tests.sdft import trl_fixtures as fx  # noqa: E402
from tests.sdft.decoder_activity import HALF, DecoderActivity, WatchDecoder  # noqa: E402
from tests.sdft.train_fixtures import free_port  # noqa: E402

datasets.disable_progress_bars()


class GradientRecorder(TrainerCallback):
    """The summed gradients of every optimizer step, before the optimizer moves the weights."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


class InitialAdapters(TrainerCallback):
    """A PEFT student's adapter weights as training starts (random: init_lora_weights=False)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def recording(trainer_class):
    """``trainer_class`` that keeps each micro-batch's inputs and loss (as computed for backward)."""

    class Recording(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                self.recorded.append(({k: (v.clone() if torch.is_tensor(v) else v) for k, v in inputs.items()},
                                      num_items_in_batch, (loss[0] if return_outputs else loss).detach().clone()))
            return loss

    Recording.recorded = None
    return Recording


def sgd_config(tmp_path, steps: int = 3, accumulation: int = 2, **extra) -> "trl.SFTConfig":
    """Plain SGD, constant rate, no clipping: the update is exactly -lr * gradient. float32
    (SFTConfig turns bf16 autocast on by default, on CPU too)."""
    settings = dict(output_dir=str(tmp_path), bf16=False, per_device_train_batch_size=3,
                    gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=0.1, optim="sgd",
                    lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, warmup_steps=0, logging_steps=1,
                    report_to=[], use_cpu=True, seed=0, save_strategy="no")
    return trl.SFTConfig(**{**settings, **extra})


def _train(trainer_class, tmp_path, dataset, config_extra, model=None, callbacks=(), **kwargs):
    tok = fx.tokenizer()
    trainer_class = recording(trainer_class)
    trainer = trainer_class(model=fx.model(len(tok)) if model is None else model,
                            args=sgd_config(tmp_path, **config_extra), train_dataset=dataset, processing_class=tok,
                            **kwargs)
    trainer.recorded = []
    grads = GradientRecorder()
    for callback in (grads, *callbacks):
        trainer.add_callback(callback)
    trainer.train()
    return trainer, grads.steps


CASES = {  # dataset, SFTConfig settings
    "prompt-completion": (fx.prompt_completion, {}),  # completion_only_loss: the prompt is -100
    "prompt-completion, packed": (fx.prompt_completion, {"packing": True, "max_length": 24}),  # BFD: padding-free
    "prompt-completion, padding-free": (fx.prompt_completion, {"padding_free": True, "max_length": None}),
    "conversational, assistant only": (fx.conversational, {"assistant_only_loss": True}),
    "language modelling": (fx.language_modelling, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_without_the_divergence_it_is_sfttrainer(tmp_path, case):
    """kl_weight=0 (a teacher present all the same): each micro-batch's loss and each step's
    gradients are SFTTrainer's own, over three accumulated steps."""
    _equals_sfttrainer(tmp_path, case, *CASES[case])


@pytest.mark.parametrize("case", ["prompt-completion", "prompt-completion, packed"])
def test_dynamic_fine_tuning_is_sfttrainers(tmp_path, case):
    """SFTConfig(loss_type="dft"): each token's cross-entropy weighted by its detached
    probability, SFTTrainer's own losses and gradients (this was refused)."""
    make, extra = CASES[case]
    _equals_sfttrainer(tmp_path, case, make, {**extra, "loss_type": "dft"})


@pytest.mark.parametrize("case", ["prompt-completion", "conversational, assistant only"])
def test_logs_sfttrainers_entropy_and_token_accuracy(tmp_path, case):
    """entropy and mean_token_accuracy, train and eval, equal the values SFTTrainer logs for the
    same steps (kl_weight=0: the same weights at every step)."""
    make, extra = CASES[case]
    extra = {**extra, "eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 4}
    theirs, _ = _train(trl.SFTTrainer, tmp_path / "sft", make(), extra, eval_dataset=make(7, start=20))
    ours, _ = _train(SDFTSFTTrainer, tmp_path / "sdft", make(), extra, eval_dataset=make(7, start=20),
                     teacher=FrozenCopy, loss=SDFTLoss(kl_weight=0.0))
    names = ("entropy", "mean_token_accuracy", "eval_entropy", "eval_mean_token_accuracy")
    seen = dict.fromkeys(names, 0)
    assert len(ours.state.log_history) == len(theirs.state.log_history)
    for mine, reference in zip(ours.state.log_history, theirs.state.log_history):
        for name in names:
            if name in reference:
                assert mine[name] == pytest.approx(reference[name], rel=1e-5, abs=1e-6), (name, mine, reference)
                seen[name] += 1
    assert all(count >= 3 for count in seen.values()), seen
    accuracies = [entry["mean_token_accuracy"] for entry in ours.state.log_history if "mean_token_accuracy" in entry]
    assert any(0 < a < 1 for a in accuracies), accuracies


def test_metric_for_best_model_eval_mean_token_accuracy(tmp_path):
    tok = fx.tokenizer()
    args = sgd_config(tmp_path, steps=2, accumulation=1, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                      save_steps=1, metric_for_best_model="eval_mean_token_accuracy", load_best_model_at_end=True)
    trainer = SDFTSFTTrainer(model=fx.model(len(tok)), args=args, train_dataset=fx.prompt_completion(),
                             eval_dataset=fx.prompt_completion(5, start=20), processing_class=tok)
    trainer.train()
    evaluated = [entry["eval_mean_token_accuracy"] for entry in trainer.state.log_history
                 if "eval_mean_token_accuracy" in entry]
    assert len(evaluated) == 2 and trainer.state.best_metric == max(evaluated)


def _equals_sfttrainer(tmp_path, case, make, extra):
    # float64 models: in float32 the two runs' weights part in their last bits after the first
    # step, and the next gradients then differ by an amount that depends on the CPU's kernels
    # (a deep k_proj's by 7e-6 of itself on one CPU). The model's own loss still rounds its
    # logits to float32 (transformers upcasts them with .float()), so the loss and gradients
    # agree to float32 resolution, with weights that stay together to float64's.
    vocab = len(fx.tokenizer())
    theirs, their_grads = _train(trl.SFTTrainer, tmp_path / "sft", make(), extra,
                                 model=fx.model(vocab, dtype=torch.float64))
    ours, our_grads = _train(SDFTSFTTrainer, tmp_path / "sdft", make(), extra, teacher=FrozenCopy,
                             loss=SDFTLoss(kl_weight=0.0), model=fx.model(vocab, dtype=torch.float64))

    assert len(ours.recorded) == len(theirs.recorded) == 6
    for (their_inputs, their_count, their_loss), (our_inputs, our_count, our_loss) in zip(theirs.recorded,
                                                                                         ours.recorded):
        assert torch.equal(our_inputs["input_ids"], their_inputs["input_ids"])
        assert ("position_ids" in our_inputs) == ("packed" in case or "padding-free" in case)
        assert int(our_count) == int(their_count)  # the same normaliser of the accumulated batch
        torch.testing.assert_close(our_loss.float(), their_loss.float(), rtol=2e-6, atol=0)
    assert len(our_grads) == len(their_grads) == 3
    for step, (mine, reference) in enumerate(zip(our_grads, their_grads)):
        assert mine.keys() == reference.keys()
        # float32's resolution is 6e-8; the oracle's float32 softmax leaves up to 7e-7 of the
        # whole gradient's norm and 1.6e-6 of a tensor's (measured over these cases): the bounds
        # keep a factor of 5 over that.
        total = sum(float((mine[n] - g).norm()) ** 2 for n, g in reference.items()) ** 0.5
        norm = sum(float(g.norm()) ** 2 for g in reference.values()) ** 0.5
        assert total <= 4e-6 * norm, f"step {step}: gradients differ by {total / norm:.2e} of their norm"
        for name, grad in reference.items():
            error = float((mine[name] - grad).norm() / grad.norm())
            assert error <= 1e-5, f"step {step} {name}: {error:.2e} of its norm"


def mixed_precision(precision: str) -> dict:
    """SFTConfig / TrainingArguments settings for ``precision`` ("bf16" or "fp16") here: on the
    GPU if there is one; fp16 is skipped on CPU, where accelerate applies no fp16 autocast."""
    on_gpu = torch.cuda.is_available()
    if precision == "fp16" and not on_gpu:
        pytest.skip("accelerate applies no fp16 autocast on CPU (fp16=True trains in float32 there): "
                    "nothing for the decoder to follow")
    return {precision: True, "use_cpu": not on_gpu}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_reaches_the_decoder_as_in_sfttrainer(tmp_path, precision):
    """bf16=True / fp16=True: SFTTrainer's autocast wraps the model's forward, which the fused
    path does not call; the student's decoder must run under it all the same. kl_weight=0: its
    linear layers return the half dtype, its states on the first micro-batch are SFTTrainer's,
    and each micro-batch's loss is SFTTrainer's to the half dtype's resolution."""
    extra = dict(mixed_precision(precision), steps=2)
    watch = {name: WatchDecoder() for name in ("sft", "sdft")}
    theirs, _ = _train(trl.SFTTrainer, tmp_path / "sft", fx.prompt_completion(), extra, callbacks=[watch["sft"]])
    ours, _ = _train(SDFTSFTTrainer, tmp_path / "sdft", fx.prompt_completion(), extra, callbacks=[watch["sdft"]],
                     teacher=FrozenCopy, loss=SDFTLoss(kl_weight=0.0))
    their_run, our_run = watch["sft"].activity, watch["sdft"].activity
    assert their_run.dtypes[True] == {HALF[precision]}  # what the oracle runs in
    assert our_run.dtypes[True] == {HALF[precision]}
    first = their_run.states[True][0]
    torch.testing.assert_close(our_run.states[True][0], first, rtol=1e-6, atol=1e-6 * float(first.abs().max()))
    assert len(ours.recorded) == len(theirs.recorded) == 4
    resolution = {"bf16": 2.0**-8, "fp16": 2.0**-11}[precision]
    for (_, _, our_loss), (_, _, their_loss) in zip(ours.recorded, theirs.recorded):
        torch.testing.assert_close(our_loss.float(), their_loss.float(), rtol=resolution, atol=0)


@pytest.mark.parametrize("teacher", ["FrozenCopy", "AdapterDisabled"])
def test_the_teachers_decoder_runs_under_the_trainers_autocast(tmp_path, teacher):
    """The teacher's forward (no gradients) runs in bf16 under bf16=True as the student's does:
    a frozen copy, and the base model inside a LoRA student with its adapters off."""
    peft = pytest.importorskip("peft")
    tok = fx.tokenizer()
    extra = {}
    if teacher == "AdapterDisabled":
        extra["peft_config"] = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False)
    trainer = SDFTSFTTrainer(model=fx.model(len(tok)), args=sgd_config(tmp_path, steps=1, **mixed_precision("bf16")),
                             train_dataset=fx.prompt_completion(), processing_class=tok,
                             teacher={"FrozenCopy": FrozenCopy, "AdapterDisabled": AdapterDisabled}[teacher],
                             loss=SDFTLoss(kl_weight=0.5), check_head=False, **extra)
    watched = trainer.teacher.model if teacher == "FrozenCopy" else trainer.teacher.peft_model
    activity = DecoderActivity(watched)
    trainer.train()
    assert len(activity.states[False]) == 2  # one teacher forward per micro-batch
    assert activity.dtypes[False] == {torch.bfloat16}


def test_moe_auxiliary_loss_is_sfttrainers(tmp_path):
    """An MoE student (Qwen3-MoE): SFTTrainer adds router_aux_loss_coef (its own argument here,
    not the model's coefficient) times the load-balancing loss, averaged over the accumulated
    micro-batches, and logs the unweighted loss as aux_loss, also in the final log entry when
    steps are left unlogged. kl_weight=0: the same losses, gradients and log entries."""
    from transformers import AutoModelForCausalLM

    from tests.sdft.tiny_models import tiny_config

    tok = fx.tokenizer()

    def moe():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_config("qwen3_moe", vocab_size=len(tok),
                                                            router_aux_loss_coef=0.3))

    extra = dict(steps=3, logging_steps=2, router_aux_loss_coef=0.5)
    theirs, their_grads = _train(trl.SFTTrainer, tmp_path / "sft", fx.prompt_completion(), extra, model=moe())
    ours, our_grads = _train(SDFTSFTTrainer, tmp_path / "sdft", fx.prompt_completion(), extra, model=moe(),
                             teacher=FrozenCopy, loss=SDFTLoss(kl_weight=0.0))
    assert theirs.aux_loss_enabled and ours.aux_loss_enabled
    for (_, _, our_loss), (_, _, their_loss) in zip(ours.recorded, theirs.recorded, strict=True):
        torch.testing.assert_close(our_loss, their_loss, rtol=1e-6, atol=0)
    for mine, reference in zip(our_grads, their_grads, strict=True):
        total = sum(float((mine[n] - g).norm()) ** 2 for n, g in reference.items()) ** 0.5
        assert total <= 1e-5 * sum(float(g.norm()) ** 2 for g in reference.values()) ** 0.5
    their_logs, our_logs = theirs.state.log_history, ours.state.log_history
    assert len(our_logs) == len(their_logs) == 2 and all("aux_loss" in entry for entry in their_logs)  # step 2, final
    for our_entry, their_entry in zip(our_logs, their_logs):
        assert our_entry["aux_loss"] == pytest.approx(their_entry["aux_loss"], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# With a teacher: one step against the materialised objective
# ----------------------------------------------------------------------------------------------

def materialised_step(student, teacher_model, micro_batches, kl_weight, tau, lr, trainable=None):
    """One SGD step of the SDFT objective over the whole accumulated batch, from the models' own
    logits in float64: CE + kl_weight * tau^2 * KL(teacher || student) on the positions whose
    shifted label is not -100, summed over every micro-batch and divided by their count."""
    student, teacher_model = student.double(), teacher_model.double()
    total, count = 0.0, 0
    for inputs in micro_batches:
        # use_cache=False as SFTTrainer passes it: with a cache transformers ignores the position_ids'
        # document boundaries and a packed row's documents would attend to each other.
        model_inputs = {**{k: v for k, v in inputs.items() if k != "labels"}, "use_cache": False}
        z_s = student(**model_inputs).logits[:, :-1]
        with torch.no_grad():
            z_t = teacher_model(**model_inputs).logits[:, :-1]
        targets = inputs["labels"][:, 1:]
        counted = targets != -100
        ce = F.cross_entropy(z_s.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        kl = (F.softmax(z_t / tau, -1) * (F.log_softmax(z_t / tau, -1) - F.log_softmax(z_s / tau, -1))).sum(-1)
        total = total + ce + kl_weight * tau**2 * (kl * counted).sum()
        count += int(counted.sum())
    (total / count).backward()
    return {n: (p.detach() - lr * p.grad) for n, p in student.named_parameters()
            if trainable is None or n in trainable}


@pytest.mark.parametrize("case", ["prompt-completion", "prompt-completion, packed"])
def test_one_step_with_a_teacher_equals_the_materialised_objective(tmp_path, case):
    make, extra = CASES[case]
    tok = fx.tokenizer()
    start = fx.model(len(tok), dtype=torch.float64)
    teacher_model = fx.model(len(tok), seed=1, dtype=torch.float64)  # another model: a large divergence
    kl_weight, tau = 0.7, 0.5
    trainer, _ = _train(SDFTSFTTrainer, tmp_path, make(), dict(extra, steps=1), model=copy.deepcopy(start),
                        teacher=FrozenCopy(teacher_model), loss=SDFTLoss(kl_weight=kl_weight, temperature=tau))
    micro_batches = [inputs for inputs, _, _ in trainer.recorded]
    assert len(micro_batches) == 2
    expected = materialised_step(start, teacher_model, micro_batches, kl_weight, tau, lr=0.1)
    assert trainer.state.log_history[0]["kl"] > 0.1
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_two_processes_under_ddp_equal_the_materialised_objective(tmp_path):
    """torchrun, two processes (DDP over gloo), two rows each: one step equals the materialised
    objective over the four rows both processes trained on, normalised by their total count."""
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "tests.sdft.ddp_sft_run", str(tmp_path)]
    res = subprocess.run(cmd, cwd=repo, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    from tests.sdft.ddp_sft_run import KL_WEIGHT, LR, TAU

    batches = [torch.load(tmp_path / f"batches-{rank}.pt") for rank in (0, 1)]
    assert [len(b) for b in batches] == [1, 1] and all(len(b[0]["input_ids"]) == 2 for b in batches)
    rows = {tuple(row.tolist()) for b in batches for row in b[0]["input_ids"]}
    assert len(rows) == 4  # the two processes trained on different rows
    tok = fx.tokenizer()
    expected = materialised_step(fx.model(len(tok), dtype=torch.float64),
                                 fx.model(len(tok), seed=1, dtype=torch.float64),
                                 [b[0] for b in batches], KL_WEIGHT, TAU, lr=LR)
    trained = torch.load(tmp_path / "weights.pt")
    assert trained.keys() == expected.keys()
    for name, param in trained.items():
        torch.testing.assert_close(param, expected[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # SFTTrainer's entropy and token accuracy are over the labelled positions of both
    # processes' rows: from the starting student's own logits.
    start = fx.model(len(tok), dtype=torch.float64)
    entropy = correct = count = 0
    with torch.no_grad():
        for b in batches:
            z = start(input_ids=b[0]["input_ids"], attention_mask=b[0]["attention_mask"]).logits[:, :-1]
            targets = b[0]["labels"][:, 1:]
            counted = targets != -100
            logp = torch.log_softmax(z, -1)
            entropy += float(-(logp.exp() * logp).sum(-1)[counted].sum())
            correct += int((z.argmax(-1) == targets)[counted].sum())
            count += int(counted.sum())
    (logged,) = [h for h in torch.load(tmp_path / "log_history.pt") if "entropy" in h]
    assert logged["entropy"] == pytest.approx(entropy / count, rel=1e-6)
    assert logged["mean_token_accuracy"] == pytest.approx(correct / count, rel=1e-6)


def test_lora_student_with_the_adapters_off_teacher(tmp_path):
    """peft_config + teacher=AdapterDisabled: the teacher is the base model inside the student
    (no second copy of any weight), and one step equals the materialised objective against an
    untouched copy of the base."""
    peft = pytest.importorskip("peft")
    tok = fx.tokenizer()
    base = fx.model(len(tok), dtype=torch.float64)
    untouched = copy.deepcopy(base)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    initial = InitialAdapters()
    trainer, _ = _train(SDFTSFTTrainer, tmp_path, fx.prompt_completion(), dict(steps=1), model=base,
                        callbacks=[initial], peft_config=lora, teacher=AdapterDisabled,
                        loss=SDFTLoss(kl_weight=0.7, temperature=0.5))

    teacher = trainer.teacher
    assert isinstance(teacher, AdapterDisabled) and teacher.peft_model is trainer.model
    student_storage = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    teacher_storage = {p.untyped_storage().data_ptr() for p in teacher.peft_model.get_base_model().parameters()}
    assert teacher_storage <= student_storage  # the teacher's weights are the student's own tensors
    assert sum(p.numel() for p in trainer.model.parameters()) == (
        sum(p.numel() for p in untouched.parameters()) + sum(p.numel() for n, p in trainer.model.named_parameters()
                                                             if "lora_" in n))
    assert trainer.state.log_history[0]["kl"] > 0  # the adapters (non-zero init) move the student

    # The oracle: the same LoRA student from the same start, against the untouched base.
    oracle = peft.get_peft_model(copy.deepcopy(untouched), lora)
    oracle.load_state_dict(initial.weights, strict=False)
    lora_names = {n for n, p in oracle.named_parameters() if p.requires_grad}
    expected = materialised_step(oracle, untouched, [i for i, _, _ in trainer.recorded], 0.7, 0.5, lr=0.1,
                                 trainable=lora_names)
    params = dict(trainer.model.named_parameters())
    for name in lora_names:
        torch.testing.assert_close(params[name].detach(), expected[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")


def test_prefix_tuning_is_sfttrainers_and_prompt_tuning_is_refused(tmp_path):
    """peft_config=PrefixTuningConfig: the prefix reaches the decoder as in SFTTrainer (kl_weight=0,
    the base model as teacher): the same losses and prompt-encoder gradients. Prompt tuning and
    P-tuning, which prepend virtual tokens to the sequence, are refused when the trainer is built."""
    peft = pytest.importorskip("peft")
    from sdft.architectures import UnsupportedModel

    prefix = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    # Without gradient checkpointing: SFTTrainer's own forward fails with a prefix under it.
    extra = {"steps": 2, "gradient_checkpointing": False}
    vocab = len(fx.tokenizer())  # float64 models, as in _equals_sfttrainer
    theirs, their_grads = _train(trl.SFTTrainer, tmp_path / "sft", fx.prompt_completion(), extra,
                                 peft_config=copy.deepcopy(prefix), model=fx.model(vocab, dtype=torch.float64))
    ours, our_grads = _train(SDFTSFTTrainer, tmp_path / "sdft", fx.prompt_completion(), extra,
                             peft_config=copy.deepcopy(prefix), teacher=AdapterDisabled,
                             loss=SDFTLoss(kl_weight=0.0), model=fx.model(vocab, dtype=torch.float64))
    for (_, _, our_loss), (_, _, their_loss) in zip(ours.recorded, theirs.recorded, strict=True):
        torch.testing.assert_close(our_loss.float(), their_loss.float(), rtol=2e-6, atol=0)
    for mine, reference in zip(our_grads, their_grads, strict=True):
        assert mine.keys() == reference.keys() and all("prompt_encoder" in name for name in reference)
        for name, grad in reference.items():
            assert float(grad.norm()) > 0
            assert float((mine[name] - grad).norm() / grad.norm()) <= 1e-5, name

    tok = fx.tokenizer()
    for config in (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                   peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16)):
        with pytest.raises(UnsupportedModel, match=f"PEFT adapter {config.peft_type.value}"):
            SDFTSFTTrainer(model=fx.model(len(tok)), args=sgd_config(tmp_path / "refused"),
                           train_dataset=fx.prompt_completion(), processing_class=tok, peft_config=config)


# ----------------------------------------------------------------------------------------------
# The paper's recipe, evaluation, refusals
# ----------------------------------------------------------------------------------------------

def test_the_papers_two_stage_recipe(tmp_path):
    """Stage 1: CE on the known rows; snapshot; stage 2: SDFT on all rows against it."""
    tok = fx.tokenizer()
    known, everything = fx.prompt_completion(9), datasets.concatenate_datasets(
        [fx.prompt_completion(9), fx.prompt_completion(9, start=9)])
    stage1 = SDFTSFTTrainer(model=fx.model(len(tok)), args=sgd_config(tmp_path / "1", steps=4), train_dataset=known,
                            processing_class=tok)
    stage1.train()
    assert all(h["kl"] == 0 for h in stage1.state.log_history if "kl" in h)  # no teacher: cross-entropy only
    after_stage1 = {n: p.detach().clone() for n, p in stage1.model.named_parameters()}

    stage2 = SDFTSFTTrainer(model=stage1.model, args=sgd_config(tmp_path / "2", steps=4), train_dataset=everything,
                            processing_class=tok, teacher=FrozenCopy, loss=SDFTLoss(kl_weight=1.0))
    snapshot = stage2.teacher.model
    assert snapshot is not stage2.model
    for name, param in snapshot.named_parameters():
        assert torch.equal(param, after_stage1[name]), name
    stage2.train()
    kls = [h["kl"] for h in stage2.state.log_history if "kl" in h]
    assert kls[0] < 1e-6 < max(kls)  # the student starts as its teacher and moves away
    for name, param in snapshot.named_parameters():  # the teacher stays the stage-1 model
        assert torch.equal(param, after_stage1[name]), name


def test_the_recipe_with_lora(tmp_path):
    """Stage 1 trains adapters on the known rows; merged, they are the stage-2 teacher with the
    new adapters off: the stage-1 model, held once."""
    peft = pytest.importorskip("peft")
    tok = fx.tokenizer()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    stage1 = SDFTSFTTrainer(model=fx.model(len(tok)), args=sgd_config(tmp_path / "1", steps=3),
                            train_dataset=fx.prompt_completion(9), processing_class=tok, peft_config=lora)
    stage1.train()
    merged = stage1.model.merge_and_unload()
    after_stage1 = {n: p.detach().clone() for n, p in merged.named_parameters()}
    stage2 = SDFTSFTTrainer(model=merged, args=sgd_config(tmp_path / "2", steps=3),
                            train_dataset=fx.prompt_completion(18), processing_class=tok, peft_config=lora,
                            teacher=AdapterDisabled, loss=SDFTLoss(kl_weight=1.0))
    stage2.train()
    kls = [h["kl"] for h in stage2.state.log_history if "kl" in h]
    assert kls[0] < 1e-6 < max(kls)  # new adapters start at zero: the student starts as its teacher
    base = stage2.teacher.peft_model.get_base_model()
    for name, param in base.named_parameters():
        if "lora_" not in name:  # the teacher's weights are the merged stage-1 model's, untrained
            assert torch.equal(param, after_stage1[name.replace(".base_layer", "")]), name


def test_evaluation_reports_the_sdft_loss(tmp_path):
    tok = fx.tokenizer()
    model = fx.model(len(tok))
    teacher = FrozenCopy(fx.model(len(tok), seed=1))
    eval_rows = fx.prompt_completion(5, start=3)
    args = sgd_config(tmp_path, per_device_eval_batch_size=8)
    trainer = SDFTSFTTrainer(model=model, args=args, train_dataset=fx.prompt_completion(), eval_dataset=eval_rows,
                             processing_class=tok, teacher=teacher, loss=SDFTLoss(kl_weight=0.5))
    metrics = trainer.evaluate()
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    from sdft import causal_lm_loss

    with torch.no_grad():
        expected = causal_lm_loss(model, batch, teacher, SDFTLoss(kl_weight=0.5)).loss
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-6)


def test_other_sft_losses_are_refused(tmp_path):
    tok = fx.tokenizer()
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1: the SDFT loss has no label smoothing"):
        SDFTSFTTrainer(model=fx.model(len(tok)), args=sgd_config(tmp_path, label_smoothing_factor=0.1),
                       train_dataset=fx.prompt_completion(), processing_class=tok)
    with pytest.raises(ValueError, match="compute_loss_func would be ignored"):
        SDFTSFTTrainer(model=fx.model(len(tok)), args=sgd_config(tmp_path), train_dataset=fx.prompt_completion(),
                       processing_class=tok, compute_loss_func=lambda *a, **k: 0)


# ----------------------------------------------------------------------------------------------
# TRL's DistillationTrainer with a Liger-signature fused loss
# ----------------------------------------------------------------------------------------------

def _distillation_trainer(trainer_class, tmp_path, student, teacher, beta, temperature, config=None, **kwargs):
    from sdft.trl import FusedJSDDistillationTrainer  # noqa: F401 (the module under test imports TRL's)

    tok = fx.tokenizer()
    tok.padding_side = "left"  # DistillationTrainer generates from left-padded prompts
    prompts = datasets.Dataset.from_list([{"prompt": row["prompt"]} for row in fx.prompt_completion(8)])
    settings = dict(output_dir=str(tmp_path), bf16=False, per_device_train_batch_size=4, max_steps=1,
                    max_completion_length=6, beta=beta, temperature=temperature, learning_rate=0.1, optim="sgd",
                    lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True, seed=0,
                    save_strategy="no", logging_steps=1)
    args = trl.DistillationConfig(**{**settings, **(config or {})})
    return trainer_class(model=student, teacher_model=teacher, args=args, train_dataset=prompts, processing_class=tok,
                         **kwargs)


def _step_equals_trls(tmp_path, student, teacher, beta, temperature, also=None):
    """One on-policy step of FusedJSDDistillationTrainer gives the loss and gradients of TRL's
    own DistillationTrainer on the same generated batch (and of each ``also``: name -> trainer
    class and keywords). Returns our trainer."""
    from sdft.trl import FusedJSDDistillationTrainer

    start = copy.deepcopy(student)
    ours = _distillation_trainer(recording(FusedJSDDistillationTrainer), tmp_path / "ours", student, teacher, beta,
                                 temperature)
    ours.recorded = []
    grads = GradientRecorder()
    ours.add_callback(grads)
    ours.train()
    (inputs, num_items, loss), = ours.recorded
    assert int(inputs["completion_mask"].sum()) > 4 and float(loss) > 1e-3

    def their_step(trainer_class, **kwargs):
        trainer = _distillation_trainer(trainer_class, tmp_path / trainer_class.__name__, copy.deepcopy(start),
                                        teacher, beta, temperature, **kwargs)
        trainer.model.train()
        value = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=num_items)
        value.backward()
        grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
        return value.detach(), grads, trainer._metrics["train"]

    others = {"TRL's DistillationTrainer": (trl.DistillationTrainer, {}), **(also or {})}
    for name, (trainer_class, kwargs) in others.items():
        expected, expected_grads, metrics = their_step(trainer_class, **kwargs)
        if trainer_class is trl.DistillationTrainer and temperature == 1.0:
            # The student's mean entropy, from the loss's own pass (TRL's: at the temperature).
            (entropy,) = metrics["entropy"]
            assert ours.state.log_history[0]["entropy"] == pytest.approx(entropy, rel=1e-5)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0, msg=lambda m: f"{name}: {m}")
        (step,) = grads.steps
        assert step.keys() == expected_grads.keys()
        for param, grad in expected_grads.items():
            error = float((step[param] - grad).norm() / grad.norm())
            assert error <= 2e-6, f"{name}, {param}: gradients differ by {error:.2e} of their norm"
    return ours


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (0.5, 0.5), (1.0, 2.0)])
def test_distillation_trainer_step_equals_trls_own_divergence(tmp_path, beta, temperature):
    """Its default loss, and Liger's class in its place, against TRL's own step."""
    from sdft.trl import FusedJSDDistillationTrainer

    tok_size = len(fx.tokenizer())
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    liger_loss = liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                               temperature=temperature, compiled=False)
    _step_equals_trls(tmp_path, fx.model(tok_size), fx.model(tok_size, seed=1), beta, temperature,
                      also={"Liger's loss in its place": (FusedJSDDistillationTrainer, {"fused_jsd_loss": liger_loss})})


def _teacher_of_family(family: str, vocab_size: int):
    """A tiny teacher whose head applies a transform the Llama student's does not."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = {"gemma2": lambda: tf.Gemma2Config(**common, head_dim=8, final_logit_softcapping=3.0),
              "cohere": lambda: tf.CohereConfig(**common, logit_scale=0.25)}[family]()
    torch.manual_seed(1)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_distillation_from_a_teacher_of_another_family(tmp_path, family):
    """A Llama student and a teacher whose head softcaps (Gemma 2) or scales (Cohere) its
    logits: each model's transform applies to its own logits, as in TRL's DistillationTrainer
    (this was refused: one fused loss, one softcap)."""
    tok_size = len(fx.tokenizer())
    _step_equals_trls(tmp_path, fx.model(tok_size), _teacher_of_family(family, tok_size), 0.5, 0.8)


def test_distillation_trainer_runs_both_decoders_under_the_trainers_autocast(tmp_path):
    """bf16=True: the parent reaches the student's and the teacher's backbones past the forward
    that accelerate's autocast wraps; the loss pass must run both in bfloat16 all the same."""
    from sdft.trl import FusedJSDDistillationTrainer

    class Watched(FusedJSDDistillationTrainer):
        def _compute_loss(self, *args, **kwargs):  # decoder calls in the loss pass only, not in generation
            self.activity = DecoderActivity(args[0]), DecoderActivity(self.accelerator.unwrap_model(self.teacher_model))
            try:
                return super()._compute_loss(*args, **kwargs)
            finally:
                for activity in self.activity:
                    activity.remove()

    tok_size = len(fx.tokenizer())
    trainer = _distillation_trainer(Watched, tmp_path, fx.model(tok_size), fx.model(tok_size, seed=1), 0.5, 1.0,
                                    config=mixed_precision("bf16"))
    trainer.train()
    student, teacher = trainer.activity
    assert len(student.states[True]) == len(teacher.states[False]) == 1
    assert student.dtypes[True] == teacher.dtypes[False] == {torch.bfloat16}
    assert 0 < trainer.state.log_history[0]["loss"] < float("inf")


@pytest.mark.parametrize("packing", [False, True])
def test_a_hidden_state_cache_built_from_the_trainers_dataset(tmp_path, packing):
    """The cache, keyed by token content and built from the dataset as SFTTrainer prepared it
    (packed rows included), gives the live teacher's step: TRL's collators keep no example ids."""
    from sdft.teacher import HiddenStateCache

    tok = fx.tokenizer()
    teacher_model = fx.model(len(tok), seed=1)
    extra = {"packing": True, "max_length": 24} if packing else {}
    runs = {}
    for source in ("live", "cache"):
        trainer = recording(SDFTSFTTrainer)(model=fx.model(len(tok)), args=sgd_config(tmp_path / source, steps=1, **extra),
                                            train_dataset=fx.prompt_completion(), processing_class=tok,
                                            teacher=FrozenCopy(teacher_model), loss=SDFTLoss(kl_weight=0.7))
        if source == "cache":
            assert ("seq_lengths" in trainer.train_dataset.column_names) == packing
            trainer.teacher = HiddenStateCache.build(teacher_model, trainer.train_dataset, tmp_path / "cache",
                                                     id_field=None, dtype=torch.float32)
        trainer.recorded = []
        trainer.train()
        runs[source] = trainer
    assert runs["live"].state.log_history[0]["kl"] > 0.1
    for (_, _, live), (_, _, cached) in zip(runs["live"].recorded, runs["cache"].recorded, strict=True):
        torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-7)
