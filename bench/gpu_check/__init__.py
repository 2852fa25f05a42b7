"""The five-minute GPU check (``python -m bench.gpu_check``, ``make gpu-check``): its parts,
budgets and deadline (:mod:`bench.gpu_check.check`)."""
