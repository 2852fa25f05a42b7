"""Configuration of ``sdft train``: plain dataclasses, filled from YAML and ``--key value``.

Every field has a default except ``model`` and the training data. Unknown keys and wrong types
fail here, before any model is loaded, naming the key::

    model: ./my-model
    data: {train_file: facts.jsonl, known_field: known}
    loss: {kl_weight: 1.0, temperature: 0.5}
    stage1_epochs: 1          # the paper's two-stage recipe: task-format stage, then SDFT
    eval: {heldout_file: heldout.jsonl, steps: 50}   # forgetting of held-out known facts
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from sdft_kernels.options import DEFAULT_IMPL, LossOptions, check_chunk_size, check_impl

from .loss import DEFAULT_KL_POSITIONS, check_kl_positions


class ConfigError(ValueError):
    """A configuration key is unknown, missing or of the wrong type."""


@dataclass
class DataConfig:
    train_file: Optional[str] = None  # local .jsonl/.json/.csv/.parquet
    dataset: Optional[str] = None  # or a hub dataset name (needs network)
    split: str = "train"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"  # chat rows: rendered with the tokenizer's chat template
    id_field: Optional[str] = None  # kept for a hidden-state cache; default: the row number
    known_field: Optional[str] = None  # bool column: rows of known facts (stage 1 of the recipe)
    max_length: int = 512
    max_bad_fraction: float = 0.01  # fail if more rows than this are empty or miss fields


@dataclass(frozen=True)
class LossConfig(LossOptions):
    """The ``loss:`` section: :class:`sdft_kernels.LossOptions`' fields, with its defaults
    and checks (``softcap`` None: the model's own), plus where the divergence applies, which
    implementation runs and its chunk size: everything :meth:`sdft.SDFTLoss.from_config` reads."""

    kl_positions: str = DEFAULT_KL_POSITIONS  # "labels": supervised tokens; "all": every non-pad token
    impl: str = DEFAULT_IMPL
    chunk_size: Optional[int] = None  # rows per chunk of the chunked paths; None: from a memory budget

    def __post_init__(self) -> None:
        super().__post_init__()
        check_kl_positions(self.kl_positions)
        check_impl(self.impl)
        check_chunk_size(self.chunk_size)

    def options(self) -> LossOptions:
        """The loss settings alone."""
        return LossOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossOptions)})


@dataclass
class TeacherConfig:
    source: str = "frozen_copy"  # frozen_copy | adapter_disabled | cache | none
    dtype: Optional[str] = None  # e.g. bfloat16 for a cheaper frozen copy
    cache_dir: Optional[str] = None  # for source=cache; default: <output_dir>/teacher_cache
    cache_dtype: str = "bfloat16"


@dataclass
class EvalConfig:
    """The ``eval:`` section: forgetting measured during training. ``heldout_file`` holds rows the
    model already knows and does not train on (prompt / response fields as ``data:`` names
    them); their greedy exact-match accuracy is logged as ``old_facts`` at the start of each
    stage, every ``steps`` optimizer steps and at its end, and its drop since the stage began
    as ``forgetting``."""

    heldout_file: Optional[str] = None  # None: no evaluation
    steps: int = 0  # also every this many optimizer steps; 0: only at the start and end of each stage
    max_rows: Optional[int] = 256  # a seeded subset, the same rows at every evaluation
    max_new_tokens: int = 32


@dataclass
class LoraSection:
    r: int = 0  # 0: full fine-tuning; > 0: train LoRA adapters (needs peft)
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TrainConfig:
    model: str = ""  # local path (or hub id, which needs network)
    tokenizer: Optional[str] = None  # default: the model's
    dtype: str = "float32"
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    eval: EvalConfig = field(default_factory=EvalConfig)
    freeze: list[str] = field(default_factory=list)  # sdft.freezing specs, e.g. ["ffn"]
    train_only: Optional[str] = None  # e.g. "attention"
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 5e-5  # the paper's
    lr_schedule: str = "constant"  # any transformers scheduler name
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = -1
    stage1_epochs: float = 0.0  # > 0: plain CE on known rows first, then snapshot the teacher
    sampling: str = "group_by_length"  # group_by_length (less padding) | random | sequential
    gradient_checkpointing: bool = False
    check_head: bool = True  # compare the fused loss with the model's own forward once; off: trust the tables
    # Sharded training (README, "Scale out"), passed to the Trainer as its arguments of these names:
    fsdp: bool = False  # FSDP (FSDP2 unless fsdp_config says version 1): a unit per decoder layer and the root
    fsdp_config: Optional[str] = None  # JSON file, e.g. {"cpu_offload": true, "state_dict_type": "SHARDED_STATE_DICT"}
    deepspeed: Optional[str] = None  # DeepSpeed JSON config file, e.g. ZeRO-3
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    output_dir: str = "runs/sdft"
    seed: int = 0

    def check(self) -> None:
        """Cross-field checks that types alone cannot express."""
        if not self.model:
            raise ConfigError("model: required (a local path or hub id)")
        if not (self.data.train_file or self.data.dataset):
            raise ConfigError("data.train_file or data.dataset: one is required")
        if self.teacher.source not in ("frozen_copy", "adapter_disabled", "cache", "none"):
            raise ConfigError(f"teacher.source: unknown source {self.teacher.source!r}")
        if self.teacher.source == "adapter_disabled" and self.lora.r <= 0:
            raise ConfigError("teacher.source: adapter_disabled needs LoRA adapters (set lora.r > 0)")
        if self.teacher.source == "adapter_disabled" and self.stage1_epochs > 0:
            raise ConfigError("teacher.source: adapter_disabled makes the base model the teacher, not the stage-1 "
                              "snapshot the recipe needs; use frozen_copy with stage1_epochs")
        if self.lora.r < 0:
            raise ConfigError(f"lora.r: must be >= 0, got {self.lora.r}")
        if self.stage1_epochs > 0 and not self.data.known_field:
            raise ConfigError("stage1_epochs > 0 needs data.known_field (which rows are known facts)")
        for name in ("batch_size", "grad_accum", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps: must be > 0, or -1 to train for `epochs`, got {self.max_steps}")
        if self.max_steps == -1 and not self.epochs > 0:
            raise ConfigError(f"epochs: must be > 0 (or set max_steps > 0), got {self.epochs}: "
                              "the run would write an untrained model as its result")
        if not self.stage1_epochs >= 0:
            raise ConfigError(f"stage1_epochs: must be >= 0, got {self.stage1_epochs}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.sampling not in ("group_by_length", "random", "sequential"):
            raise ConfigError(f"sampling: one of group_by_length, random, sequential, got {self.sampling!r}")
        for name in ("fsdp_config", "deepspeed"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name}: no such file {path!r}")
        if self.fsdp and self.deepspeed:
            raise ConfigError("fsdp and deepspeed: choose one")
        if self.fsdp_config and not self.fsdp:
            raise ConfigError("fsdp_config: set fsdp: true as well (the config alone turns nothing on)")
        if self.eval.heldout_file is not None:
            if not Path(self.eval.heldout_file).is_file():
                raise ConfigError(f"eval.heldout_file: no such file {self.eval.heldout_file!r}")
            if self.fsdp or self.deepspeed:
                raise ConfigError("eval.heldout_file: the held-out evaluation generates with the whole student on the "
                                  "first process, which FSDP and DeepSpeed shard; train without it there")
        if self.eval.steps < 0:
            raise ConfigError(f"eval.steps: must be >= 0, got {self.eval.steps}")
        for name in ("max_rows", "max_new_tokens"):
            value = getattr(self.eval, name)
            if value is not None and value < 1:
                raise ConfigError(f"eval.{name}: must be >= 1, got {value}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype: one of float32, bfloat16, float16, got {self.dtype!r}")


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Check (and for strings from the command line, parse) ``value`` against ``annotation``."""
    origin = typing.get_origin(annotation)
    if origin is Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _from_dict(annotation, value, prefix=f"{key}.")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif annotation in (int, float):
        # A float field takes an int too (lr: 1); an int field takes no float, and no bool.
        if isinstance(value, str):
            try:
                return annotation(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float) if annotation is float else int) and not isinstance(value, bool):
            return annotation(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def _from_dict(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in values.items()}
    try:  # a section's own checks (the loss's), now rather than after the model has loaded
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _set_path(tree: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Read YAML (if given), apply ``["--key", "value", ...]`` or ``key=value`` overrides, check."""
    tree: dict = {}
    if path is not None:
        text = Path(path).read_text()
        tree = yaml.safe_load(text) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    args = list(overrides or [])
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif arg.startswith("--"):
            if i + 1 >= len(args):
                raise ConfigError(f"{arg}: missing value")
            key, value = arg[2:], args[i + 1]
            i += 2
        elif "=" in arg:
            key, value = arg.split("=", 1)
            i += 1
        else:
            raise ConfigError(f"cannot parse override {arg!r} (use --key value or key=value)")
        _set_path(tree, key.replace("-", "_"), value)
    config = _from_dict(TrainConfig, tree)
    config.check()
    return config


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
