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
from sdft.recipe import train
from tests.sdft.train_fixtures import free_port, workspace

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


# Runs `sdft train` and SIGKILLs its own process at one point named by SDFT_TEST_KILL:
#   "step:STAGE:N"       right after step N of STAGE is logged (between two checkpoints);
#   "weights:PATH"       halfway through writing the weights file of folder PATH;
#   "state:PATH"         after PATH's weights and optimizer, before its trainer state.
_KILLING_DRIVER = """
import os, signal, sys
kind, _, where = os.environ["SDFT_TEST_KILL"].partition(":")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

import safetensors.torch as st
import transformers.modeling_utils as mu
from transformers.trainer_callback import TrainerState
from sdft import recipe

def half_written(original):
    def save_file(tensors, filename, metadata=None):
        if kind == "weights" and os.path.dirname(os.path.abspath(filename)) == where:
            data = st.save(tensors, metadata=metadata)
            with open(filename, "wb") as f:
                f.write(data[: len(data) // 2])
            die()
        return original(tensors, filename, metadata=metadata)
    return save_file
st.save_file = half_written(st.save_file)
mu.safe_save_file = half_written(mu.safe_save_file)

save_state = TrainerState.save_to_json
def save_to_json(self, path):
    if kind == "state" and os.path.dirname(os.path.abspath(path)) == where:
        die()
    save_state(self, path)
TrainerState.save_to_json = save_to_json

log = recipe.MetricsJsonl.on_log
def on_log(self, args, state, control, logs=None, **kw):
    log(self, args, state, control, logs=logs, **kw)
    stage, _, step = where.partition(":")
    if kind == "step" and self.stage == stage and state.global_step >= int(step):
        die()
recipe.MetricsJsonl.on_log = on_log

from sdft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kills_during_training_and_saves_lose_nothing(tmp_path):
    """A run killed at each point below, resumed each time, ends with the weights of a run
    never interrupted: between checkpoints, halfway through a checkpoint's weights, between
    its weights and its trainer state, and halfway through the stage-1 and final results."""
    ws = workspace(tmp_path, n_facts=24)
    common = dict(stage1_epochs=2, epochs=3, save_steps=3, sampling="random", **{"data.known_field": "known"})
    straight = tmp_path / "straight"
    train(load_config(None, _overrides(ws, straight, **common)))

    run = tmp_path / "killed"
    driver = tmp_path / "killing_driver.py"
    driver.write_text(_KILLING_DRIVER)
    kills = [f"weights:{run / 'stage1' / 'final.partial'}", "step:stage2:7",
             f"weights:{run / 'stage2' / 'checkpoint-9'}", f"state:{run / 'stage2' / 'checkpoint-12'}",
             f"weights:{run / 'final.partial'}"]
    for kill in kills:
        cmd = [sys.executable, str(driver), "train", *_overrides(ws, run, **common), "--resume"]
        proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, SDFT_TEST_KILL=kill), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == -signal.SIGKILL, f"{kill}: {proc.stderr[-2000:]}"
        assert not (run / "final").exists(), kill
    assert (run / "stage1" / "final").is_dir()
    train(load_config(None, _overrides(ws, run, **common)), resume=True)
    a, b = _weights(straight / "final"), _weights(run / "final")
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
    with pytest.raises(ConfigError, match="loss: impl must be one of .*'triton_chunked'.*, got 'cuda'"):
        load_config(None, base + ["--loss.impl=cuda"])
    with pytest.raises(ConfigError, match="loss: .*divergence.*'kl'"):
        load_config(None, base + ["--loss.divergence=kl"])
    with pytest.raises(ConfigError, match="loss: .*temperature"):
        load_config(None, base + ["--loss.temperature=0"])
    with pytest.raises(ConfigError, match="loss: kl_positions must be one of .*'labels', 'all'.*, got 'every'"):
        load_config(None, base + ["--loss.kl_positions=every"])
    # Every LossOptions field is a key of the section, with LossOptions' defaults.
    cfg = load_config(None, base + ["--loss.jsd_beta=0.25", "--loss.ignore_index=-1", "--loss.softcap=30",
                                    "--loss.validate_labels=false", "--loss.divergence=jsd"])
    assert (cfg.loss.jsd_beta, cfg.loss.ignore_index, cfg.loss.softcap, cfg.loss.validate_labels) == (0.25, -1, 30.0, False)
    from sdft_kernels import LossOptions

    assert load_config(None, base).loss.options() == LossOptions()


def test_every_loss_setting_reaches_the_loss(tmp_path, monkeypatch):
    """Each key of the ``loss:`` section, set away from its default, is where SDFTLoss keeps it,
    and the recipe builds its loss from the section (chunk_size included)."""
    import dataclasses

    from sdft import recipe
    from sdft.config import LossConfig
    from sdft.loss import SDFTLoss

    changed = dict(ce_weight=0.5, kl_weight=0.25, temperature=2.0, divergence="jsd", jsd_beta=0.3, ignore_index=-1,
                   reduction="sum", validate_labels=False, logits_dtype="input", student_softcap=20.0,
                   teacher_softcap=40.0, student_logit_scale=0.5, teacher_logit_scale=2.0, loss_type="dft",
                   metrics=True, kl_positions="all", impl="torch", chunk_size=7)
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    assert fields == set(changed) | {"softcap"}, "give the new loss key a value here"  # softcap: excludes the pair
    cfg = load_config(None, ["--model=x", "--data.train_file=y.jsonl"] + [f"--loss.{k}={v}" for k, v in changed.items()])
    loss = SDFTLoss.from_config(cfg.loss)
    got = {**dataclasses.asdict(loss.options), "kl_positions": loss.kl_positions, "impl": loss.impl,
           "chunk_size": loss.chunk_size}
    assert got == {**changed, "softcap": None}
    with pytest.raises(ConfigError, match="loss: chunk_size must be a positive int or None, got 0"):
        load_config(None, ["--model=x", "--data.train_file=y.jsonl", "--loss.chunk_size=0"])

    ws = workspace(tmp_path)
    losses = []
    run_stage = recipe._run_stage
    monkeypatch.setattr(recipe, "_run_stage", lambda cfg, name, student, teacher, loss, *a: losses.append(loss)
                        or run_stage(cfg, name, student, teacher, loss, *a))
    train(load_config(None, _overrides(ws, tmp_path / "run", max_steps=1, **{"loss.chunk_size": 5,
                                                                            "loss.kl_weight": 0.5})))
    ((loss,),) = [losses]
    assert (loss.chunk_size, loss.options.kl_weight) == (5, 0.5)


def test_heldout_known_rows_are_scored_during_training_as_forgetting(tmp_path):
    """eval.heldout_file: the student's exact-match accuracy on those rows is logged at the
    start, every eval.steps and at the end, equal to the accuracy of the model at that step
    (the initial model, the saved final one), with its drop since the start as forgetting."""
    from transformers import AutoTokenizer

    from sdft.evaluate import accuracy

    ws = workspace(tmp_path)
    rows = [json.loads(line) for line in Path(ws["data"]).read_text().splitlines()][:6]
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    train(load_config(None, _overrides(ws, out, max_steps=40, **{"eval.heldout_file": str(heldout),
                                                                "eval.steps": 15})))
    scored = [r for r in _metrics(out) if "old_facts" in r]
    assert [r["step"] for r in scored] == [0, 15, 30, 40]
    assert all(r["old_facts_n"] == 6 and r["stage"] == "train" for r in scored)
    for r in scored:
        assert r["forgetting"] == pytest.approx(scored[0]["old_facts"] - r["old_facts"])
    qa = [{"question": row["prompt"], "answer": row["response"]} for row in rows]
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    for record, folder in ((scored[0], ws["model"]), (scored[-1], out / "final")):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert record["old_facts"] == accuracy(model, tokenizer, qa, max_new_tokens=32)[0], folder
    assert scored[-1]["old_facts"] > 0  # the rows were trained on: the score moved

    base = ["--model=x", f"--data.train_file={ws['data']}"]
    with pytest.raises(ConfigError, match="eval.heldout_file: no such file 'nope.jsonl'"):
        load_config(None, base + ["--eval.heldout_file=nope.jsonl"])
    with pytest.raises(ConfigError, match="eval.heldout_file: .*FSDP and DeepSpeed"):
        load_config(None, base + [f"--eval.heldout_file={heldout}", "--fsdp=true"])
    heldout.write_text(json.dumps({"prompt": "what color is kara ?"}) + "\n")
    with pytest.raises(DataError, match="eval.heldout_file: row 1 of .* needs 'prompt' and a non-empty 'response'"):
        train(load_config(None, _overrides(ws, tmp_path / "bad", **{"eval.heldout_file": str(heldout)})))


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "sdft", "train", *_overrides(ws, dist, **{**common, "batch_size": 4})]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    la = [r["loss"] for r in _metrics(single) if "loss" in r]
    lb = [r["loss"] for r in _metrics(dist) if "loss" in r]
    assert len(la) == len(lb) == 4, (la, lb)
    assert lb == pytest.approx(la, rel=1e-4)
    a, b = _weights(single / "final"), _weights(dist / "final")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)


def test_sharding_keys_reach_the_training_arguments(tmp_path, monkeypatch):
    """fsdp / fsdp_config / deepspeed go to the Trainer's arguments of those names (a CPU cannot
    set FSDP up, so the arguments are captured, not built); bad combinations fail at load."""
    import sdft.recipe as recipe

    fsdp_json = tmp_path / "fsdp.json"
    fsdp_json.write_text('{"cpu_offload": true}')
    captured = {}
    monkeypatch.setattr(recipe, "TrainingArguments", lambda **kwargs: captured.update(kwargs) or kwargs)
    base = ["--model=m", "--data.train_file=d.jsonl", f"--output_dir={tmp_path}"]
    recipe.training_arguments(load_config(None, base + ["--fsdp=true", f"--fsdp_config={fsdp_json}"]), tmp_path, 1.0)
    assert (captured["fsdp"], captured["fsdp_config"], captured["deepspeed"]) == (True, str(fsdp_json), None)
    recipe.training_arguments(load_config(None, base + [f"--deepspeed={fsdp_json}"]), tmp_path, 1.0)
    assert (captured["fsdp"], captured["deepspeed"]) == (None, str(fsdp_json))
    with pytest.raises(ConfigError, match="fsdp and deepspeed: choose one"):
        load_config(None, base + ["--fsdp=true", f"--deepspeed={fsdp_json}"])
    with pytest.raises(ConfigError, match="deepspeed: no such file"):
        load_config(None, base + ["--deepspeed=missing.json"])
    with pytest.raises(ConfigError, match="fsdp_config: set fsdp: true"):
        load_config(None, base + [f"--fsdp_config={fsdp_json}"])


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


# Every TrainConfig field is either a training argument, with the TrainingArguments attribute it
# must reach and a value unlike the default, or listed below with what it configures instead.
TRAINING_ARGUMENTS = {
    "batch_size": ("per_device_train_batch_size", 3),
    "grad_accum": ("gradient_accumulation_steps", 5),
    "learning_rate": ("learning_rate", 0.0123),
    "lr_schedule": ("lr_scheduler_type", "cosine"),
    "warmup_ratio": ("warmup_steps", 0.25),
    "weight_decay": ("weight_decay", 0.37),
    "epochs": ("num_train_epochs", 3.5),
    "max_steps": ("max_steps", 17),
    "logging_steps": ("logging_steps", 7),
    "save_steps": ("save_steps", 11),
    "save_total_limit": ("save_total_limit", 4),
    "seed": ("seed", 123),
    "sampling": ("train_sampling_strategy", "sequential"),
    "output_dir": ("output_dir", None),  # <output_dir>/<stage>, checked below
}
NOT_TRAINING_ARGUMENTS = {
    "model", "tokenizer", "dtype", "gradient_checkpointing",  # the model load (load_student)
    "check_head",  # SDFTModel's one-time comparison with the model's own forward
    "data", "loss", "teacher", "lora", "eval", "freeze", "train_only",  # their own sections and steps
    "stage1_epochs",  # the epochs of stage 1's TrainingArguments
    "fsdp", "fsdp_config", "deepspeed",  # training arguments: test_sharding_keys_reach_the_training_arguments
}


def test_every_training_setting_reaches_the_trainer_and_its_optimizer(tmp_path):
    import dataclasses

    from datasets import Dataset

    from sdft.config import TrainConfig
    from sdft.data import PadCollator
    from sdft.recipe import training_arguments
    from sdft.trainer import build_trainer
    from tests.sdft.tiny_models import tiny_model

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields == set(TRAINING_ARGUMENTS) | NOT_TRAINING_ARGUMENTS, "classify the new TrainConfig field"
    values = {k: v for k, (_, v) in TRAINING_ARGUMENTS.items() if v is not None}
    cfg = load_config(None, [f"--{k}={v}" for k, v in values.items()]
                      + ["--model=m", "--data.train_file=d.jsonl", f"--output_dir={tmp_path}"])
    args = training_arguments(cfg, tmp_path / "stage2", cfg.epochs)
    for name, (attr, value) in TRAINING_ARGUMENTS.items():
        got = getattr(args, attr)
        expected = str(tmp_path / "stage2") if name == "output_dir" else value
        assert str(getattr(got, "value", got)) == str(expected), f"{name} -> {attr}: {got!r}"

    trainer = build_trainer(tiny_model("llama"), args, Dataset.from_list([{"input_ids": [3, 4, 5]}]), PadCollator(0))
    groups = trainer.create_optimizer().param_groups  # built when the Trainer builds its optimizer
    assert {g["lr"] for g in groups} == {0.0123}
    assert max(g["weight_decay"] for g in groups) == 0.37  # matrices decay, 1-D tensors do not
    assert all(g["betas"] == (args.adam_beta1, args.adam_beta2) and g["eps"] == args.adam_epsilon for g in groups)


def test_weight_decay_changes_the_result(tmp_path):
    ws = workspace(tmp_path)
    finals = []
    for decay in (0.0, 0.5):
        out = tmp_path / f"wd{decay}"
        train(load_config(None, _overrides(ws, out, max_steps=2, weight_decay=decay)))
        finals.append(_weights(out / "final"))
    changed = [n for n in finals[0] if not torch.equal(finals[0][n], finals[1][n])]
    assert any("proj" in n for n in changed), changed


def test_runs_that_would_train_nothing_are_refused():
    base = ["--model=x", "--data.train_file=y.jsonl"]
    with pytest.raises(ConfigError, match="epochs: must be > 0.*got 0"):
        load_config(None, base + ["--epochs=0"])
    with pytest.raises(ConfigError, match="max_steps: must be > 0.*got 0"):
        load_config(None, base + ["--max_steps=0"])
    load_config(None, base + ["--epochs=0", "--max_steps=3"])  # steps instead of epochs: fine


def test_data_errors_come_before_the_model_loads(tmp_path):
    """The model path does not exist: every data error must be reported instead."""
    missing_model = str(tmp_path / "no-model")
    ws = workspace(tmp_path)
    cases = {"missing.jsonl": None, "empty.jsonl": "", "blank.jsonl": "\n\n",
             "broken.json": '[{"prompt": "a", "response": "b"}, {"prompt": ',
             "all_bad.jsonl": '{"prompt": "what color is kara ?"}\n{"q": 1}\n'}
    expected = {"missing.jsonl": "does not exist", "empty.jsonl": "has no rows", "blank.jsonl": "has no rows",
                "broken.json": "cannot read .*broken.json as json", "all_bad.jsonl": "no usable row"}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        cfg = load_config(None, _overrides(ws, tmp_path / "run", max_steps=1, model=missing_model,
                                           tokenizer=ws["model"], **{"data.train_file": str(path)}))
        with pytest.raises(DataError, match=expected[name]):
            train(cfg)


def test_the_cli_reports_a_data_error_in_one_line(tmp_path, capsys):
    """As for a config error: one line on stderr naming the problem, exit status 2, no traceback."""
    ws = workspace(tmp_path)
    bad = tmp_path / "all_bad.jsonl"
    bad.write_text('{"prompt": "what color is kara ?"}\n{"q": 1}\n')
    capsys.readouterr()  # what building the workspace printed
    assert main(["train", *_overrides(ws, tmp_path / "run", max_steps=1, **{"data.train_file": str(bad)})]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdft train: data error: no usable row: 2 rows") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_loss_ignore_index_reaches_the_data(tmp_path):
    """loss.ignore_index labels the prompt and padding tokens: a run with -1 trains exactly as one
    with -100 (the value is only the label of what is not supervised). A value that is a token
    id is refused: responses containing it would lose supervision."""
    ws = workspace(tmp_path)
    finals = {}
    for ignore_index in (-100, -1):
        out = tmp_path / f"run{ignore_index}"
        assert main(["train", *_overrides(ws, out, max_steps=2, **{"loss.ignore_index": ignore_index})]) == 0
        finals[ignore_index] = _weights(out / "final")
        assert json.loads((out / "config.json").read_text())["loss"]["ignore_index"] == ignore_index
    start = _weights(ws["model"])
    assert any(not torch.equal(finals[-1][n], start[n]) for n in start)  # it trained
    for name, param in finals[-100].items():
        assert torch.equal(finals[-1][name], param), name
    with pytest.raises(DataError, match="loss.ignore_index 5 is a token id of the tokenizer"):
        train(load_config(None, _overrides(ws, tmp_path / "run5", max_steps=1, **{"loss.ignore_index": 5})))


def test_a_malformed_line_is_named_and_counted_as_a_bad_row(tmp_path):
    ws = workspace(tmp_path)
    data = Path(ws["data"])
    lines = data.read_text().splitlines()
    lines.insert(3, '{"prompt": "what color is kara ?", "response": "red"')  # unclosed: line 4
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"1 of 21 rows are unusable.*1 malformed.*facts.jsonl:4: not valid JSON"):
        train(load_config(None, _overrides(ws, tmp_path / "run", max_steps=1)))
    out = tmp_path / "run2"
    train(load_config(None, _overrides(ws, out, max_steps=1, **{"data.max_bad_fraction": 0.1})))
    report = json.loads((out / "data_report.json").read_text())
    assert (report["malformed"], report["kept"]) == (1, 20)


def test_reloaded_stage1_student_keeps_the_model_options(tmp_path, monkeypatch):
    from sdft import recipe

    ws = workspace(tmp_path)
    out = tmp_path / "run"
    common = dict(stage1_epochs=1, max_steps=2, gradient_checkpointing="true", **{"data.known_field": "known"})
    train(load_config(None, _overrides(ws, out, **common)))
    (out / "final").rename(tmp_path / "first-final")
    students = []
    run_stage = recipe._run_stage
    monkeypatch.setattr(recipe, "_run_stage", lambda cfg, name, student, *a: students.append(student)
                        or run_stage(cfg, name, student, *a))
    train(load_config(None, _overrides(ws, out, **common)), resume=True)  # stage 1 is loaded from disk
    (student,) = students
    assert getattr(student, "is_activation_checkpointing", None) or student.is_gradient_checkpointing


def test_a_cache_of_other_data_is_refused_not_reused(tmp_path):
    ws = workspace(tmp_path)
    cache = tmp_path / "cache"
    base = dict(max_steps=1, **{"teacher.source": "cache", "teacher.cache_dir": str(cache)})
    train(load_config(None, _overrides(ws, tmp_path / "a", **base)))
    data = Path(ws["data"])  # same rows, ids and token counts; other colours
    data.write_text(data.read_text().replace('"red"', '"TMP"').replace('"blue"', '"red"').replace('"TMP"', '"blue"'))
    with pytest.raises(ValueError, match="other tokens than cache"):
        train(load_config(None, _overrides(ws, tmp_path / "b", **base)))
