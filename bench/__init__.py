"""Microbenchmarks of ``fused_linear_sdft_loss`` against its peers, and the cost of a whole
SDFT training step against plain SFT.

Entry points::

    python -m bench.loss --device cpu [--quick] [--out bench/results]   # results + report
    python -m bench.loss --device cuda
    pytest bench/loss --benchmark-json=out.json                          # pytest-benchmark
    python -m bench.train_step --device cpu                              # training-step cost
    python -m bench.gpu_check                                            # the five-minute GPU check

Every case of the loss benchmark computes the same objective, CE + lambda * tau^2 * KL(teacher
|| student) with lambda = 1, tau = 0.5 and 20 % ignored labels, checks its loss and gradients
against the materialised reference before it is timed, and is reported against the floor: the
plain ``torch.matmul`` GEMMs that any implementation must run (see :mod:`bench.loss.floor`).

One room per job, over one shared driver:

- ``driver``: what every benchmark shares: the common flags (``flags``), the run's bookkeeping
  and its results file rewritten after every case (``loop``, ``files``), the run's metadata
  (``meta``), fresh processes (``processes``), memory and time probes (``probes``), the
  ``--budget-s`` check of a dry run (``estimate``) and the reports' number formats (``fmt``);
- ``loss``: the loss microbenchmark: ``cli`` (command line and loop), ``shapes``, ``inputs``,
  ``floor``, ``contenders``, ``agreement``, ``measure_case``, ``plan``, ``estimate``,
  ``results``, ``targets``, ``report``, ``plots``, the pytest-benchmark suites, the real
  model's inputs (``real_inputs``) and the TRL backend comparison (``trl_backend``);
- ``train_step``: the training-step benchmark: ``cli``, ``plan``, ``cases``, ``measure``,
  ``results``, ``report``;
- ``gpu_check``: the five-minute GPU check: ``check`` (parts, budgets, deadline, files),
  ``environment``, ``pytest_parts``, ``headline``, ``training``, ``report``;
- ``memory``: memory and sharding of whole steps: ``hf_memory``, ``sharded_memory``,
  ``fsdp_step``.
"""
