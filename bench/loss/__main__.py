"""``python -m bench.loss``: the loss microbenchmark's command line (:mod:`bench.loss.cli`)."""

from .cli import main

raise SystemExit(main())
