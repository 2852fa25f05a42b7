"""The ``sdft`` command: ``sdft train CONFIG.yaml [--key value ...]``, ``sdft eval``, ``sdft demo``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional


def _train(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="sdft train", description="Fine-tune a causal LM with the SDFT loss.")
    ap.add_argument("config", nargs="?", help="YAML config file")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args, overrides = ap.parse_known_args(argv)
    from .config import load_config

    cfg = load_config(args.config, overrides)  # fails on unknown keys before any model loads
    from .train import train

    final = train(cfg, resume=args.resume)
    print(f"final model: {final}")
    return 0


COMMANDS = {"train": _train}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: sdft {" + ",".join(COMMANDS) + "} ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from .config import ConfigError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as err:
        print(f"sdft {argv[0]}: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
