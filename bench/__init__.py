"""Microbenchmarks of ``fused_linear_sdft_loss`` against its peers, and the cost of a whole
SDFT training step against plain SFT.

Entry points::

    python -m bench.run --device cpu [--quick] [--out bench/results]   # results + report
    python -m bench.run --device cuda
    pytest bench/ --benchmark-json=out.json                            # pytest-benchmark
    python -m bench.train_step --device cpu                            # training-step cost
    python -m bench.gpu_check                                          # the five-minute GPU check

Every case computes the same objective, CE + lambda * tau^2 * KL(teacher || student) with
lambda = 1, tau = 0.5 and 20 % ignored labels, checks its loss and gradients against the
materialised reference before it is timed, and is reported against the floor: the plain
``torch.matmul`` GEMMs that any implementation must run (see :mod:`bench.floor`).

Modules: ``shapes`` (the grids), ``inputs`` (seeded problems), ``floor`` (GEMM floor and
FLOP counts), ``contenders`` (ours and the peers, behind one interface), ``agreement``
(oracle values and tolerances), ``measure_case`` (one case: memory, agreement, timing),
``plan`` (which cases run, in which order), ``estimate`` (dry-run time estimates),
``results`` (the results JSON and run metadata), ``run`` (the command line and the loop),
``report`` (markdown, targets and plots). The training-step benchmark: ``train_step`` (the
command line and the loop), ``train_step_cases`` (models and cases), ``train_step_measure``
(memory per case, interleaved timing), ``train_step_results`` and ``train_step_report``.
The five-minute GPU check (``python -m bench.gpu_check``, ``make gpu-check``): ``gpu_check``
(parts, budgets, deadline, files), ``gpu_check_setup``, ``gpu_check_tests``,
``gpu_check_headline``, ``gpu_check_training`` with ``fsdp_step``, and ``gpu_check_report``.
"""
