"""``HiddenStateCache``: a teacher's final hidden states computed once over a dataset, stored in
a memory-mapped file, and found again for each batch by example id or by token content; and the
fingerprints (of token ids, of model weights) that refuse a cache built from other data or
another teacher."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .model_head import HeadSpec, final_hidden_states, head_spec
from .packing import document_spans
from .teacher_output import TeacherOutput, eval_mode


_CACHE_VERSION = 2  # 2: keyed on token content and model weights
_FROM_META = object()  # HiddenStateCache(path): the id field the cache was built with
_STORAGE = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _fingerprint(weight: Tensor) -> str:
    """A content hash of a head weight, to refuse a cache built with another head."""
    data = weight.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def token_fingerprint(input_ids) -> str:
    """A hash of one example's token ids (a list or a 1-D tensor): the cache's key beside the
    example id, so that a dataset with the same ids and lengths but other tokens is refused."""
    ids = torch.as_tensor(input_ids, dtype=torch.int64).cpu().contiguous()
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:24]


def model_fingerprint(model: nn.Module, samples: int = 4096) -> str:
    """A hash of a model's weights, cheap enough for an 8B model: every parameter's name and
    shape and ``samples`` evenly spaced values of it (any training step moves nearly all)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)][:samples]
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(picked.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class HiddenStateCache:
    """Teacher final hidden states stored once, looked up per batch by example id or by the
    tokens themselves.

    Layout of the folder: ``hidden.bin`` (all documents' non-pad hidden states back to back,
    ``[total_tokens, Dt]`` in ``dtype``, memory-mapped), ``index.json`` (key -> offset, length,
    hash of the token ids), ``head.pt`` (head weight and bias), ``meta.json`` (sizes, dtype,
    model and head fingerprints, softcap, scale, the id field). Each document's states are
    computed alone, at positions ``0 .. n-1`` (right-padded), so they match a right-padded row
    or a document of a packed batch (left padding shifts the position ids of most models).

    Lookup, per batch:

    - an ordinary (unpacked) batch that carries the example ids in ``id_field``: by id; each
      row's non-pad tokens must hash to what the cache stored for its id;
    - a packed or padding-free batch (several documents per row, told apart by
      ``position_ids``, :mod:`sdft.packing`), or a batch without ids (TRL's collators drop
      every column but the tokens and labels): each document by the hash of its tokens.
      A document the cache does not hold is refused, naming its row and columns.

    A cache built with ``id_field=None`` is keyed by token content only; it can be built from
    a packed dataset (rows with ``seq_lengths``, as TRL's ``SFTTrainer`` prepares them).
    """

    def __init__(self, path: Union[str, Path], id_field: Union[str, None, object] = _FROM_META):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"no hidden-state cache at {self.path} (missing meta.json)")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("version") != _CACHE_VERSION:
            raise ValueError(f"cache {self.path} has version {self.meta.get('version')}, expected {_CACHE_VERSION}")
        self.index: dict[str, list] = json.loads((self.path / "index.json").read_text())
        # Content lookup: documents with equal tokens have equal states, so any of them will do.
        self._by_tokens = {tokens: (offset, length) for offset, length, tokens in self.index.values()}
        self.id_field = self.meta.get("id_field", "id") if id_field is _FROM_META else id_field
        self.dtype = getattr(torch, self.meta["dtype"])
        total, width = self.meta["total_tokens"], self.meta["hidden_size"]
        # numpy has no bfloat16: store raw 16-bit words and reinterpret them in torch.
        np_dtype = np.float32 if self.dtype == torch.float32 else np.uint16
        self._data = np.memmap(self.path / "hidden.bin", dtype=np_dtype, mode="r", shape=(max(total, 1), width))
        head = torch.load(self.path / "head.pt", map_location="cpu", weights_only=True)
        self.head = HeadSpec(head["weight"], head.get("bias"), self.meta["softcap"], self.meta["hidden_scale"])
        self._head_by_device: dict[torch.device, HeadSpec] = {}  # copied once per device

    # -- building -------------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        examples: Iterable[Mapping[str, object]],
        path: Union[str, Path],
        *,
        id_field: Optional[str] = "id",
        batch_size: int = 8,
        dtype: torch.dtype = torch.bfloat16,
        pad_token_id: int = 0,
    ) -> "HiddenStateCache":
        """Run ``model`` once over ``examples`` and store its final hidden states; returns the
        opened cache.

        Each example has ``input_ids`` and, unless ``id_field`` is None, its id in ``id_field``.
        ``id_field=None`` keys the cache by token content, and also accepts packed examples
        (``input_ids`` with ``seq_lengths``, the lengths of the documents packed into them, as in
        ``SFTTrainer(...).train_dataset`` with ``packing=True``): each document is run alone.
        """
        if dtype not in _STORAGE:
            raise ValueError(f"cache dtype must be one of {list(_STORAGE)}, got {dtype}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        device = next(model.parameters()).device
        index: dict[str, list] = {}
        offset, width = 0, None
        with open(path / "hidden.bin", "wb") as sink, eval_mode(model):
            for chunk in _batched(_new_documents(examples, id_field), batch_size):
                ids, mask, keys = _right_padded(chunk, pad_token_id, device)
                hidden = final_hidden_states(model, ids, mask)
                width = hidden.shape[-1]
                for row, key in enumerate(keys):
                    if key in index:
                        raise ValueError(f"duplicate example id {key!r} in {id_field!r}")
                    n = int(mask[row].sum())
                    states = hidden[row, :n].to(dtype).cpu()
                    raw = states.view(torch.int16) if dtype != torch.float32 else states
                    sink.write(raw.contiguous().numpy().tobytes())
                    index[key] = [offset, n, token_fingerprint(ids[row, :n])]
                    offset += states.shape[0]
        head = head_spec(model)
        torch.save({"weight": head.weight.detach().cpu(), "bias": None if head.bias is None else head.bias.detach().cpu()},
                   path / "head.pt")
        meta = dict(version=_CACHE_VERSION, dtype=_STORAGE[dtype], hidden_size=width or 0, total_tokens=offset,
                    n_examples=len(index), id_field=id_field, softcap=head.softcap, hidden_scale=head.hidden_scale,
                    vocab_size=head.weight.shape[0], head_fingerprint=_fingerprint(head.weight),
                    model_fingerprint=model_fingerprint(model))
        (path / "index.json").write_text(json.dumps(index))
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        return cls(path, id_field=id_field)

    # -- checking -------------------------------------------------------------------------------
    def check_matches(
        self,
        examples: Optional[Sequence[Mapping[str, object]]] = None,
        model: Optional[nn.Module] = None,
    ) -> None:
        """Raise ``ValueError`` if the cache was not built from these examples (ids and token
        content; for a cache keyed by content, the same set of documents) or with this teacher
        model (its weights and head)."""
        if examples is not None:
            documents = list(_documents(examples, self.id_field))
            if self.id_field is None:
                missing = [i for i, (key, _) in enumerate(documents) if key not in self.index]
                if missing:
                    raise ValueError(f"{len(missing)} of the {len(documents)} documents (the first is document "
                                     f"{missing[0]}) are not in cache {self.path}: rebuild the cache from this dataset")
                if len({key for key, _ in documents}) != self.meta["n_examples"]:
                    raise ValueError(f"cache {self.path} holds {self.meta['n_examples']} distinct documents, the dataset "
                                     f"has {len({key for key, _ in documents})}")
            elif len(documents) != self.meta["n_examples"]:
                raise ValueError(f"cache {self.path} holds {self.meta['n_examples']} examples, the dataset has "
                                 f"{len(documents)}")
            for key, input_ids in documents if self.id_field is not None else ():
                if key not in self.index:
                    raise ValueError(f"example id {key!r} is not in cache {self.path}")
                _, length, tokens = self.index[key]
                if length != len(input_ids):
                    raise ValueError(f"example {key!r} has {len(input_ids)} tokens but cache {self.path} stored {length}")
                if token_fingerprint(input_ids) != tokens:
                    raise ValueError(f"example {key!r} has other tokens than cache {self.path} was built from "
                                     "(another dataset or tokenizer with the same ids): rebuild the cache")
        if model is not None:
            head = head_spec(model)
            if tuple(head.weight.shape) != tuple(self.head.weight.shape):
                raise ValueError(f"model head {tuple(head.weight.shape)} != cached head {tuple(self.head.weight.shape)}")
            width = final_hidden_width(model)
            if width is not None and width != self.meta["hidden_size"]:
                raise ValueError(f"model hidden size {width} != cached hidden size {self.meta['hidden_size']}")
            if _fingerprint(head.weight) != self.meta["head_fingerprint"]:
                raise ValueError(f"model head weights differ from the head cache {self.path} was built with")
            if model_fingerprint(model) != self.meta["model_fingerprint"]:
                raise ValueError(f"model weights differ from those cache {self.path} was built with: its hidden "
                                 "states are another teacher's; rebuild the cache from this model")

    # -- lookup ---------------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, Tensor]) -> TeacherOutput:
        input_ids = batch["input_ids"]
        spans = [document_spans(batch, row) for row in range(input_ids.shape[0])]
        packed = any(len(row_spans) > 1 for row_spans in spans)
        out = torch.zeros(*input_ids.shape, self.meta["hidden_size"], dtype=self.dtype)
        if self.id_field is not None and self.id_field in batch and not packed:
            self._fill_by_id(batch, out)
        else:
            self._fill_by_tokens(input_ids, spans, out)
        head = self._head_on(input_ids.device)
        # Stored compactly, computed in the head's dtype (the fused loss wants them equal).
        return TeacherOutput(out.to(input_ids.device, head.weight.dtype), head)

    def _head_on(self, device: torch.device) -> HeadSpec:
        """The cached head on ``device``, copied there once (not once per batch)."""
        on = self._head_by_device
        if device not in on:
            bias = None if self.head.bias is None else self.head.bias.to(device)
            on[device] = HeadSpec(self.head.weight.to(device), bias, self.head.softcap, self.head.hidden_scale)
        return on[device]

    def _states(self, offset: int, length: int) -> Tensor:
        raw = torch.from_numpy(np.array(self._data[offset: offset + length]))  # copy: the map is read-only
        return raw if self.dtype == torch.float32 else raw.view(self.dtype)

    def _fill_by_id(self, batch: Mapping[str, Tensor], out: Tensor) -> None:
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        keys = batch[self.id_field]
        keys = keys.tolist() if isinstance(keys, Tensor) else list(keys)
        for row, key in enumerate(keys):
            key = str(key)
            if key not in self.index:
                raise KeyError(f"example id {key!r} is not in cache {self.path}")
            offset, length, tokens = self.index[key]
            n = int(mask[row].sum())
            if n != length:
                raise ValueError(f"example {key!r}: batch has {n} non-pad tokens, cache {self.path} stored {length}")
            if token_fingerprint(input_ids[row][mask[row]]) != tokens:
                raise ValueError(f"example {key!r}: the batch's tokens differ from those cache {self.path} stored")
            out[row, mask[row].cpu()] = self._states(offset, length)

    def _fill_by_tokens(self, input_ids: Tensor, spans: list[list[tuple[int, int]]], out: Tensor) -> None:
        for row, row_spans in enumerate(spans):
            for start, end in row_spans:
                if end - start < 2:
                    continue  # no target inside: its state is never read (also the pads of a padding-free row)
                found = self._by_tokens.get(token_fingerprint(input_ids[row, start:end]))
                if found is None:
                    raise ValueError(
                        f"row {row}, columns {start}..{end - 1} ({end - start} tokens): cache {self.path} holds no "
                        f"document with these tokens (looked up by content: the batch is packed or carries no "
                        f"{self.id_field!r} column). Build the cache from the examples as the trainer tokenizes "
                        "them, e.g. HiddenStateCache.build(teacher, trainer.train_dataset, path, id_field=None) for "
                        "TRL's SFTTrainer; packing that cuts documents (TRL's 'bfd_split', 'wrapped') or truncation "
                        "changes them")
                out[row, start:end] = self._states(*found)


def final_hidden_width(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)


def _documents(examples: Iterable[Mapping[str, object]], id_field: Optional[str]):
    """``(key, input_ids)`` per document: one per example, or one per packed document of an
    example with ``seq_lengths`` (only for a cache keyed by content, ``id_field=None``)."""
    for ex in examples:
        ids = ex["input_ids"]
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        lengths = ex.get("seq_lengths")
        if lengths is not None:
            if id_field is not None:
                raise ValueError(f"a packed example (seq_lengths {list(lengths)}) has no id per document: build the "
                                 "cache with id_field=None, which keys it by token content")
            if sum(lengths) != len(ids):
                raise ValueError(f"a packed example has {len(ids)} tokens but seq_lengths sum to {sum(lengths)}")
            start = 0
            for length in lengths:
                yield token_fingerprint(ids[start: start + length]), ids[start: start + length]
                start += length
        elif id_field is None:
            yield token_fingerprint(ids), ids
        else:
            if id_field not in ex:
                raise KeyError(f"example has no {id_field!r} field (its keys: {sorted(ex)}); pass id_field=None to "
                               "key the cache by token content")
            yield str(ex[id_field]), ids


def _new_documents(examples, id_field: Optional[str]):
    """:func:`_documents`, each document once when keyed by content (equal tokens, equal states)."""
    seen = set()
    for key, ids in _documents(examples, id_field):
        if id_field is None:
            if key in seen:
                continue
            seen.add(key)
        yield key, ids


def _batched(items: Iterable, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _right_padded(chunk: list[tuple[str, list]], pad: int, device) -> tuple[Tensor, Tensor, list[str]]:
    lengths = [len(ids) for _, ids in chunk]
    ids = torch.full((len(chunk), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (_, tokens) in enumerate(chunk):
        ids[row, : lengths[row]] = torch.as_tensor(tokens)
        mask[row, : lengths[row]] = 1
    return ids.to(device), mask.to(device), [key for key, _ in chunk]
