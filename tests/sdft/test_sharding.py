"""The loss under sharding wrappers (FSDP2, FSDP1 FULL_SHARD, DeepSpeed ZeRO-3): two ``torchrun``
processes over gloo, each step equal to the materialised objective over both processes' rows
(loss, every gradient, the weights after two optimizer steps), and resuming from a sharded
checkpoint after the processes were killed."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sdft.teacher import HiddenStateCache
from tests.sdft import sharded_run as run
from tests.sdft.train_fixtures import free_port

REPO = Path(__file__).resolve().parents[2]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install 'sdft-kernels[deepspeed]'; on a machine "
    "without a GPU it runs with DS_ACCELERATOR=cpu and builds a CPU op with g++)")
# float64: elementwise. float32 (ZeRO-3 on a CPU): against the float64 oracle, the largest
# difference relative to the tensor's largest entry (sums across processes round otherwise).
FLOAT64_TOLERANCE = dict(rtol=1e-10, atol=1e-12)
FLOAT32_TOLERANCE = 1e-6


DEFAULTS = {"form": "sdft_model", "teacher": "sharded", "dtype": "float64"}
# Each case: a wrapper, the form of the step, the teacher (tests/sdft/sharded_run.py).
TORCH_CASES = {
    "fsdp2-sdft-model": dict(wrapper="fsdp2"),
    "fsdp2-plain": dict(wrapper="fsdp2", form="plain"),
    "fsdp2-offload": dict(wrapper="fsdp2_offload"),
    "fsdp2-head-unit-lora": dict(wrapper="fsdp2_head_unit", form="plain", teacher="adapter"),
    "fsdp1-sdft-model": dict(wrapper="fsdp1"),
    "fsdp1-plain-cache": dict(wrapper="fsdp1", form="plain", teacher="cache"),
}
ZERO3_CASES = {
    "zero3-sdft-model": dict(wrapper="zero3", dtype="float32"),
    "zero3-plain-lora": dict(wrapper="zero3", form="plain", teacher="adapter", dtype="float32"),
}


def launch(folder: Path, phase: str, cases: dict) -> subprocess.CompletedProcess:
    settings = {"phase": phase, "cases": {name: {**DEFAULTS, **case} for name, case in cases.items()}}
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "tests.sdft.sharded_run", json.dumps(settings), str(folder)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def kill_and_resume(folder: Path, cases: dict) -> Path:
    """Every case: step 1 and a sharded checkpoint; both processes killed during step 2; a new
    launch resumes each case from its checkpoint and takes step 2."""
    if importlib.util.find_spec("peft") is None:
        cases = {name: case for name, case in cases.items() if case.get("teacher") != "adapter"}
    killed = launch(folder, "kill", cases)
    assert killed.returncode != 0 and "SIGKILL" in killed.stdout + killed.stderr, \
        killed.stdout[-2000:] + killed.stderr[-6000:]
    resumed = launch(folder, "resume", cases)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-6000:]
    return folder


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory) -> Path:
    return kill_and_resume(tmp_path_factory.mktemp("sharded"), TORCH_CASES)


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory) -> Path:
    return kill_and_resume(tmp_path_factory.mktemp("zero3"), ZERO3_CASES)


def materialised_loss(student, teacher_logits, batch) -> torch.Tensor:
    """CE + kl_weight * tau^2 * KL(teacher || student) on the supervised positions, summed over
    the rows and divided by their target count: from the student's own full logits."""
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    z_s = logits.reshape(-1, logits.shape[-1])
    ce = F.cross_entropy(z_s, labels.reshape(-1), ignore_index=-100, reduction="sum")
    z_t = teacher_logits[:, :-1].reshape(-1, logits.shape[-1])
    tau = run.TAU
    kl = (F.softmax(z_t / tau, -1) * (F.log_softmax(z_t / tau, -1) - F.log_softmax(z_s / tau, -1))).sum(-1)
    return (ce + run.KL_WEIGHT * tau**2 * (kl * valid.reshape(-1)).sum()) / valid.sum()


def oracle(settings: dict, folder: Path) -> tuple[list[float], dict, dict]:
    """Two optimizer steps (the run's SGD with momentum) of one process, in float64, on the
    materialised objective over each step's eight rows, from the run's initial weights: the
    step losses, the first step's gradients and the weights after the second. A cached
    teacher's logits are those of the states the run's cache holds (rounded to float32)."""
    student, teacher_model = run.models(settings)
    student.double()
    teacher_model = None if teacher_model is None else teacher_model.double()
    optimizer = run.optimizer([p for p in student.parameters() if p.requires_grad])
    rows, losses, grads = run.all_rows(), [], {}
    for step in range(2):
        batch = run.step_rows(rows, step)
        with torch.no_grad():
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if teacher_model is None:  # the adapters-off teacher: the base model inside the student
                with student.disable_adapter():
                    teacher_logits = student(**inputs).logits
            elif settings["teacher"] == "cache":
                cached = HiddenStateCache(folder / "cache")(batch)
                teacher_logits = cached.head.logits(cached.hidden.double())
            else:
                teacher_logits = teacher_model(**inputs).logits
        loss = materialised_loss(student, teacher_logits, batch)
        loss.backward()
        losses.append(float(loss.detach()))
        if step == 0:
            grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
    return losses, grads, {k: v.detach() for k, v in student.state_dict().items()}


def assert_near(got, expected: torch.Tensor, dtype: str, what: str) -> None:
    got = torch.as_tensor(got, dtype=torch.float64)
    if dtype == "float64":
        torch.testing.assert_close(got, expected, **FLOAT64_TOLERANCE, msg=lambda m: f"{what}: {m}")
        return
    error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    assert error <= FLOAT32_TOLERANCE, f"{what}: largest difference {error:.2e} of the largest entry"


def assert_equal_to_oracle(folder: Path, case: dict) -> None:
    """The case's step 1 (loss, gradients; before the kill) and step 2 (loss, weights; after
    the resume) against :func:`oracle`."""
    settings = {**DEFAULTS, **case}
    losses, grads, weights = oracle(settings, folder)
    dtype = settings["dtype"]
    results = {}
    for phase in ("kill", "resume"):
        results.update(json.loads((folder / f"result-{phase}.json").read_text())["losses"])
    assert sorted(results) == ["0", "1"]
    for step in (0, 1):
        assert_near(results[str(step)], torch.tensor(losses[step], dtype=torch.float64), dtype, f"loss of step {step}")
    got = torch.load(folder / "step1-grads.pt")
    assert got.keys() == grads.keys()
    for name, grad in grads.items():
        assert_near(got[name], grad, dtype, f"gradient of {name}")
    trained = torch.load(folder / "weights.pt")
    assert trained.keys() == weights.keys()
    for name, value in weights.items():
        assert_near(trained[name], value, dtype, f"trained {name}")


# ------------------------------------------------------------------------------------------------
# FSDP2 and FSDP1 (one pair of launches for all their cases)
# ------------------------------------------------------------------------------------------------

def test_fsdp2_sdft_model_with_a_sharded_teacher(torch_runs):
    """SDFTModel under fully_shard (layers, then the root), its FrozenCopy teacher sharded too."""
    assert_equal_to_oracle(torch_runs / "fsdp2-sdft-model", TORCH_CASES["fsdp2-sdft-model"])


def test_fsdp2_plain_student_through_the_wrapper(torch_runs):
    """A plain student under fully_shard: causal_lm_loss(..., wrapper=student) runs inside its forward."""
    assert_equal_to_oracle(torch_runs / "fsdp2-plain", TORCH_CASES["fsdp2-plain"])


def test_fsdp2_with_cpu_offload(torch_runs):
    """CPUOffloadPolicy for student and teacher: how one memory-constrained GPU trains a larger
    model (on a CPU the offload moves nothing, but the policy's code paths run)."""
    assert_equal_to_oracle(torch_runs / "fsdp2-offload", TORCH_CASES["fsdp2-offload"])


def test_fsdp2_head_in_a_unit_of_its_own_with_the_adapters_off_teacher(torch_runs):
    """The LM head under fully_shard of its own: the loss runs inside its forward, so its
    gradient is reduced across processes; a LoRA student whose teacher is its base model."""
    pytest.importorskip("peft")
    assert_equal_to_oracle(torch_runs / "fsdp2-head-unit-lora", TORCH_CASES["fsdp2-head-unit-lora"])


def test_fsdp1_full_shard_sdft_model(torch_runs):
    """SDFTModel under FullyShardedDataParallel FULL_SHARD (a unit per layer), with an FSDP2 teacher."""
    assert_equal_to_oracle(torch_runs / "fsdp1-sdft-model", TORCH_CASES["fsdp1-sdft-model"])


def test_fsdp1_plain_student_with_a_cached_teacher(torch_runs):
    assert_equal_to_oracle(torch_runs / "fsdp1-plain-cache", TORCH_CASES["fsdp1-plain-cache"])


# ------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 (in float32)
# ------------------------------------------------------------------------------------------------

@needs_deepspeed
def test_zero3_sdft_model_with_a_teacher_engine(zero3_runs):
    """SDFTModel as the engine's module, every parameter partitioned (the LM head gathered by its
    own module's forward, inside which the loss runs); the teacher an inference engine of its own."""
    assert_equal_to_oracle(zero3_runs / "zero3-sdft-model", ZERO3_CASES["zero3-sdft-model"])


@needs_deepspeed
def test_zero3_plain_student_with_the_adapters_off_teacher(zero3_runs):
    pytest.importorskip("peft")
    assert_equal_to_oracle(zero3_runs / "zero3-plain-lora", ZERO3_CASES["zero3-plain-lora"])


# ------------------------------------------------------------------------------------------------
# In one process
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def world_of_one():
    """A process group of this process alone (gloo, an in-memory store: no port)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_run_inside_runs_the_wrappers_forward_and_restores_the_module(world_of_one):
    """Through DDP: the wrapper's forward and hooks run once, ours in place of the wrapped
    module's forward, with the arguments as the wrapper passes them; afterwards the module's
    forward is what it was, an instance attribute included (as accelerate's autocast wrapper
    sets one)."""
    from sdft.sharding import run_inside

    inner = torch.nn.Linear(2, 2)
    own_forward = inner.forward
    inner.forward = instance_forward = lambda x: own_forward(x)  # noqa: E731
    wrapper = torch.nn.parallel.DistributedDataParallel(inner)
    calls = []
    wrapper.register_forward_pre_hook(lambda module, args: calls.append("wrapper hook"))

    def ours(x):
        calls.append(("ours", x.tolist()))
        assert inner.forward is instance_forward  # restored before ours runs: ours may call it
        return (inner.weight * 0).sum()

    out = run_inside(wrapper, ours, torch.ones(2))
    assert calls == ["wrapper hook", ("ours", [1.0, 1.0])]
    assert float(out.detach()) == 0.0 and out.requires_grad
    assert inner.__dict__["forward"] is instance_forward
    del inner.forward
    run_inside(wrapper, lambda x: (inner.weight * 0).sum(), torch.ones(2))
    assert "forward" not in inner.__dict__  # the class's own forward, as before


def test_fsdp2_in_one_process_through_its_forward_and_refused_outside(world_of_one):
    """A student under fully_shard, in a world of one: the loss runs inside the student's own
    forward, given as the wrapper or found on the way to the head, and equals the unsharded
    loss and gradients; the same student inside a sharded SDFTModel but called outside that
    model's forward reads a shard of the head, and is refused naming the remedy."""
    from torch.distributed.device_mesh import init_device_mesh

    from sdft import SDFTLoss, SDFTModel, causal_lm_loss
    from sdft.sharding import ShardedHeadError, fully_shard_layers
    from sdft.teacher import FrozenCopy
    from tests.sdft.tiny_models import make_batch, perturbed_copy, tiny_model

    mesh = init_device_mesh("cpu", (1,))
    student = tiny_model("llama", dtype=torch.float64)
    teacher = FrozenCopy(perturbed_copy(student))
    batch = make_batch()
    unsharded = copy.deepcopy(student)
    expected = causal_lm_loss(unsharded, batch, teacher, SDFTLoss(kl_weight=0.7))
    expected.loss.backward()
    expected_grads = {name: param.grad for name, param in unsharded.named_parameters()}

    fully_shard_layers(student, mesh=mesh)
    for wrapper in (student, None):
        out = causal_lm_loss(student, batch, teacher, SDFTLoss(kl_weight=0.7), wrapper=wrapper)
        out.loss.backward()
        torch.testing.assert_close(out.loss, expected.loss, rtol=1e-12, atol=0)
        for name, param in student.named_parameters():
            torch.testing.assert_close(param.grad.full_tensor(), expected_grads[name], rtol=1e-10, atol=1e-14)
            param.grad = None

    # A sharded teacher holds its shards between passes, its root unit included (FSDP2 would
    # keep a root whole after its forward, waiting for a backward the teacher never has).
    from torch.distributed.tensor import DTensor

    from sdft.sharding import fully_shard_teacher

    sharded = fully_shard_teacher(FrozenCopy(teacher.model), mesh=mesh)
    torch.testing.assert_close(sharded(batch).hidden, teacher(batch).hidden, rtol=1e-12, atol=1e-12)
    assert all(isinstance(p, DTensor) for p in sharded.model.parameters())

    inside = tiny_model("llama", dtype=torch.float64)
    fully_shard_layers(SDFTModel(inside, teacher), mesh=mesh)
    with pytest.raises(ShardedHeadError, match="FSDP2 shard.*SDFTModel"):
        causal_lm_loss(inside, batch, teacher)


def test_under_a_wrapper_every_process_probes_the_head(world_of_one):
    """The head check's forwards through a wrapper communicate (DDP broadcasts buffers, FSDP
    gathers), so a process whose batch has no row of two real tokens probes its first columns
    instead of skipping the check while the others run it (which would hang them)."""
    from sdft.head_check import check_model_head
    from tests.sdft.tiny_models import tiny_model

    model = tiny_model("llama")
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 10]]), "attention_mask": torch.tensor([[1, 0, 0], [0, 0, 0]])}
    assert check_model_head(model, batch) is None  # alone: nothing to probe, nothing run
    checked = check_model_head(model, batch, wrapper=torch.nn.parallel.DistributedDataParallel(model))
    assert checked is not None and checked.logits < checked.tolerance
