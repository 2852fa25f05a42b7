"""``python -m bench.train_step``: the training-step benchmark's command line
(:mod:`bench.train_step.cli`)."""

from .cli import main

raise SystemExit(main())
