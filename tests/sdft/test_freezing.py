"""Tests of sdft.freezing: group resolution per architecture, and freezes that hold under AdamW.

Models are tiny random configs (hidden 32, 2 layers, 4 heads, vocab 100) built from config, so
nothing is downloaded and the whole file runs in seconds on CPU.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import transformers
from torch import nn

from sdft.freezing import (
    GROUPS,
    FreezeReport,
    PartialMask,
    freeze,
    masked_optimizer,
    resolve_groups,
)
from sdft.param_groups import param_groups

VOCAB = 100
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB)

# Each architecture with the attribute paths that the test uses as ground truth; freezing.py
# must find the same groups without being told these names.
ARCHITECTURES = {
    # name: (config factory, layer list path, attention attr, mlp attr)
    "llama": (lambda: transformers.LlamaConfig(**_DECODER), "model.layers", "self_attn", "mlp"),
    "qwen2": (lambda: transformers.Qwen2Config(**_DECODER), "model.layers", "self_attn", "mlp"),
    "mistral": (lambda: transformers.MistralConfig(**_DECODER), "model.layers", "self_attn",
                "mlp"),
    # Gemma ties the LM head to the input embedding; Gemma2 adds pre/post feed-forward norms.
    "gemma": (lambda: transformers.GemmaConfig(**_DECODER, head_dim=8), "model.layers",
              "self_attn", "mlp"),
    "gemma2": (lambda: transformers.Gemma2Config(**_DECODER, head_dim=8), "model.layers",
               "self_attn", "mlp"),
    # GPT-2: Conv1D projections, biases, LayerNorm, learned position embeddings, tied head.
    "gpt2": (lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                             n_positions=64, bos_token_id=0, eos_token_id=0),
             "transformer.h", "attn", "mlp"),
}


def build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = ARCHITECTURES[arch][0]()
    return transformers.AutoModelForCausalLM.from_config(config).float()


def param_names_under(model: nn.Module, prefix: str) -> set[str]:
    """Canonical names (first name of tied parameters) of the parameters under ``prefix.``."""
    return {name for name, _ in model.named_parameters() if name.startswith(prefix + ".")}


def expected_groups(model: nn.Module, arch: str) -> dict[str, set[str]]:
    """Ground truth from the known attribute paths of each architecture."""
    _, layers_path, attn, mlp = ARCHITECTURES[arch]
    n_layers = len(model.get_submodule(layers_path))
    first_name = {id(p): name for name, p in model.named_parameters()}
    norm_modules = [m for m in model.modules() if type(m).__name__.endswith("Norm")]
    embeddings = {first_name[id(model.get_input_embeddings().weight)]}
    if arch == "gpt2":
        embeddings.add("transformer.wpe.weight")
    return {
        "embeddings": embeddings,
        "attention": set().union(*(param_names_under(model, f"{layers_path}.{i}.{attn}")
                                   for i in range(n_layers))),
        "ffn": set().union(*(param_names_under(model, f"{layers_path}.{i}.{mlp}")
                             for i in range(n_layers))),
        "norms": {first_name[id(p)] for m in norm_modules for p in m.parameters()},
        "lm_head": {first_name[id(model.get_output_embeddings().weight)]},
    }


def frozen_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied ones once


def lm_batch(seed: int, batch: int = 2, length: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


# --------------------------------------------------------------------------------------------
# The freeze holds under AdamW
# --------------------------------------------------------------------------------------------

# Token ids whose embedding rows are frozen; every batch below contains them, so their rows
# would receive gradient without the mask.
FROZEN_TOKENS = [3, 17, 42]


def frozen_llama_setup():
    """A tiny Llama with a whole-tensor freeze, frozen embedding rows and a random elementwise
    mask; returns the model, the report and every parameter's initial value."""
    model = build("llama")
    q_mask = torch.rand(model.model.layers[1].self_attn.q_proj.weight.shape,
                        generator=torch.Generator().manual_seed(1)) < 0.5
    report = freeze(model, [
        "layers[0].ffn",
        PartialMask("model.embed_tokens.weight", rows=FROZEN_TOKENS),
        PartialMask("model.layers.1.self_attn.q_proj.weight", mask=q_mask),
    ])
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    return model, report, initial


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int,
                micro_batches: int = 2) -> None:
    """``steps`` optimizer steps, each accumulating ``micro_batches`` LM-loss gradients."""
    for step in range(steps):
        for micro in range(micro_batches):
            ids = lm_batch(seed=step * micro_batches + micro)
            ids[:, : len(FROZEN_TOKENS)] = torch.tensor(FROZEN_TOKENS)
            (model(ids, labels=ids).loss / micro_batches).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_adamw_with_weight_decay_keeps_frozen_entries_bit_identical():
    model, report, initial = frozen_llama_setup()
    optimizer = masked_optimizer(
        torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-2), report)

    train_steps(model, optimizer, steps=20)

    masks = {entries.name: entries.as_mask() for entries in report.partial}
    assert set(masks) == {"model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert name.startswith("model.layers.0.mlp.")
            assert p.grad is None
            assert torch.equal(p, initial[name]), name
            continue
        frozen = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p[frozen], initial[name][frozen]), f"{name}: a frozen entry moved"
        # Every single trainable entry must differ from its start: a freeze that leaked onto
        # trainable entries (or a no-op optimizer) cannot pass this.
        moved = p.detach() != initial[name]
        assert bool(moved[~frozen].all()), f"{name}: {int((~moved[~frozen]).sum())} " \
                                           f"trainable entries did not move"
        # The frozen entries of the optimizer state are kept at zero.
        for state in optimizer.state[p].values():
            if state.shape == p.shape:
                assert not bool(state[frozen].any()), name
    assert frozen_names(model) == {n for n in initial if n.startswith("model.layers.0.mlp.")}


def test_gradient_mask_alone_does_not_freeze_under_adamw():
    """Why masked_optimizer exists: the hook zeroes the gradient, yet AdamW's decoupled weight
    decay still moves the masked entries. Also proves the test above is not vacuous."""
    model, report, initial = frozen_llama_setup()
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-2)
    embedding = model.model.embed_tokens.weight

    ids = lm_batch(seed=0)
    ids[:, : len(FROZEN_TOKENS)] = torch.tensor(FROZEN_TOKENS)
    model(ids, labels=ids).loss.backward()
    assert not bool(embedding.grad[FROZEN_TOKENS].any()), "the hook must zero masked gradients"
    unmasked = torch.ones(VOCAB, dtype=torch.bool)
    unmasked[FROZEN_TOKENS] = False
    assert bool(embedding.grad[unmasked].any())  # while other rows of used tokens get gradient
    optimizer.step()

    frozen_rows_after = embedding.detach()[FROZEN_TOKENS]
    assert bool((frozen_rows_after != initial["model.embed_tokens.weight"][FROZEN_TOKENS]).all())


def test_freeze_ffn_then_one_training_step():
    """Even with every parameter handed to the optimizer, requires_grad=False keeps the MLP
    weights identical while attention learns."""
    model = build("llama")
    freeze(model, "ffn")
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    ids = lm_batch(seed=0)
    model(ids, labels=ids).loss.backward()
    optimizer.step()

    for name, p in model.named_parameters():
        if ".mlp." in name:
            assert torch.equal(p, initial[name]), name
        if ".self_attn." in name:
            assert not torch.equal(p, initial[name]), name


# --------------------------------------------------------------------------------------------
# Group resolution per architecture
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_groups_resolve_by_role(arch):
    model = build(arch)
    expected = expected_groups(model, arch)
    assert all(expected[group] for group in GROUPS), "ground truth must not be empty"

    resolved = {group: set(names) for group, names in resolve_groups(model).items()}
    assert resolved == expected

    # Freezing a group freezes exactly that group, and the report adds up.
    report = freeze(model, "ffn")
    assert frozen_names(model) == expected["ffn"]
    assert report.total == parameter_count(model)
    assert report.trainable + report.frozen == report.total
    assert sum(row.trainable + row.frozen for row in report.rows) == report.total
    ffn_elements = sum(p.numel() for n, p in model.named_parameters() if n in expected["ffn"])
    assert report.frozen == ffn_elements
    assert report.optimizer_state_bytes_saved == 8 * ffn_elements
    assert {row.name: row.frozen for row in report.rows}["ffn"] == ffn_elements
    rendered = str(report)
    assert "ffn" in rendered and "total" in rendered and "optimizer state saved" in rendered


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layer_slices_and_regex(arch):
    model = build(arch)
    _, layers_path, attn, mlp = ARCHITECTURES[arch]

    freeze(model, ["layers[1:]", "layers[:1].ffn"])
    assert frozen_names(model) == (param_names_under(model, f"{layers_path}.1")
                                   | param_names_under(model, f"{layers_path}.0.{mlp}"))

    model = build(arch)
    freeze(model, "layers[-1].attention")
    assert frozen_names(model) == param_names_under(model, f"{layers_path}.1.{attn}")

    model = build(arch)
    freeze(model, r"re:.*\.0\..*weight")
    assert frozen_names(model) == {n for n in param_names_under(model, f"{layers_path}.0")
                                   if n.endswith("weight")}


def test_train_only_freezes_the_complement():
    model = build("qwen2")
    attention = set(resolve_groups(model)["attention"])
    report = freeze(model, train_only="attention")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == attention
    assert report.trainable == sum(p.numel() for n, p in model.named_parameters() if n in attention)

    # A PartialMask in train_only trains only those entries: e.g. embeddings of new tokens.
    model = build("qwen2")
    report = freeze(model, train_only=["attention", PartialMask("model.embed_tokens.weight",
                                                                rows=[98, 99])])
    (entries,) = report.partial
    assert entries.name == "model.embed_tokens.weight"
    assert entries.rows.tolist() == list(range(98))


# --------------------------------------------------------------------------------------------
# Tied embeddings
# --------------------------------------------------------------------------------------------


def test_gpt2_tied_embeddings_freeze_lm_head_and_report_says_so():
    model = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    report = freeze(model, "embeddings")

    assert not model.lm_head.weight.requires_grad
    assert frozen_names(model) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert any("lm_head.weight" in note and "tied" in note for note in report.notes)
    assert "lm_head.weight is tied" in str(report)
    assert report.total == parameter_count(model)  # the tied matrix counted once
    assert report.frozen == model.transformer.wte.weight.numel() + \
        model.transformer.wpe.weight.numel()


def test_partial_mask_through_tied_alias():
    model = build("gpt2")
    report = freeze(model, PartialMask("lm_head.weight", rows=[5]))
    (entries,) = report.partial
    assert entries.name == "transformer.wte.weight" and entries.rows.tolist() == [5]
    assert report.frozen == 32


# --------------------------------------------------------------------------------------------
# Report and optimizer groups
# --------------------------------------------------------------------------------------------


def test_report_counts_partial_masks_and_renders():
    model = build("llama")
    report = freeze(model, ["norms", PartialMask("lm_head.weight", rows=range(10))])
    assert isinstance(report, FreezeReport)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert report.frozen == norms + 10 * 32
    assert report.trainable == parameter_count(model) - report.frozen
    # Masked entries still carry optimizer state, so only whole tensors count as saved.
    assert report.optimizer_state_bytes_saved == 8 * norms
    lines = str(report).splitlines()
    assert lines[0].split() == ["group", "trainable", "frozen", "frozen", "%"]
    widths = {len(line) for line in lines[1:] if line.split()[0] in
              ("embeddings", "lm_head", "attention", "ffn", "norms", "total")}
    assert len(widths) == 1, "table rows must be aligned"
    assert any("masked_optimizer" in line for line in lines)


def test_param_groups_split_decay_and_skip_frozen():
    model = build("gpt2")
    freeze(model, "ffn")
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    grouped = {id(p) for group in (decay, no_decay) for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


def test_public_names_keep_their_import_paths():
    """The jobs moved to modules of their own; ``sdft.freezing`` still exports every name,
    param_groups (in a module of its own, also importable from the trainer) included."""
    import sdft.freezing as freezing
    from sdft import freeze_masks, freeze_report, freeze_spec, param_groups, trainer

    assert freezing.param_groups is trainer.param_groups is param_groups.param_groups
    assert (freezing.PartialMask, freezing.GROUPS, freezing.resolve_groups) == (
        freeze_spec.PartialMask, freeze_spec.GROUPS, freeze_spec.resolve_groups)
    assert (freezing.masked_optimizer, freezing.FrozenEntries) == (freeze_masks.masked_optimizer,
                                                                   freeze_masks.FrozenEntries)
    assert (freezing.FreezeReport, freezing.GroupCount) == (freeze_report.FreezeReport, freeze_report.GroupCount)
    assert all(hasattr(freezing, name) for name in freezing.__all__)


def test_freezing_loads_no_trainer():
    """``freeze`` and ``param_groups`` alone do not import transformers' Trainer."""
    code = ("import sys, sdft.freezing as f; f.param_groups; "
            "print(sorted(m for m in ('sdft.trainer', 'transformers.trainer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

WRONG_SHAPE = PartialMask("model.layers.0.mlp.up_proj.weight", mask=torch.ones(3, 4, dtype=bool))

ERROR_CASES = [
    # (spec, further text the message must contain)
    ("re:.*no_such_parameter.*", "matches no parameters"),
    (PartialMask("model.no_such.weight", rows=[0]), "no parameter named"),
    (PartialMask("model.embed_tokens.weight", rows=[]), "matches no parameters"),
    (PartialMask("model.embed_tokens.weight", rows=[VOCAB]), "out of range"),
    (WRONG_SHAPE, "model.layers.0.mlp.up_proj.weight of shape (64, 32)"),
    ("feedforward", "known groups: embeddings, attention, ffn, norms, lm_head"),
    ("layers[0].mlp", "known: attention, ffn, norms"),
    ("layers[0:3]", "out of range"),
    ("layers[2]", "out of range"),
    ("layers[1:1]", "selects no layers"),
    ("layers[::0]", "step cannot be zero"),
    ("re:[", "invalid regular expression"),
    (["embeddings", "layers[:]", "norms", "lm_head"], "nothing left to train"),
    ([], "empty list"),
    (3, "expected a str, PartialMask or a list"),
]


@pytest.mark.parametrize("spec, detail", ERROR_CASES, ids=[repr(s)[:40] for s, _ in ERROR_CASES])
def test_bad_specs_raise_value_error_naming_the_spec(spec, detail):
    model = build("llama")
    with pytest.raises(ValueError) as raised:
        freeze(model, spec)
    message = str(raised.value)
    assert repr(spec) in message
    assert detail in message
    assert not frozen_names(model), "a failed freeze must leave the model untouched"


def test_wrong_mask_shape_names_both_shapes():
    with pytest.raises(ValueError, match=re.escape("mask shape (3, 4) does not match")):
        freeze(build("llama"), WRONG_SHAPE)


def test_train_only_everything_frozen_and_bad_partial_masks():
    model = build("llama")
    with pytest.raises(ValueError, match=re.escape("train_only='re:.*lora.*'")):
        freeze(model, train_only="re:.*lora.*")
    with pytest.raises(ValueError, match="nothing left to train"):
        freeze(model, "re:.*", train_only="attention")
    with pytest.raises(ValueError, match="exactly one of rows= or mask="):
        PartialMask("model.embed_tokens.weight")
    with pytest.raises(ValueError, match="bool tensor"):
        PartialMask("model.embed_tokens.weight", mask=torch.ones(VOCAB, 32))
    with pytest.raises(ValueError, match="give a spec"):
        freeze(model)
