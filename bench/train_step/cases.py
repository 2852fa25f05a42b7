"""What the training-step benchmark measures: the models, the batch, and one step per case.

A *case* is one way to train a causal LM for one optimizer step: forward, backward, AdamW.
Every case starts from the same seeded model and batch, so their losses at the first step can
be compared, and differs only in the loss and where the teacher comes from:

=====================  ===================================================================
case                   the step
=====================  ===================================================================
``sft_hf``             plain SFT with the model's own loss (``model(..., labels=...).loss``,
                       full ``[tokens, vocab]`` logits): the baseline a user has today
``sft_ours``           SFT through ``sdft.causal_lm_loss`` without a teacher (fused CE)
``sdft_frozen``        SDFT, teacher ``FrozenCopy(model)`` (a copy in the student's dtype)
``sdft_frozen_bf16``   SDFT, teacher ``FrozenCopy(model, dtype=torch.bfloat16)``
``lora_sft_hf``        LoRA SFT with the model's own loss: the baseline of the next case
``sdft_adapter``       SDFT on the LoRA student, teacher ``AdapterDisabled`` (no extra weights)
``sdft_cached``        SDFT, teacher ``HiddenStateCache`` built once before training
``sdft_naive``         the same SDFT objective written the obvious way: student and teacher
                       logits materialised, ``F.cross_entropy`` + ``F.kl_div``
=====================  ===================================================================

The objective of the SDFT cases is the paper's, CE + lambda tau^2 KL(teacher || student) with
lambda 1 and tau 0.5 (:mod:`bench.loss.inputs`), the KL at the labelled positions; the prompt
(the first ``PROMPT_FRACTION`` of each sequence) is not labelled, as in SFT on
prompt/response data. The teacher is the model as built; the student then moves a little
away from it (``STUDENT_NOISE``), as after some fine-tuning, so that the KL is not zero.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..loss.inputs import IGNORE_FRACTION, IGNORE_INDEX, LAMBDA, TAU

PROMPT_FRACTION = IGNORE_FRACTION  # share of each sequence that is prompt (labels ignored)
STUDENT_NOISE = 0.1                # student = teacher + this x (each matrix's std) x N(0, 1)
LEARNING_RATE = 1e-5
LORA_RANK = 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Skip(Exception):
    """The case cannot run here; the message is the reason recorded."""


# ---------------------------------------------------------------- models and batches

@dataclass(frozen=True)
class StepModel:
    """A Llama-shaped causal LM, built from its config with random weights (no download)."""

    name: str
    title: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    headline: bool = False   # the model the targets are judged on
    kv_heads: Optional[int] = None  # grouped-query attention (None: one per head)
    tied: bool = False              # the LM head is the input embedding

    def config(self, max_positions: int):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden,
                           intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.kv_heads or self.heads,
                           max_position_embeddings=max_positions, tie_word_embeddings=self.tied)

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def body_params(self) -> int:
        """Parameters of the decoder layers (the GEMMs per token); embeddings excluded."""
        D, F_ = self.hidden, self.intermediate
        kv = D * (self.kv_heads or self.heads) // self.heads
        return self.layers * (2 * D * D + 2 * D * kv + 3 * D * F_)


# Both models share a 4-layer body; the second carries a Qwen2.5-sized vocabulary (151936),
# where the LM head and its logits dominate a step. Its hidden size is 256, not 512, so that
# the whole CPU run stays within minutes on 2 cores: what decides the memory story is the
# ratio of the logits (tokens x vocab) to the weights (vocab x hidden), which 1024 tokens at
# D=256 give as 2048 tokens at D=512 would, at a quarter of the FLOPs.
MODELS = (
    StepModel("qwen-vocab", "4 layers, D=256, V=151936 (Qwen2.5-sized head)", layers=4,
              hidden=256, intermediate=688, heads=4, vocab=151936, headline=True),
    StepModel("llama-32k", "4 layers, D=512, V=32000", layers=4, hidden=512,
              intermediate=1376, heads=8, vocab=32000),
)
# Run only when named (--models): a real model's shape, SmolLM2-135M (30 layers, D=576,
# grouped-query attention, tied embeddings, V=49152), where the decoder outweighs the head: what
# the SDFT loss adds to a step when the head does not dominate it. Its config, random weights:
# a step's time and memory do not depend on the values (sdft demo real trains the real one).
NAMED_MODELS = (
    StepModel("smollm2-135m", "SmolLM2-135M's shape: 30 layers, D=576, V=49152, tied head", layers=30,
              hidden=576, intermediate=1536, heads=9, vocab=49152, kv_heads=3, tied=True),
)
QUICK_MODELS = (  # seconds on CPU: the harness smoke test
    StepModel("tiny-big-vocab", "1 layer, D=32, V=4096", layers=1, hidden=32, intermediate=64,
              heads=2, vocab=4096, headline=True),
    StepModel("tiny", "1 layer, D=32, V=512", layers=1, hidden=32, intermediate=64, heads=2,
              vocab=512),
)
# (sequences, tokens per sequence) of the batch.
BATCHES = {"cpu": (2, 512), "cuda": (8, 1024)}
QUICK_BATCH = (2, 32)


def models(quick: bool, names=None) -> tuple:
    """The models a run steps: the default set, or those ``names`` picks from it and from
    :data:`NAMED_MODELS`."""
    if quick:
        return QUICK_MODELS
    return MODELS if not names else tuple(m for m in MODELS + NAMED_MODELS if m.name in names)


def model_by_name(name: str) -> StepModel:
    for m in MODELS + NAMED_MODELS + QUICK_MODELS:
        if m.name == name:
            return m
    raise KeyError(f"no step model named {name!r}")


def make_batch(vocab: int, sequences: int, seq_len: int, device: str, seed: int) -> dict:
    """Random token ids, no padding, labels = ids with the prompt part set to IGNORE_INDEX,
    and an ``id`` per sequence (what a hidden-state cache looks examples up by)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sequences, seq_len), generator=g)
    labels = ids.clone()
    labels[:, : round(PROMPT_FRACTION * seq_len)] = IGNORE_INDEX
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device), "id": torch.arange(sequences)}


def build_model(spec: StepModel, max_positions: int, device: str, dtype: torch.dtype, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(spec.config(max_positions))
    return model.to(device=device, dtype=dtype).train()


@torch.no_grad()
def move_away(params, seed: int, init_std: float) -> None:
    """Add ``STUDENT_NOISE`` x (the matrix's std, or ``init_std`` for an all-zero one) x
    N(0, 1) to every matrix in ``params``: the student a few steps away from the teacher."""
    g = torch.Generator().manual_seed(seed + 1)
    for p in params:
        if p.dim() < 2:
            continue
        scale = STUDENT_NOISE * (float(p.float().std()) or init_std)
        noise = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)
        p.add_(noise, alpha=scale)


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


# ---------------------------------------------------------------- cases

@dataclass(frozen=True)
class StepCase:
    name: str
    title: str
    loss: str                       # "hf" (the model's own), "ours" (causal_lm_loss), "naive"
    teacher: Optional[str] = None   # None, "frozen", "frozen_bf16", "adapter", "cache"
    lora: bool = False              # the student trains LoRA adapters only (peft)
    versus: Optional[str] = None    # a second baseline its ratios are also taken against

    @property
    def sdft(self) -> bool:
        return self.teacher is not None


BASELINE = "sft_hf"   # every ratio's denominator; what a user runs today
NAIVE = "sdft_naive"  # the SDFT cases' second denominator
CASES = {c.name: c for c in (
    StepCase("sft_hf", "SFT, HF loss (baseline)", "hf"),
    StepCase("sft_ours", "SFT, causal_lm_loss", "ours"),
    StepCase("sdft_frozen", "SDFT, FrozenCopy", "ours", "frozen", versus=NAIVE),
    StepCase("sdft_frozen_bf16", "SDFT, FrozenCopy bf16", "ours", "frozen_bf16", versus=NAIVE),
    StepCase("lora_sft_hf", "LoRA SFT, HF loss", "hf", lora=True),
    StepCase("sdft_adapter", "SDFT, AdapterDisabled (LoRA)", "ours", "adapter", lora=True,
             versus="lora_sft_hf"),
    StepCase("sdft_cached", "SDFT, HiddenStateCache", "ours", "cache", versus=NAIVE),
    StepCase("sdft_naive", "SDFT, logits materialised", "naive", "frozen"),
)}
SETTINGS = {
    "sft_hf": "model(input_ids, attention_mask, labels).loss: HF's cross-entropy on full logits",
    "sft_ours": "sdft.causal_lm_loss(model, batch) without a teacher: fused cross-entropy",
    "sdft_frozen": "causal_lm_loss(model, batch, FrozenCopy(model)): a frozen copy in the "
                   "student's dtype",
    "sdft_frozen_bf16": "causal_lm_loss(model, batch, FrozenCopy(model, dtype=torch.bfloat16))",
    "lora_sft_hf": f"peft LoRA r={LORA_RANK} on {', '.join(LORA_TARGETS)}, the model's own loss",
    "sdft_adapter": "the same LoRA student, causal_lm_loss(model, batch, AdapterDisabled(model))",
    "sdft_cached": "causal_lm_loss(model, batch, HiddenStateCache(...)): the teacher's final "
                   "hidden states stored once in bf16 (built before the step, not timed) and "
                   "the teacher head",
    "sdft_naive": "student and FrozenCopy teacher logits from model(...).logits, then "
                  "F.cross_entropy + tau^2 F.kl_div(log_softmax(z_s / tau), log_softmax(z_t / "
                  "tau), log_target=True) at the labelled positions",
}


def skip_reason(case: StepCase, dtype: str) -> Optional[str]:
    """Why ``case`` does not run with a student in ``dtype`` (known before anything is
    built), or None."""
    if case.lora and not peft_available():
        return "peft is not installed (pip install -e '.[peft]')"
    if case.teacher == "frozen_bf16" and dtype == "bfloat16":
        return "the student is bf16 already: the same step as sdft_frozen"
    return None


@dataclass
class BuiltCase:
    """One case ready to step, and what its memory breakdown counts."""

    step: Callable[[], Tensor]       # one optimizer step; returns the detached loss
    student: nn.Module
    decoder: nn.Module               # the student's decoder (activations are tagged by it)
    optimizer: torch.optim.Optimizer
    teacher_tensors: list            # tensors the teacher holds (weights, cached head)
    loss_fn: Callable[[], Tensor]    # the step's forward: decoders, LM heads and the loss
    teacher_decoder: Optional[nn.Module] = None  # a teacher decoder other than the student's


def prepare_cache(names, spec: StepModel, batch: dict, device: str, dtype: torch.dtype,
                  seed: int) -> Optional[tempfile.TemporaryDirectory]:
    """If a case of ``names`` has the cached teacher: run the teacher (the model as built)
    once over the batch and store its hidden states, as a user does once before training,
    in a temporary folder (returned; removed when it is collected). Else None. The model it
    builds is freed when it returns, so it can run before a case's memory is measured."""
    if not any(CASES[n].teacher == "cache" for n in names):
        return None
    from sdft.teacher import HiddenStateCache

    folder = tempfile.TemporaryDirectory(prefix="sdft-step-cache-")
    model = build_model(spec, batch["input_ids"].shape[1], device, dtype, seed)
    examples = [{"id": str(i), "input_ids": row.tolist()}
                for i, row in zip(batch["id"].tolist(), batch["input_ids"].cpu())]
    HiddenStateCache.build(model, examples, folder.name, batch_size=len(examples),
                           dtype=torch.bfloat16)
    return folder


def build_cases(names, spec: StepModel, batch: dict, device: str, dtype: torch.dtype, seed: int,
                cache_dir: Optional[tempfile.TemporaryDirectory] = None,
                autocast: Optional[torch.dtype] = None) -> dict:
    """``{name: BuiltCase}`` for the cases ``names`` on ``batch``, sharing what they can.

    The full-model cases share one student and one AdamW (the step does the same work
    whichever case ran before), the LoRA cases one LoRA student, and every teacher is built
    once. With one name this is exactly what that case allocates; with all of them, what an
    interleaved timing pass needs, at a fraction of the memory of separate copies.

    ``autocast``: every case's forward (decoders, LM heads and loss) runs under
    ``torch.autocast(device, autocast)`` and the backward and AdamW outside it, with the
    weights, gradients and optimizer state in ``dtype``: mixed precision as the HF Trainer
    runs it with ``TrainingArguments(bf16=True)`` (float32 weights, bf16 compute)."""
    from sdft import SDFTLoss
    from sdft.model_head import decoder_of
    from sdft.teacher import AdapterDisabled, FrozenCopy, HiddenStateCache

    cases = [CASES[n] for n in names]
    teachers_needed = {c.teacher for c in cases}
    full = [c for c in cases if not c.lora]
    seq_len = batch["input_ids"].shape[1]
    base = build_model(spec, seq_len, device, dtype, seed)  # the teacher's weights
    init_std = base.config.initializer_range
    teachers = {}
    if "frozen" in teachers_needed:
        teachers["frozen"] = FrozenCopy(base)
    if "frozen_bf16" in teachers_needed:
        teachers["frozen_bf16"] = FrozenCopy(base, dtype=torch.bfloat16)
    if "cache" in teachers_needed:
        teachers["cache"] = HiddenStateCache(cache_dir.name)
    lora_student = None
    if any(c.lora for c in cases):
        from peft import LoraConfig, get_peft_model

        lora_student = get_peft_model(copy.deepcopy(base) if full else base,
                                      LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK,
                                                 target_modules=list(LORA_TARGETS)))
        # The base model is the teacher; only the (zero-initialised) B matrices move.
        move_away([p for n, p in lora_student.named_parameters() if "lora_B" in n], seed, init_std)
        teachers["adapter"] = AdapterDisabled(lora_student)
    if full:
        move_away(base.parameters(), seed, init_std)

    def trainable(model):
        return [p for p in model.parameters() if p.requires_grad]

    optimizers = {False: adamw(trainable(base)) if full else None,
                  True: adamw(trainable(lora_student)) if lora_student is not None else None}
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    sdft_loss = SDFTLoss(kl_weight=LAMBDA, temperature=TAU, ignore_index=IGNORE_INDEX)
    built = {}
    for c in cases:
        student = lora_student if c.lora else base
        optimizer = optimizers[c.lora]
        teacher = teachers.get(c.teacher)
        if c.loss == "hf":
            loss_fn = partial(_hf_loss, student, model_inputs, batch["labels"])
        elif c.loss == "ours":
            loss_fn = partial(_fused_loss, student, batch, teacher, sdft_loss)
        else:
            loss_fn = partial(naive_sdft_loss, student, teacher.model, model_inputs,
                              batch["labels"])
        if autocast is not None:
            loss_fn = partial(_autocast_forward, loss_fn, device, autocast)
        teacher_decoder = None
        if c.teacher in ("frozen", "frozen_bf16"):
            teacher_tensors = list(teacher.model.parameters())
            teacher_decoder = decoder_of(teacher.model)
        elif c.teacher == "cache":
            teacher_tensors = [t for t in (teacher.head.weight, teacher.head.bias) if t is not None]
        else:
            teacher_tensors = []
        built[c.name] = BuiltCase(partial(_step, optimizer, loss_fn), student,
                                  decoder_of(student), optimizer, teacher_tensors, loss_fn,
                                  teacher_decoder)
    return built


def adamw(params: list) -> torch.optim.Optimizer:
    """AdamW as the HF Trainer builds it by default (``optim="adamw_torch_fused"``): the fused
    kernel updates each tensor in one pass. (The for-loop implementation allocates
    temporaries the size of the largest parameter, here the embedding and the LM head,
    which can be a step's memory peak when the loss holds little.)"""
    return torch.optim.AdamW(params, lr=LEARNING_RATE, fused=True)


@torch.no_grad()
def create_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state (moments) now, by a step on zero gradients, so that the next step
    runs with it as every step from the second on does. Moves the weights only by weight
    decay (a factor 1 - lr * weight_decay)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _step(optimizer: torch.optim.Optimizer, loss_fn: Callable[[], Tensor]) -> Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    optimizer.step()
    return loss.detach()


def _autocast_forward(loss_fn: Callable[[], Tensor], device: str, dtype: torch.dtype) -> Tensor:
    with torch.autocast(device_type=device, dtype=dtype):
        return loss_fn()


def _hf_loss(model: nn.Module, model_inputs: dict, labels: Tensor) -> Tensor:
    return model(**model_inputs, labels=labels).loss


def _fused_loss(model: nn.Module, batch: dict, teacher, loss) -> Tensor:
    from sdft import causal_lm_loss

    return causal_lm_loss(model, batch, teacher, loss).loss


def naive_sdft_loss(student: nn.Module, teacher: nn.Module, model_inputs: dict,
                    labels: Tensor) -> Tensor:
    """CE + lambda tau^2 KL(teacher || student) at the labelled positions, as it is written
    without a fused loss: both models' full logits, then torch's losses on them."""
    logits = student(**model_inputs).logits[:, :-1].float()
    with torch.no_grad():
        teacher_logits = teacher(**model_inputs).logits[:, :-1].float()
    targets = labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=IGNORE_INDEX)
    kl = F.kl_div(F.log_softmax(logits / TAU, dim=-1), F.log_softmax(teacher_logits / TAU, dim=-1),
                  log_target=True, reduction="none").sum(-1)
    return ce + LAMBDA * TAU**2 * kl[targets != IGNORE_INDEX].mean()


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors``."""
    seen = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def weight_breakdown(built: BuiltCase) -> dict:
    """Bytes of the student's weights, its gradients and AdamW state, and the teacher's."""
    params = list(built.student.parameters())
    trainable = [p for p in params if p.requires_grad]
    state = [v for s in built.optimizer.state.values() for v in s.values()
             if isinstance(v, Tensor) and v.dim() > 0]
    return {"weights": tensor_bytes(params),
            "gradients": sum(p.numel() * p.element_size() for p in trainable),
            "optimizer": tensor_bytes(state),
            "teacher": tensor_bytes(built.teacher_tensors)}
