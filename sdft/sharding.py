"""The loss inside the forward that makes its parameters whole: DDP, FSDP1, FSDP2, DeepSpeed.

The fused loss never calls the LM head: it reads the head's weight and multiplies it with the
decoder's hidden states itself. A wrapper that shards parameters gathers them only inside the
forward of the module that owns them (FSDP1's ``FullyShardedDataParallel`` unit, FSDP2's
``fully_shard`` unit, every module under DeepSpeed ZeRO-3), and DDP synchronises only the
gradients of a forward that runs through it. So the loss runs inside those forwards:

- the whole loss inside the wrapper's forward (:func:`run_inside`, a forward redirection: the
  wrapper's forward runs with all its hooks, and where it would call the wrapped model's
  ``forward``, ours runs instead). :class:`sdft.SDFTModel` as the wrapped module gets the same
  for free: its ``forward`` is the loss;
- where the head is gathered by a forward of its own (an FSDP unit of its own, or any module
  under ZeRO-3), the loss also runs inside the head module's forward (:func:`head_owner`), so
  that the head's weight is whole in the forward, gathered again for the backward, and its
  gradient reduced across processes as for any layer.

The redirection sets the wrapped module's ``forward`` as an instance attribute for the
duration of one call of the wrapper, and restores what was there (the class's method, or an
instance attribute such as accelerate's autocast wrapper) before our function runs and again
in a ``finally``: nothing stays changed, and a call of the module's own forward from inside
ours (PEFT's prefix tuning) runs the real one.

Never ``head.weight.full_tensor()`` on a trained FSDP2 head: the forward is right but the
head's gradient then skips the reduction across processes.

Also here: sharding a frozen teacher (:func:`fully_shard_teacher`, :func:`deepspeed_teacher`)
and the full state dict of a sharded model for saving (:func:`full_state_dict`).
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

__all__ = [
    "ShardedHeadError",
    "deepspeed_teacher",
    "full_state_dict",
    "fully_shard_layers",
    "fully_shard_teacher",
    "head_owner",
    "run_inside",
    "wrapped_module",
    "wrapper_kind",
]

_MISSING = object()


class ShardedHeadError(ValueError):
    """The LM head's weight is a shard: the loss is not running inside the forward that gathers it."""


# ----------------------------------------------------------------------------------------------
# What wraps what
# ----------------------------------------------------------------------------------------------

def _deepspeed_engine_class():
    """DeepSpeed's engine class if deepspeed is already imported (never imported here: it is
    an optional, heavy dependency, and a model can only be in an engine once it is loaded)."""
    module = sys.modules.get("deepspeed")
    return getattr(module, "DeepSpeedEngine", None) if module is not None else None


def _is_fsdp2(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: FSDP2 only as the composable API
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return False
    return isinstance(module, FSDPModule)


def _is_fsdp1(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def wrapper_kind(module: nn.Module) -> Optional[str]:
    """``"ddp"``, ``"fsdp1"`` (``FullyShardedDataParallel``), ``"fsdp2"`` (a module under
    ``fully_shard``), ``"deepspeed"`` (a ``DeepSpeedEngine``), or None for a plain module."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return "ddp"
    if _is_fsdp1(module):
        return "fsdp1"
    if _is_fsdp2(module):
        return "fsdp2"
    engine = _deepspeed_engine_class()
    if engine is not None and isinstance(module, engine):
        return "deepspeed"
    return None


def wrapped_module(wrapper: nn.Module) -> nn.Module:
    """The module whose ``forward`` the wrapper's forward calls: ``wrapper.module`` for DDP,
    FSDP1 and a DeepSpeed engine; the module itself under FSDP2 (whose hooks sit on the
    module) or when it wraps nothing (a model as its own wrapper)."""
    kind = wrapper_kind(wrapper)
    if kind in ("ddp", "fsdp1", "deepspeed"):
        return wrapper.module
    return wrapper


# The wrappers and modules whose forward runs one of ours now (innermost last): the loss does
# not enter them again.
_RUNNING: list[nn.Module] = []


def run_inside(wrapper: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run inside ``wrapper``'s forward: a forward redirection.

    ``wrapper(*args, **kwargs)`` is called, so everything its forward does around the wrapped
    module runs (DDP's gradient synchronisation set-up, FSDP's unsharding and the hooks that
    reshard and reduce the gradients, DeepSpeed's parameter gathering), and where it calls the
    wrapped module (:func:`wrapped_module`), ``fn`` runs with the arguments as the wrapper
    passes them on (moved to the device, cast as its mixed precision casts inputs). Returns
    what the wrapper returns, which a wrapper may rebuild from ``fn``'s result (its tensors
    carry the hooks the backward needs, so backpropagate from these).

    The wrapped module's ``forward`` is replaced for this call only and restored before ``fn``
    runs (``fn`` may call the module's real forward) and in a ``finally``.
    """
    inner = wrapped_module(wrapper)
    own = inner.__dict__.get("forward", _MISSING)
    ran = []

    def restore() -> None:
        if own is _MISSING:
            inner.__dict__.pop("forward", None)
        else:
            inner.__dict__["forward"] = own

    def redirected(*inner_args: Any, **inner_kwargs: Any) -> Any:
        restore()
        ran.append(True)
        _RUNNING.extend((wrapper, inner))
        try:
            return fn(*inner_args, **inner_kwargs)
        finally:
            del _RUNNING[-2:]

    inner.__dict__["forward"] = redirected
    try:
        out = wrapper(*args, **kwargs)
    finally:
        restore()
    if not ran:
        raise RuntimeError(f"{type(wrapper).__name__}'s forward did not call the module it wraps "
                           f"({type(inner).__name__}), so the loss did not run inside it")
    return out


# ----------------------------------------------------------------------------------------------
# The LM head
# ----------------------------------------------------------------------------------------------

def is_zero3_param(param: Tensor) -> bool:
    """A parameter that DeepSpeed ZeRO-3 partitions (it gathers it in its module's forward)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_status")


def _is_dtensor(tensor: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        return False
    return isinstance(tensor, DTensor)


def head_owner(model: nn.Module) -> Optional[nn.Module]:
    """The module whose own forward gathers the LM head of ``model``, when the loss must run
    inside it: the innermost FSDP unit (an FSDP1 wrapper or an FSDP2 module) on the way from
    ``model`` down to its head (``model`` itself under ``fully_shard``, or the head in a unit
    of its own), else the head module under ZeRO-3 (which gathers every module's parameters in
    that module's forward). None: the head is an ordinary parameter, a unit above ``model``
    holds it (FSDP around an :class:`sdft.SDFTModel`, whose forward is the loss), or the loss
    already runs inside that forward."""
    head = _head_module(model)
    if head is None:
        return None
    owner = None
    for module in _path(model, head):
        if _is_fsdp1(module) or _is_fsdp2(module):
            owner = module
    if owner is None:
        weight = getattr(head, "weight", None)
        if isinstance(weight, Tensor) and is_zero3_param(weight):
            owner = head
    if owner is None or any(owner is running for running in _RUNNING):
        return None
    return owner


def _head_module(model: nn.Module) -> Optional[nn.Module]:
    from .architectures import unwrap

    get = getattr(unwrap(model), "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def check_head_reachable(model: nn.Module) -> None:
    """Raise :class:`ShardedHeadError` if ``model``'s LM head is a shard that no forward the
    loss runs inside would gather (:func:`head_owner` is None and the weight is a shard)."""
    if head_owner(model) is not None:
        return
    weight = getattr(_head_module(model), "weight", None)
    if isinstance(weight, Tensor):
        check_whole(weight)


def _path(model: nn.Module, target: nn.Module) -> list[nn.Module]:
    """The modules from ``model`` down to ``target``, both included (just ``[target]`` if
    ``target`` is not inside ``model``)."""
    for name, module in model.named_modules():
        if module is target:
            path, node = [model], model
            for part in name.split(".") if name else ():
                node = getattr(node, part)
                path.append(node)
            return path
    return [target]


def check_whole(weight: Tensor, what: str = "the LM head") -> None:
    """Raise :class:`ShardedHeadError` if ``weight`` is not the whole head: an FSDP2 shard
    (a ``DTensor``), a ZeRO-3 partition or an FSDP1 flat shard (empty outside the forward)."""
    if _is_dtensor(weight):
        reason = "an FSDP2 shard (a DTensor)"
    elif is_zero3_param(weight) and weight.ds_status.name != "AVAILABLE":
        reason = "a DeepSpeed ZeRO-3 partition"
    elif weight.dim() != 2 or weight.numel() == 0 or weight.untyped_storage().size() == 0:
        reason = f"not a whole [V, D] matrix (shape {tuple(weight.shape)}, storage freed or flattened by FSDP)"
    else:
        return
    raise ShardedHeadError(
        f"{what} is {reason}: the loss runs outside the forward that gathers it. Run the loss inside the "
        "wrapper's forward: SDFTModel(student, teacher, loss) as the wrapped module, or causal_lm_loss(student, "
        "batch, ..., wrapper=<the DDP/FSDP/DeepSpeed wrapper, or the fully_shard root>)")


# ----------------------------------------------------------------------------------------------
# Sharding helpers: decoder layers, a frozen teacher, full state dicts
# ----------------------------------------------------------------------------------------------

def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def decoder_layer_classes(model: nn.Module) -> set[str]:
    """Class names of the decoder's layers: the ``_no_split_modules`` of the transformers models
    in ``model`` (what accelerate's FSDP auto-wrap policy wraps; ``model`` may hold one, as
    :class:`sdft.SDFTModel` or a PEFT model do), else the class of the module list holding
    the most parameters."""
    present = {type(m).__name__ for m in model.modules()}
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    names &= present
    if names:
        return names
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to shard")
    biggest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return {type(biggest[0]).__name__}


def fully_shard_layers(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """FSDP2's ``fully_shard`` on every decoder layer of ``model`` (:func:`decoder_layer_classes`)
    not yet sharded, and then on ``model`` itself, whose unit holds the rest: embeddings, final
    norm, LM head (what accelerate's FSDP2 set-up does with the transformer-layer policy).
    ``model`` may be a causal LM, or an :class:`sdft.SDFTModel` around one (then the loss runs
    inside the root's forward). ``fsdp_kwargs`` go to every call (``mesh``,
    ``offload_policy``, ``mp_policy``, ``reshard_after_forward``). Returns ``model``, now an
    FSDP module."""
    fully_shard = _fully_shard()
    classes = decoder_layer_classes(model)
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in classes and not _is_fsdp2(module):
            fully_shard(module, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def _gathered_head(model: nn.Module, gather: Callable[[Tensor], Tensor]):
    """The teacher's :class:`~sdft.model_head.HeadSpec` with whole, detached, replicated tensors."""
    from .model_head import HeadSpec, head_spec

    head = head_spec(model)
    weight = gather(head.weight)
    bias = None if head.bias is None else gather(head.bias)
    return HeadSpec(weight, bias, head.softcap, head.hidden_scale)


@torch.no_grad()
def fully_shard_teacher(teacher, **fsdp_kwargs: Any):
    """Shard a :class:`sdft.teacher.FrozenCopy` with FSDP2, in place; returns it.

    Its LM head and input embeddings (when untied), its decoder layers and then its model go
    under ``fully_shard`` (:func:`fully_shard_layers`; ``fsdp_kwargs`` as there: ``mesh``,
    ``offload_policy=CPUOffloadPolicy()``, ``mp_policy``), so each process holds ``1/world`` of
    its weights, and its passes run through its own forward (:func:`run_inside`), which gathers
    them a unit at a time. Its LM head is gathered once, now (FSDP2's ``unshard()``, then
    ``reshard()``), and kept whole on every process (``V x D``: the fused loss reads it for
    every chunk of rows); it is frozen, so no gradient needs reducing.
    """
    model = teacher.model
    if wrapper_kind(model) is not None or teacher.wrapper is not None:
        raise ValueError(f"the teacher's model is already wrapped ({type(teacher.wrapper or model).__name__})")
    from .architectures import unwrap

    inner = unwrap(model)
    head, embed = inner.get_output_embeddings(), inner.get_input_embeddings()
    # Untied, the head and the embeddings are units of their own: the head's is never gathered
    # by a pass (the loss reads the copy below), the embeddings' only while they run.
    separate = (isinstance(head, nn.Module) and isinstance(embed, nn.Module)
                and getattr(head, "weight", None) is not getattr(embed, "weight", None))
    if separate:
        fully_shard = _fully_shard()
        fully_shard(head, **fsdp_kwargs)
        fully_shard(embed, **fsdp_kwargs)
    fully_shard_layers(model, **fsdp_kwargs)
    unit = head if separate else model
    unit.unshard()  # the head whole, on the compute device
    try:
        teacher.head = _gathered_head(model, lambda tensor: tensor.detach().clone())
    finally:
        unit.reshard()
    # FSDP2 keeps a root unit whole after its forward, for the backward that follows; the
    # teacher has none, so its root reshards at once (else every process would keep its
    # embeddings and head whole from the first batch on).
    model.register_forward_hook(lambda module, args, output: module.reshard())
    teacher.wrapper = model
    return teacher


def deepspeed_teacher(teacher, config: dict):
    """Put a :class:`sdft.teacher.FrozenCopy` into a DeepSpeed inference engine of its own, in
    place (ZeRO-3: each process holds ``1/world`` of its weights); returns it.

    ``config``: the training's DeepSpeed config (a dict); the teacher's engine keeps its
    ``zero_optimization`` stage and its ``bf16`` / ``fp16`` settings and drops the optimizer,
    the scheduler and the ZeRO-3 offload of optimizer states (a frozen model has none). A
    stage below 3 becomes stage 0: the teacher is then replicated, as the student is. Its LM
    head is gathered once, now, and kept whole on every process (``V x D``, frozen).
    """
    import deepspeed

    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    zero = {"stage": 3 if stage == 3 else 0}
    if stage == 3:
        for key in ("stage3_param_persistence_threshold", "stage3_prefetch_bucket_size",
                    "stage3_max_live_parameters", "stage3_max_reuse_distance", "offload_param"):
            if key in config["zero_optimization"] and config["zero_optimization"][key] != "auto":
                zero[key] = copy.deepcopy(config["zero_optimization"][key])
    teacher_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}
    for key in ("bf16", "fp16"):
        if isinstance(config.get(key), dict) and config[key].get("enabled") is True:
            teacher_config[key] = {"enabled": True}
    if wrapper_kind(teacher.model) is not None or teacher.wrapper is not None:
        raise ValueError(f"the teacher's model is already wrapped ({type(teacher.wrapper or teacher.model).__name__})")
    engine, *_ = deepspeed.initialize(model=teacher.model, config=teacher_config)
    engine.eval()

    def gather(tensor: Tensor) -> Tensor:
        if not is_zero3_param(tensor):
            return tensor.detach().clone()
        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().clone()

    teacher.head = _gathered_head(engine.module, gather)
    teacher.wrapper = engine
    return teacher


def full_state_dict(model: nn.Module, wrapper: Optional[nn.Module] = None) -> Optional[dict]:
    """The whole state dict of ``model`` (plain tensors on the CPU; ``model`` may be inside
    ``wrapper``, as the student of a wrapped :class:`sdft.SDFTModel`), on process 0 only; None
    on the others. A collective: every process calls it. What ``save_pretrained(...,
    state_dict=...)`` of a sharded model needs.

    FSDP1 and FSDP2 (``model`` or ``wrapper`` sharded): gathered with
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict(full_state_dict=True)``;
    DeepSpeed ZeRO-3 (``wrapper`` an engine): each parameter gathered in turn; otherwise the
    model's own state dict, on every process.
    """
    kind = wrapper_kind(wrapper) if wrapper is not None else None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if kind == "deepspeed" and any(is_zero3_param(p) for p in model.parameters()):
        import deepspeed

        state = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if is_zero3_param(tensor):
                with deepspeed.zero.GatheredParameters([tensor]):
                    state[name] = tensor.detach().cpu().clone() if rank == 0 else None
            else:
                state[name] = tensor.detach().cpu().clone()
        return state if rank == 0 else None
    sharded = kind in ("fsdp1", "fsdp2") or any(_is_dtensor(p) for p in model.parameters()) or \
        any(_is_fsdp1(m) for m in model.modules())
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        target = wrapper if kind == "fsdp1" else model
        # Moved to the CPU as gathered where the model computes elsewhere (FSDP1's copy to the
        # CPU faults on a model that is already there).
        on_cpu = all(p.device.type == "cpu" for p in target.parameters())
        options = StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu)
        state = get_model_state_dict(target, options=options)
        if rank != 0:
            return None
        prefix = _name_inside(wrapped_module(target), model)  # FSDP1 around an SDFTModel: "student."
        return {name[len(prefix):]: tensor.cpu() for name, tensor in state.items() if name.startswith(prefix)}
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def _name_inside(outer: nn.Module, inner: nn.Module) -> str:
    """``inner``'s qualified name inside ``outer`` with a trailing dot and FSDP1's wrapper
    names left out, as in a state dict of ``outer`` ("" when they are the same module)."""
    for name, module in outer.named_modules():
        if module is inner:
            name = name.replace("_fsdp_wrapped_module.", "").replace("_fsdp_wrapped_module", "")
            return f"{name.strip('.')}." if name.strip(".") else ""
    raise ValueError(f"{type(inner).__name__} is not inside {type(outer).__name__}")
