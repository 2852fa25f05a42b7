"""``sdft demo``: the paper's effect on an embedded toy world, on a CPU, in minutes.

    sdft demo                      # 3 seeds, every row, lambdas 0.25 0.5 1 2: under 15 min on 2 cores
    sdft demo --quick              # 1 seed, a smaller world, lambdas 0.5 and 2: under 2 minutes (CI)
    sdft demo --rows sft sdft --lambdas 0.5 0.75 --seeds 3 4 5      # a longer study
    sdft demo --layers 4 --rows sft attention_only ffn_only         # a deeper toy, same world
    sdft demo real                 # the same rows on a real pretrained model (sdft.demo.real)

Rows (``--rows``): sft, sdft (one per ``--lambdas``), attention_only, ffn_only, mlp_frozen,
known_only; see ``sdft.demo.methods``. Outputs in ``--out``: results.json, table.md,
accuracy_vs_epoch.png, tradeoff.png, demo.log.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Optional

from .experiment import DemoConfig, run_demo
from .methods import ROW_NAMES


def add_study_flags(ap: argparse.ArgumentParser, cache_help: str, rows_default: str = "",
                    seeds_default: str = "") -> None:
    """The flags both demos take (the toy's and ``sdft demo real``'s): the rows, their settings,
    the workers, the output and cache folders."""
    ap.add_argument("--rows", nargs="+", choices=ROW_NAMES, metavar="ROW",
                    help=f"which rows to run, from {', '.join(ROW_NAMES)}{rows_default}")
    ap.add_argument("--lambdas", type=float, nargs="+", metavar="LAMBDA", help="SDFT kl_weights, one row each")
    ap.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help=f"fine-tuning seeds{seeds_default}")
    ap.add_argument("--epochs", type=float, help="stage-2 epochs")
    ap.add_argument("--lr", type=float, help="learning rate of stages 1 and 2")
    ap.add_argument("--temperature", type=float, help="tau of the SDFT rows")
    ap.add_argument("--workers", type=int, help="processes side by side, one thread each")
    ap.add_argument("--cache-dir", help=cache_help)


def study_overrides(args: argparse.Namespace, **more) -> dict:
    """The config fields that :func:`add_study_flags`' flags (and ``more``) set, where given."""
    given = {"out_dir": args.out, "rows": args.rows and tuple(args.rows),
             "kl_weights": args.lambdas and tuple(args.lambdas), "seeds": args.seeds and tuple(args.seeds),
             "stage2_epochs": args.epochs, "learning_rate": args.lr, "temperature": args.temperature,
             "workers": args.workers, "cache_dir": args.cache_dir, **more}
    return {name: value for name, value in given.items() if value is not None}


def parse_config(argv: Optional[list[str]] = None) -> DemoConfig:
    """The :class:`DemoConfig` that ``sdft demo ARGS`` runs."""
    ap = argparse.ArgumentParser(prog="sdft demo", description=__doc__.splitlines()[0].replace("``", ""),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--quick", action="store_true", help="one seed, a smaller world, two lambdas (CI)")
    ap.add_argument("--out", help="output folder (default runs/demo or runs/demo-quick)")
    add_study_flags(ap, "where the pretrained toy model is cached", rows_default=" (default: all)")
    ap.add_argument("--eval-every", type=int, metavar="EPOCHS", help="stage-2 epochs between evaluations")
    ap.add_argument("--layers", type=int, help="decoder layers of the toy model (pretrained once, cached)")
    args = ap.parse_args(argv)
    overrides = study_overrides(args, eval_every_epochs=args.eval_every, layers=args.layers)
    return DemoConfig.quick_config(**overrides) if args.quick else replace(DemoConfig(), **overrides)


def main(argv: Optional[list[str]] = None) -> int:
    if argv and argv[0] == "real":
        from .real.cli import main as real_main

        return real_main(argv[1:])
    run_demo(parse_config(argv))
    return 0
