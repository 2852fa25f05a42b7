"""The demo beside the library: the paper's experiment on a generated toy world, on a CPU.

It uses the library only through its public API, as any user would, in separate modules:

- :mod:`~sdft.demo.world`: the toy world (name-keyed entities, facts, splits), from a ``WorldSpec``;
- :mod:`~sdft.demo.tokenizer`: its word-level tokenizer and the shared prompt format;
- :mod:`~sdft.demo.pretrain`: a tiny Llama pretrained on the old facts (cached);
- :mod:`~sdft.demo.scoring`: exact match on the splits by one teacher-forced pass;
- :mod:`~sdft.demo.methods`: the rows of the table (SFT, SDFT per lambda, freezing rows, control);
- :mod:`~sdft.demo.finetune`: one run, stage 1 then stage 2, with ``sdft train``'s Trainer;
- :mod:`~sdft.demo.experiment`: preparation, the runs in worker processes, the outputs;
- :mod:`~sdft.demo.report`: the table, the lambda frontier, the plots;
- :mod:`~sdft.demo.progress`: the one-line console display and the log file;
- :mod:`~sdft.demo.cli`: ``sdft demo``.
"""

__all__ = ["DemoConfig", "main", "run_demo"]


def __getattr__(name):
    # The experiment imports transformers' Trainer; the world and tokenizer modules do not
    # need it, so it loads only when asked for.
    if name in ("DemoConfig", "run_demo"):
        from . import experiment

        return getattr(experiment, name)
    if name == "main":
        from .cli import main

        return main
    raise AttributeError(f"module 'sdft.demo' has no attribute {name!r}")
