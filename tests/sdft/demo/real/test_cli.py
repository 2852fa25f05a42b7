"""``sdft demo real``'s command line: the toy demo's study flags (one definition) and its own."""

from __future__ import annotations

import pytest

from sdft.demo.real.cli import parse_config as parse_real
from sdft.demo.real.experiment import StudyConfig


def test_the_real_studys_command_line_sets_the_same_fields():
    """``sdft demo real`` takes the toy's study flags (one definition) and its own batch size."""
    cfg = parse_real(["--rows", "sft", "sdft", "--lambdas", "0.25", "--seeds", "1", "2", "--epochs", "3",
                      "--lr", "3e-5", "--temperature", "0.7", "--workers", "1", "--cache-dir", "c", "--out", "o",
                      "--batch-size", "4"])
    assert (cfg.rows, cfg.kl_weights, cfg.seeds) == (("sft", "sdft"), (0.25,), (1, 2))
    assert (cfg.stage2_epochs, cfg.learning_rate, cfg.temperature, cfg.workers, cfg.cache_dir, cfg.out_dir,
            cfg.batch_size) == (3, 3e-5, 0.7, 1, "c", "o", 4)
    assert parse_real([]) == StudyConfig()
    assert parse_real(["--smoke", "--seeds", "5"]) == StudyConfig.smoke_config(seeds=(5,))
    with pytest.raises(SystemExit):
        parse_real(["--eval-every", "1"])  # the toy's alone
