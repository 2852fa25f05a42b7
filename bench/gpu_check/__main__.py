"""``python -m bench.gpu_check``: the five-minute GPU check (:mod:`bench.gpu_check.check`)."""

from .check import main

raise SystemExit(main())
