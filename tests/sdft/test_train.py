"""`sdft train` end to end on a tiny local model: runs, resumes, recipe, errors, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdft.cli import main
from sdft.config import ConfigError, load_config
from sdft.data import DataError
from sdft.train import train
from tests.sdft.train_fixtures import workspace

REPO = Path(__file__).resolve().parents[2]


def _overrides(ws, out, **extra):
    base = {"model": ws["model"], "data.train_file": ws["data"], "output_dir": str(out), "batch_size": 4,
            "learning_rate": 3e-3, "logging_steps": 1, "save_steps": 1000, "seed": 0}
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(folder) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_train_end_to_end(tmp_path):
    ws = workspace(tmp_path)
    out = tmp_path / "run"
    assert main(["train", *_overrides(ws, out, epochs=8)]) == 0
    records = [r for r in _metrics(out) if "loss" in r]
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    for key in ("step", "loss", "ce", "kl", "learning_rate", "grad_norm", "peak_memory_mb"):
        assert key in records[-1], key
    assert any("tokens_per_s" in r for r in records)
    assert (out / "final" / "model.safetensors").exists()
    _weights(out / "final")  # loads back
    report = json.loads((out / "data_report.json").read_text())
    assert report["rows"] == 20 and report["kept"] == 20


def test_two_stage_recipe_teacher_is_stage1_and_first_kl_is_zero(tmp_path):
    ws = workspace(tmp_path)
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(ws, out, epochs=2, stage1_epochs=3, **{"data.known_field": "known"}))
    train(cfg)
    records = _metrics(out)
    stage1 = [r for r in records if r["stage"] == "stage1" and "loss" in r]
    stage2 = [r for r in records if r["stage"] == "stage2" and "loss" in r]
    assert stage1 and stage2
    assert all(r["kl"] == 0.0 for r in stage1)  # plain CE: no teacher in stage 1
    assert stage2[0]["kl"] == 0.0  # the teacher is the stage-1 model: identical at the first step
    assert stage2[-1]["kl"] > 0.0  # ... and the student moves away from it
    # The snapshot on disk is the stage-1 model (the teacher), the final model differs from it.
    s1, final = _weights(out / "stage1" / "final"), _weights(out / "final")
    assert any(not torch.equal(s1[n], final[n]) for n in s1)


# Runs `sdft train` and SIGKILLs its own process right after step 7 is logged: checkpoint-6 is
# then complete and step 7's work is lost, as when a job is killed between checkpoints.
_KILL_AFTER_STEP_7 = """
import os, signal, sys
from sdft import train as T
log = T.MetricsJsonl.on_log
def on_log(self, args, state, control, logs=None, **kw):
    log(self, args, state, control, logs=logs, **kw)
    if state.global_step >= 7:
        os.kill(os.getpid(), signal.SIGKILL)
T.MetricsJsonl.on_log = on_log
from sdft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    ws = workspace(tmp_path, n_facts=24)
    common = dict(max_steps=12, save_steps=3, sampling="random")
    straight = tmp_path / "straight"
    train(load_config(None, _overrides(ws, straight, **common)))

    killed = tmp_path / "killed"
    driver = tmp_path / "kill_after_step_7.py"
    driver.write_text(_KILL_AFTER_STEP_7)
    proc = subprocess.run([sys.executable, str(driver), "train", *_overrides(ws, killed, **common)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "train" / "checkpoint-6").is_dir() and not (killed / "final").exists()
    assert not (killed / "train" / "checkpoint-9").exists()

    train(load_config(None, _overrides(ws, killed, **common)), resume=True)
    a, b = _weights(straight / "final"), _weights(killed / "final")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_config_errors_name_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match="loss.kl_wieght: unknown key"):
        load_config(None, ["--model=x", "--data.train_file=y.jsonl", "--loss.kl_wieght=1"])
    with pytest.raises(ConfigError, match="batch_size: expected int, got 'eight'"):
        load_config(None, ["--model=x", "--data.train_file=y.jsonl", "--batch_size=eight"])
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: /does/not/exist\ndata: {train_file: y.jsonl}\nteacher: {sorce: cache}\n")
    # The CLI fails on the key, before trying to load the (missing) model.
    assert main(["train", str(cfg_file)]) == 2
    assert "teacher.sorce: unknown key" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="data.train_file or data.dataset"):
        load_config(None, ["--model=x"])
    # The loss settings are checked with the config, before any model loads.
    base = ["--model=x", "--data.train_file=y.jsonl"]
    with pytest.raises(ConfigError, match="loss.impl: one of auto, triton, triton_chunked, torch, reference, got 'cuda'"):
        load_config(None, base + ["--loss.impl=cuda"])
    with pytest.raises(ConfigError, match="loss: .*divergence.*'kl'"):
        load_config(None, base + ["--loss.divergence=kl"])
    with pytest.raises(ConfigError, match="loss: .*temperature"):
        load_config(None, base + ["--loss.temperature=0"])
    with pytest.raises(ConfigError, match="loss.kl_positions: one of labels, all, got 'every'"):
        load_config(None, base + ["--loss.kl_positions=every"])


def test_bad_rows_are_counted_and_too_many_fail(tmp_path):
    ws = workspace(tmp_path, n_facts=20, bad_rows=2)
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"2 of 22 rows are unusable.*1 missing fields, 1 empty"):
        train(load_config(None, _overrides(ws, out, max_steps=1)))
    train(load_config(None, _overrides(ws, out, max_steps=1, **{"data.max_bad_fraction": 0.2})))
    report = json.loads((out / "data_report.json").read_text())
    assert (report["missing_fields"], report["empty_response"], report["kept"]) == (1, 1, 20)


def test_truncation_is_reported(tmp_path):
    ws = workspace(tmp_path)
    out = tmp_path / "run"
    # Prompts are 6 tokens with BOS; max_length 6 leaves no room: every row is bad ...
    with pytest.raises(DataError, match="prompts too long"):
        train(load_config(None, _overrides(ws, out, max_steps=1, **{"data.max_length": 6})))


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    ws = workspace(tmp_path, n_facts=16)
    common = dict(max_steps=4, sampling="sequential")
    single = tmp_path / "single"
    train(load_config(None, _overrides(ws, single, **{**common, "batch_size": 8})))
    dist = tmp_path / "dist"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m", "sdft",
           "train", *_overrides(ws, dist, **{**common, "batch_size": 4})]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    la = [r["loss"] for r in _metrics(single) if "loss" in r]
    lb = [r["loss"] for r in _metrics(dist) if "loss" in r]
    assert len(la) == len(lb) == 4
    for x, y in zip(la, lb):
        assert x == pytest.approx(y, rel=1e-4)
    a, b = _weights(single / "final"), _weights(dist / "final")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def test_sharded_head_setups_are_refused():
    from types import SimpleNamespace

    from sdft.train import check_head_not_sharded

    plain = SimpleNamespace(fsdp="", deepspeed=None)
    check_head_not_sharded(plain, env={})  # DDP: fine
    check_head_not_sharded(SimpleNamespace(fsdp="shard_grad_op", deepspeed=None), env={})
    with pytest.raises(ValueError, match="FSDP FULL_SHARD.*use DDP"):
        check_head_not_sharded(SimpleNamespace(fsdp="full_shard auto_wrap", deepspeed=None), env={})
    with pytest.raises(ValueError, match="FSDP"):
        check_head_not_sharded(plain, env={"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "FULL_SHARD"})
    with pytest.raises(ValueError, match="ZeRO-3.*ZeRO-2"):
        check_head_not_sharded(SimpleNamespace(fsdp="", deepspeed={"zero_optimization": {"stage": 3}}), env={})
    with pytest.raises(ValueError, match="ZeRO-3"):
        check_head_not_sharded(plain, env={"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    check_head_not_sharded(SimpleNamespace(fsdp="", deepspeed={"zero_optimization": {"stage": 2}}), env={})


def test_chat_rows_mask_everything_but_the_reply(tmp_path):
    from transformers import AutoTokenizer

    from sdft.config import DataConfig
    from sdft.data import tokenize_rows

    ws = workspace(tmp_path)
    tok = AutoTokenizer.from_pretrained(ws["model"])
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant {% endif %}")
    rows = [{"messages": [{"role": "user", "content": "what color is kara ?"},
                          {"role": "assistant", "content": "red"}]},
            {"messages": [{"role": "user", "content": "what color is lovo ?"},
                          {"role": "assistant", "content": " "}]}]
    examples, report = tokenize_rows(rows, tok, DataConfig(max_bad_fraction=0.5))
    assert report.kept == 1 and report.empty_response == 1
    (ex,) = examples
    supervised = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert tok.decode(supervised).split() == ["red"]
    assert ex["labels"][: len(ex["labels"]) - len(supervised)] == [-100] * (len(ex["labels"]) - len(supervised))


def test_cached_teacher_source_trains(tmp_path):
    ws = workspace(tmp_path)
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(ws, out, max_steps=6, **{"teacher.source": "cache",
                                                                "teacher.cache_dtype": "float32"}))
    train(cfg)
    assert (out / "teacher_cache" / "meta.json").exists()
    records = [r for r in _metrics(out) if "kl" in r]
    # The cache holds the untrained model's states: at the first step teacher == student.
    assert records[0]["kl"] < 1e-6 and records[-1]["kl"] > records[0]["kl"]


def test_lora_with_adapter_disabled_teacher(tmp_path):
    pytest.importorskip("peft")
    ws = workspace(tmp_path)
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(ws, out, max_steps=6, learning_rate=1e-2, **{
        "lora.r": 4, "lora.target_modules": "q_proj,v_proj,o_proj", "teacher.source": "adapter_disabled"}))
    train(cfg)
    records = [r for r in _metrics(out) if "kl" in r]
    assert records[0]["kl"] == 0.0  # LoRA starts as the identity: student == base teacher
    assert records[-1]["kl"] > 0.0
    assert (out / "final" / "adapter_config.json").exists()  # adapters saved, base untouched
    with pytest.raises(ConfigError, match="adapter_disabled needs LoRA"):
        load_config(None, _overrides(ws, out, **{"teacher.source": "adapter_disabled"}))
    with pytest.raises(ConfigError, match="stage-1 snapshot"):
        load_config(None, _overrides(ws, out, stage1_epochs=1, **{
            "lora.r": 4, "teacher.source": "adapter_disabled", "data.known_field": "known"}))
