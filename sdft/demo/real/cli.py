"""``sdft demo real``: the paper's rows on SmolLM2-135M-Instruct and real-world facts, on a CPU.

    sdft demo real                       # one seed, every row: under an hour on 2 cores
    sdft demo real --seeds 0 1 2         # three seeds: three times the fine-tuning time
    sdft demo real --rows sft sdft --lambdas 0.5 1 2 --epochs 8
    sdft demo real --smoke               # a few facts and steps: every output, in minutes (tests)

Rows (``--rows``): sft, sdft (one per ``--lambdas``), attention_only, ffn_only, mlp_frozen,
known_only; see ``sdft.demo.methods``. The base model's classification and each seed's stage-1
snapshot are cached (``--cache-dir``), so a second study with other rows, lambdas or seeds
starts at stage 2. Outputs in ``--out``: results.json, table.md, accuracy_vs_epoch.png,
tradeoff.png, splits.json, study.log.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Optional

from sdft.demo.cli import add_study_flags, study_overrides


def parse_config(argv: Optional[list[str]] = None):
    """The :class:`~sdft.demo.real.experiment.StudyConfig` that ``sdft demo real ARGS`` runs."""
    from .experiment import StudyConfig

    ap = argparse.ArgumentParser(prog="sdft demo real", description=__doc__.splitlines()[0].replace("``", ""),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--smoke", action="store_true", help="a few facts, one epoch, three rows (tests)")
    ap.add_argument("--out", help="output folder (default runs/demo-real or runs/demo-real-smoke)")
    add_study_flags(ap, "where the classified base model and stage-1 snapshots are cached",
                    seeds_default=" (default 0)")
    ap.add_argument("--batch-size", type=int, help="examples per optimizer step")
    args = ap.parse_args(argv)
    overrides = study_overrides(args, batch_size=args.batch_size)
    return StudyConfig.smoke_config(**overrides) if args.smoke else replace(StudyConfig(), **overrides)


def main(argv: Optional[list[str]] = None) -> int:
    from .model import MISSING, missing_requirements

    cfg = parse_config(argv)
    missing = missing_requirements()
    if missing:
        print(f"sdft demo real: missing {', '.join(missing)}: {MISSING}")
        return 2
    from .experiment import run_study

    run_study(cfg)
    return 0
