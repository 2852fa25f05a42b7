"""The ``sdft`` command: ``sdft train CONFIG.yaml [--key value ...]``, ``sdft eval``, ``sdft demo [real]``."""

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
    from .recipe import train

    final = train(cfg, resume=args.resume)
    print(f"final model: {final}")
    return 0


def _demo(argv: list[str]) -> int:
    from .demo import main as demo_main

    return demo_main(argv)


def _eval(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="sdft eval", description="Closed-book QA exact match of a causal LM.")
    ap.add_argument("model", help="model folder (or hub id)")
    ap.add_argument("data", help="QA rows: .jsonl/.json/.csv/.parquet with question and answer fields")
    ap.add_argument("--question-field", default="question")
    ap.add_argument("--answer-field", default="answer")
    ap.add_argument("--classify", type=int, default=0, metavar="K",
                    help="also classify Known/Unknown/maybe with K sampled answers (SliCK)")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --classify")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args(argv)
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import DataConfig
    from .data import load_rows
    from .evaluate import accuracy, classify_knowledge

    rows = list(load_rows(DataConfig(train_file=args.data)))
    missing = [f for f in (args.question_field, args.answer_field) if rows and f not in rows[0]]
    if missing:
        raise SystemExit(f"sdft eval: {args.data} has no field(s) {missing}; columns: {sorted(rows[0])}")
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    keys = dict(question_key=args.question_field, answer_key=args.answer_field, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens)
    acc, correct, n = accuracy(model, tokenizer, rows, **keys)
    result = {"model": args.model, "data": args.data, "exact_match": acc, "correct": correct, "n": n}
    if args.classify:
        _, counts = classify_knowledge(model, tokenizer, rows, k=args.classify, temperature=args.temperature, **keys)
        result["knowledge"] = counts
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


COMMANDS = {"train": _train, "eval": _eval, "demo": _demo}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: sdft {" + ",".join(COMMANDS) + "} ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from .config import ConfigError
    from .data import DataError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as err:
        print(f"sdft {argv[0]}: config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:  # the data as configured cannot be used: the message says why, no traceback
        print(f"sdft {argv[0]}: data error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
