"""What :func:`sdft.freezing.freeze` left trainable and frozen, by role, and what it saves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .freeze_masks import FrozenEntries
from .freeze_spec import REPORT_ROWS, ModelIndex

# AdamW keeps exp_avg and exp_avg_sq per trainable element, fp32 under mixed precision.
_ADAMW_STATE_BYTES = 8


@dataclass(frozen=True)
class GroupCount:
    """Trainable and frozen element counts of one report row."""

    name: str
    trainable: int
    frozen: int


@dataclass(eq=False)
class FreezeReport:
    """What ``freeze`` left trainable and frozen.

    ``rows`` partition the parameters by role (embeddings, lm_head, attention, ffn, norms,
    other; each parameter counted once, tied ones included), so ``trainable + frozen ==
    total == sum(p.numel() for p in model.parameters())``. ``frozen`` counts whole-tensor and
    masked elements; ``optimizer_state_bytes_saved`` only whole-tensor ones (8 bytes each,
    AdamW's two fp32 states), since a partially frozen tensor still has full optimizer state.
    ``partial`` lists the partially frozen parameters (what ``masked_optimizer`` guards).
    """

    rows: tuple[GroupCount, ...]
    total: int
    trainable: int
    frozen: int
    optimizer_state_bytes_saved: int
    frozen_tensors: tuple[str, ...]
    partial: tuple[FrozenEntries, ...]
    notes: tuple[str, ...]

    def __str__(self) -> str:
        lines = [f"{'group':<12}{'trainable':>14}{'frozen':>14}{'frozen %':>10}"]
        for row in (*self.rows, GroupCount("total", self.trainable, self.frozen)):
            size = row.trainable + row.frozen
            share = 100.0 * row.frozen / size if size else 0.0
            lines.append(f"{row.name:<12}{row.trainable:>14,}{row.frozen:>14,}{share:>9.1f}%")
        lines.append(f"optimizer state saved: {_format_bytes(self.optimizer_state_bytes_saved)} "
                     f"(AdamW, 2 fp32 states per fully frozen element)")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def build_report(index: ModelIndex, partial: list[FrozenEntries],
                  pre_frozen: int) -> FreezeReport:
    masked = {entries.name: entries.count for entries in partial}
    counts = {row: [0, 0] for row in REPORT_ROWS}  # row -> [trainable, frozen]
    for name, p in index.params.items():
        frozen = p.numel() if not p.requires_grad else masked.get(name, 0)
        counts[index.report_row[name]][0] += p.numel() - frozen
        counts[index.report_row[name]][1] += frozen
    rows = tuple(GroupCount(row, t, f) for row, (t, f) in counts.items() if t + f)
    whole = [name for name, p in index.params.items() if not p.requires_grad]
    whole_elements = sum(index.params[name].numel() for name in whole)
    return FreezeReport(
        rows=rows,
        total=sum(p.numel() for p in index.params.values()),
        trainable=sum(row.trainable for row in rows),
        frozen=sum(row.frozen for row in rows),
        optimizer_state_bytes_saved=whole_elements * _ADAMW_STATE_BYTES,
        frozen_tensors=tuple(whole),
        partial=tuple(partial),
        notes=tuple(_notes(index, masked, pre_frozen)),
    )


def _notes(index: ModelIndex, masked: dict[str, int], pre_frozen: int) -> Iterable[str]:
    for alias, canonical in index.aliases.items():
        if alias == canonical:
            continue
        if not index.params[canonical].requires_grad:
            yield f"{alias} is tied to {canonical} (the same Parameter): frozen too"
        elif canonical in masked:
            yield f"{alias} is tied to {canonical} (the same Parameter): the same entries frozen"
    if pre_frozen:
        yield (f"{pre_frozen:,} elements were already frozen before this call "
               f"(freeze never unfreezes)")
    if masked:
        yield (f"{sum(masked.values()):,} masked elements in {len(masked)} partially frozen "
               f"tensor(s) keep optimizer state; wrap the optimizer with masked_optimizer() so "
               f"weight decay and momentum cannot move them")


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
