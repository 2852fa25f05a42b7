"""Time and memory of the forward+backward group against V and against N, as PNG files.

For each axis the plotted series holds the other two dimensions fixed; where no two shapes
share them (the GPU heads differ in D and V together), only N is held fixed for the V plot.
The series containing the headline shape is preferred.
"""

from __future__ import annotations

from pathlib import Path

from .shapes import FWD_BWD

_OTHER = {"V": (("N", "D"), ("N",)), "N": (("D", "V"),)}


def _series(cases: list, x: str):
    """(fixed dims dict, cases) of the best series along ``x``, or None."""
    for fixed in _OTHER[x]:
        groups = {}
        for c in cases:
            groups.setdefault(tuple(c[k] for k in fixed), []).append(c)
        good = [(k, v) for k, v in groups.items() if len({c[x] for c in v}) >= 2]
        if good:
            good.sort(key=lambda kv: (not any(c.get("headline") for c in kv[1]), -len({c[x] for c in kv[1]})))
            key, members = good[0]
            return dict(zip(fixed, key)), members
    return None


def write_plots(results: dict, out_dir: Path, stem: str) -> list:
    """Write ``<stem>-vs-V.png`` and ``<stem>-vs-N.png`` where a series exists; returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .contenders import CONTENDERS

    cases = [c for c in results["cases"] if c["group"] == FWD_BWD and c["status"] == "ok"]
    written = []
    for x in ("V", "N"):
        found = _series(cases, x)
        if found is None:
            continue
        fixed, members = found
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name in dict.fromkeys(c["contender"] for c in members):
            pts = sorted(((c[x], c) for c in members if c["contender"] == name), key=lambda p: p[0])
            xs = [p[0] for p in pts]
            # One colour per contender in both panels (the floor has no memory line); ours'
            # pinned implementations (CUDA) dash-dotted beside ours' default.
            colour = f"C{list(CONTENDERS).index(name) % 10}" if name in CONTENDERS else None
            line = "--" if name == "floor" else ("-." if name.startswith("ours_") else "-")
            style = dict(marker="o", color=colour, linestyle=line,
                         label=CONTENDERS[name].title if name in CONTENDERS else name)
            ax_t.plot(xs, [c["median_s"] for _, c in pts], **style)
            if name != "floor":
                ax_m.plot(xs, [max(c["mem_bytes"], 1024) / 2**20 for _, c in pts], **style)
        fixed_txt = ", ".join(f"{k}={v}" for k, v in fixed.items())
        meta = results["meta"]
        for ax, ylabel in ((ax_t, "time per call, median (s)"), (ax_m, "peak memory growth (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_title(f"time vs {x} ({fixed_txt})", fontsize=10)
        ax_m.set_title(f"memory vs {x} ({fixed_txt})", fontsize=10)
        ax_t.legend(fontsize=8)
        fig.suptitle(f"{meta['device']} {meta['dtype']}, forward + backward, {meta['date']}", fontsize=11)
        fig.tight_layout()
        path = Path(out_dir) / f"{stem}-vs-{x}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
