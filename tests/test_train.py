"""The training loop: run directory, loss decrease, token normalisation, errors, resume, two processes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kdsl
from kdsl.errors import ConfigError
from kdsl.samplers import collate
from kdsl.train import TrainConfig, Trainer, compile_objective, train
from tests.test_samplers import make_model, make_pairs, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


BASE_SETTINGS = {
    "train.batch_size": 4,
    "train.lr": 3e-3,
    "train.warmup_steps": 2,
    "data.max_prompt_tokens": 12,
    "data.max_response_tokens": 12,
    "sgo.max_new_tokens": 8,
    "eval.max_pairs": 8,
    "eval.max_new_tokens": 6,
}


@pytest.fixture(scope="module")
def tiny():
    """A tokenizer, a 2-layer teacher of width 64, a 1-layer student of width 32 and pairs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer()
    torch.manual_seed(7)
    teacher = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # a peaked teacher, far from the near-uniform initial student
    return {"tokenizer": tokenizer, "teacher": teacher, "pairs": make_pairs(32), "heldout": make_pairs(8)}


def load(text: str, **overrides):
    return kdsl.load(text, {**BASE_SETTINGS, **overrides})


def run_tiny(tiny, objective, out_dir, **kwargs):
    return train(
        objective, compile_objective(objective), out_dir=out_dir, student=make_model(len(tiny["tokenizer"]), seed=1),
        teacher=tiny["teacher"], tokenizer=tiny["tokenizer"], pairs=tiny["pairs"], heldout=tiny["heldout"],
        progress_bar=False, **kwargs,
    )


def test_run_writes_directory_and_learns(tiny, tmp_path):
    objective = load("objective = KL(o ‖ q) + 0.2 · CE", **{"train.max_steps": 16, "train.lr": 5e-3})
    result = run_tiny(tiny, objective, tmp_path / "run")
    out = tmp_path / "run"

    for name in ("spec.kd", "settings.json", "versions.json", "metrics.jsonl", "report.json"):
        assert (out / name).is_file(), name
    assert (out / "student" / "model.safetensors").is_file()
    assert (out / "baseline" / "student" / "model.safetensors").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((out / "settings.json").read_text())["train.max_steps"] == 16
    assert "torch" in json.loads((out / "versions.json").read_text())

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, 17))
    first = steps[0]
    for key in ("loss/total", "loss/KL(o‖q)", "loss/CE", "lr", "grad_norm", "tokens_per_s", "epoch", "progress"):
        assert key in first, key
    assert math.isclose(first["loss/KL(o‖q)"] + first["loss/CE"], first["loss/total"], rel_tol=1e-5)
    early = sum(r["loss/total"] for r in steps[:4]) / 4
    late = sum(r["loss/total"] for r in steps[-4:]) / 4
    assert late < 0.9 * early, (early, late)

    baseline = [json.loads(line) for line in (out / "baseline" / "metrics.jsonl").read_text().splitlines()]
    assert len(baseline) == 16
    assert set(k for k in baseline[0] if k.startswith("loss/")) == {"loss/total", "loss/CE"}

    report = json.loads((out / "report.json").read_text())
    names = [row["model"] for row in report["rows"]]
    assert names == ["teacher", "student (initial)", "baseline (CE)", "distilled"]
    rows = {row["model"]: row for row in report["rows"]}
    assert rows["teacher"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows["distilled"]["kl"] < 0.9 * rows["student (initial)"]["kl"]
    assert rows["distilled"]["kl"] < rows["baseline (CE)"]["kl"]
    comparison = report["distilled_minus_baseline"]
    assert comparison["ce"] == pytest.approx(rows["distilled"]["ce"] - rows["baseline (CE)"]["ce"], abs=1e-9)
    assert comparison["ce_ci"][0] <= comparison["ce"] <= comparison["ce_ci"][1]
    assert comparison["pairs"] == report["heldout_pairs"]
    assert result.report == report
    assert result.steps == 16


def test_saved_student_reloads(tiny, tmp_path):
    from transformers import GPT2LMHeadModel

    objective = load("objective = CE", **{"train.max_steps": 3, "train.baseline": False})
    result = run_tiny(tiny, objective, tmp_path / "run")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "student").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    result.student.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.student(ids).logits, atol=1e-6)


def test_mixture_with_student_generation(tiny, tmp_path):
    text = "objective = E[w ~ 0.5·d_q + 0.5·d_data] JS[0.5](o ‖ q) + 0.5 · CE + 0.2 · E[w ~ d_o] CE"
    objective = load(text, **{"train.max_steps": 5, "train.grad_accum": 2, "train.baseline": False,
                              "train.seed": 3})
    result = run_tiny(tiny, objective, tmp_path / "run")
    sources = {r["source/0"] for r in result.metrics if "source/0" in r}
    assert {"d_q", "d_data"} <= set(",".join(sources).split(","))
    assert {r["source/1"] for r in result.metrics if "source/1" in r} == {"d_data"}
    assert {r["source/2"] for r in result.metrics if "source/2" in r} == {"d_o"}
    assert all(r["sched/mix0/d_q"] == 0.5 for r in result.metrics if "loss/total" in r)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_accumulation_equals_one_big_batch(tiny, tmp_path, reduction):
    from accelerate import Accelerator

    objective = load("objective = KL(o ‖ q) + 0.3 · CE",
                     **{"train.grad_accum": 3, "train.max_steps": 4, "reduction": reduction})
    compiled = compile_objective(objective)
    student = make_model(len(tiny["tokenizer"]), seed=2).train()
    trainer = Trainer(
        name="t", objective=objective, compiled=compiled, student=student, teacher=tiny["teacher"],
        tokenizer=tiny["tokenizer"], pairs=tiny["pairs"], heldout=None,
        config=TrainConfig.from_settings(objective.settings), accelerator=Accelerator(),
        run_dir=tmp_path, progress_bar=False,
    )
    point = trainer.point(0)
    micro_batches = trainer.draw(point)
    num_items = trainer.count_items(micro_batches)
    count = "count_targets" if reduction == "token" else "count_scored_sequences"
    assert num_items == [sum(getattr(groups[0], count)() for groups in micro_batches)]
    trainer.accumulate(micro_batches, num_items, point)
    accumulated = [p.grad.clone() for p in student.parameters()]

    student.zero_grad()
    examples = [e for groups in micro_batches for e in groups[0].examples]
    whole = collate(examples, trainer.encoder.pad_id)
    result = trainer.compiled(
        student_logits=student(input_ids=whole.input_ids, attention_mask=whole.attention_mask).logits[:, :-1],
        teacher_logits=tiny["teacher"](input_ids=whole.input_ids, attention_mask=whole.attention_mask).logits[:, :-1],
        labels=whole.labels[:, 1:], group=0,
    )
    result.loss.backward()
    for grad, param in zip(accumulated, student.parameters()):
        assert torch.allclose(grad, param.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name, value, fragment", [
    ("train.batch_size", 0, "train.batch_size = 0 is out of range"),
    ("train.schedule", "step", "one of 'cosine', 'linear', 'constant'"),
    ("train.lr", "fast", "train.lr = 'fast' has type str"),
])
def test_config_rejects_bad_value(name, value, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.from_settings({name: value})


def test_existing_run_needs_resume(tiny, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    objective = load("objective = CE", **{"train.max_steps": 1, "train.baseline": False})
    with pytest.raises(ConfigError, match="already contains a run: resume it"):
        run_tiny(tiny, objective, tmp_path)


def test_missing_teacher_is_reported(tiny, tmp_path):
    objective = load("objective = KL(o ‖ q)", **{"train.max_steps": 1, "train.baseline": False})
    from accelerate import Accelerator

    with pytest.raises(ConfigError, match="reads the teacher model but none is loaded"):
        Trainer(
            name="t", objective=objective, compiled=compile_objective(objective),
            student=make_model(len(tiny["tokenizer"])), teacher=None, tokenizer=tiny["tokenizer"],
            pairs=tiny["pairs"], heldout=None, config=TrainConfig.from_settings(objective.settings),
            accelerator=Accelerator(), run_dir=tmp_path,
        )


# --- Resume after a kill ---------------------------------------------------------------

RESUME_SPEC = "objective = E[w ~ 0.5·d_q + 0.5·d_data] KL(o ‖ q) + 0.5 · CE"
RESUME_SETTINGS = {"train.max_steps": 8, "train.save_every": 2, "train.keep_checkpoints": 2,
                   "train.baseline": False, "train.seed": 5, "train.grad_accum": 2}

DRIVER = '''
import json, sys, torch
torch.set_num_threads(1)
import datasets, kdsl
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from kdsl.train import compile_objective, train

root, out_dir = sys.argv[1], sys.argv[2]
settings = json.loads(open(root + "/settings.json").read())
objective = kdsl.load(open(root + "/spec.kd").read(), settings)
tokenizer = PreTrainedTokenizerFast.from_pretrained(root + "/tokenizer")
train(
    objective, compile_objective(objective), out_dir=out_dir,
    student=AutoModelForCausalLM.from_pretrained(root + "/student"),
    teacher=AutoModelForCausalLM.from_pretrained(root + "/teacher"), tokenizer=tokenizer,
    pairs=datasets.load_from_disk(root + "/pairs"), heldout=datasets.load_from_disk(root + "/heldout"),
    progress_bar=False,
)
'''


def write_driver_inputs(tiny, root: Path, spec: str, settings: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    make_model(len(tiny["tokenizer"]), seed=1).save_pretrained(root / "student")
    tiny["teacher"].save_pretrained(root / "teacher")
    tiny["tokenizer"].save_pretrained(root / "tokenizer")
    tiny["pairs"].save_to_disk(root / "pairs")
    tiny["heldout"].save_to_disk(root / "heldout")
    (root / "spec.kd").write_text(spec)
    (root / "settings.json").write_text(json.dumps({**BASE_SETTINGS, **settings}))
    (root / "driver.py").write_text(DRIVER)


def driver_command(root: Path, out_dir: Path) -> list[str]:
    return [sys.executable, str(root / "driver.py"), str(root), str(out_dir)]


def driver_env() -> dict:
    repo = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss/total"]) for r in records if "loss/total" in r]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tiny, tmp_path):
    root = tmp_path / "inputs"
    write_driver_inputs(tiny, root, RESUME_SPEC, RESUME_SETTINGS)

    # The uninterrupted run, in this process with the same inputs.
    from transformers import AutoModelForCausalLM

    objective = kdsl.load(RESUME_SPEC, {**BASE_SETTINGS, **RESUME_SETTINGS})
    train(
        objective, compile_objective(objective), out_dir=tmp_path / "straight",
        student=AutoModelForCausalLM.from_pretrained(root / "student"),
        teacher=AutoModelForCausalLM.from_pretrained(root / "teacher"),
        tokenizer=tiny["tokenizer"], pairs=tiny["pairs"], heldout=tiny["heldout"], progress_bar=False,
    )
    expected = step_losses(tmp_path / "straight")
    assert [s for s, _ in expected] == list(range(1, 9))

    # A run killed with SIGKILL once its step-4 checkpoint exists, then resumed.
    out_dir = tmp_path / "killed"
    child = subprocess.Popen(driver_command(root, out_dir), env=driver_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out_dir / "checkpoints" / "step-00000004").is_dir():
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the child wrote no step-4 checkpoint within 120 s"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out_dir / "student").exists(), "the child finished before it was killed"

    # Resume in this process: a fresh student from the same initial weights, state from the checkpoint.
    train(
        objective, compile_objective(objective), out_dir=out_dir,
        student=AutoModelForCausalLM.from_pretrained(root / "student"),
        teacher=AutoModelForCausalLM.from_pretrained(root / "teacher"),
        tokenizer=tiny["tokenizer"], pairs=tiny["pairs"], heldout=tiny["heldout"], progress_bar=False,
        resume=True,
    )
    assert step_losses(out_dir) == expected
    checkpoints = sorted(p.name for p in (out_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-00000004", "step-00000006"]


# --- Two processes ---------------------------------------------------------------------

DISTRIBUTED_DRIVER = '''
import json, sys, torch
torch.set_num_threads(1)
import datasets, kdsl
from accelerate import PartialState
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from kdsl.train import compile_objective, train

root, out_dir = sys.argv[1], sys.argv[2]
base = json.loads(open(root + "/settings.json").read())
tokenizer = PreTrainedTokenizerFast.from_pretrained(root + "/tokenizer")
runs = {
    "data": ("objective = KL(o ‖ q) + 0.5 · CE", {"train.batch_size": 2, "train.save_every": 2}),
    "mixture": ("objective = E[w ~ 0.5·d_q + 0.5·d_data] KL(o ‖ q) + 0.5 · CE", {"train.batch_size": 2}),
}
for name, (spec, settings) in runs.items():
    objective = kdsl.load(spec, {**base, **settings})
    result = train(
        objective, compile_objective(objective), out_dir=out_dir + "/" + name,
        student=AutoModelForCausalLM.from_pretrained(root + "/student"),
        teacher=AutoModelForCausalLM.from_pretrained(root + "/teacher"), tokenizer=tokenizer,
        pairs=datasets.load_from_disk(root + "/pairs"), heldout=datasets.load_from_disk(root + "/heldout"),
        progress_bar=False,
    )
    sources = [r["source/0"] for r in result.metrics if "source/0" in r]
    rank = PartialState().process_index
    with open(f"{out_dir}/{name}/sources_{rank}.json", "w") as f:
        json.dump(sources, f)
'''


@pytest.mark.slow
def test_two_processes_match_one_big_batch(tiny, tmp_path, loopback_port):
    root = tmp_path / "inputs"
    settings = {"train.max_steps": 4, "train.baseline": False, "train.seed": 2, "train.grad_accum": 2}
    write_driver_inputs(tiny, root, "", settings)
    (root / "driver.py").write_text(DISTRIBUTED_DRIVER)
    # NOTE: `accelerate launch --cpu --num_processes 2` starts a single process in accelerate 1.16
    # unless mpirun is installed, so the test launches the two processes with torchrun.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(loopback_port),
        str(root / "driver.py"), str(root), str(tmp_path / "two"),
    ]
    env = {**driver_env(), "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    launched = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert launched.returncode == 0, launched.stderr[-4000:]

    # One process with batch 4 draws the same pairs as two processes with batch 2 each.
    from transformers import AutoModelForCausalLM

    objective = kdsl.load("objective = KL(o ‖ q) + 0.5 · CE", {**BASE_SETTINGS, **settings})
    train(
        objective, compile_objective(objective), out_dir=tmp_path / "one",
        student=AutoModelForCausalLM.from_pretrained(root / "student"),
        teacher=AutoModelForCausalLM.from_pretrained(root / "teacher"),
        tokenizer=tiny["tokenizer"], pairs=tiny["pairs"], heldout=tiny["heldout"], progress_bar=False,
    )
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two" / "data")
    assert [s for s, _ in two] == [1, 2, 3, 4]
    for (_, expected), (_, got) in zip(one, two):
        assert got == pytest.approx(expected, rel=1e-4)
    assert (tmp_path / "two" / "data" / "checkpoints" / "step-00000002" / "samplers_1.json").is_file()

    mixture = tmp_path / "two" / "mixture"
    ranks = [json.loads((mixture / f"sources_{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1], "the ranks drew different mixture components"
    assert {"d_q", "d_data"} <= set(",".join(ranks[0]).split(","))
    assert (mixture / "student" / "model.safetensors").is_file()


def test_adaptive_probability_rises_during_training(tiny, tmp_path):
    text = "objective = E[w ~ adaptive(d_q, d_data, init_prob=0.0, step=0.5, max_prob=1.0)] KL(o ‖ q)"
    objective = load(text, **{"train.max_steps": 6, "train.eval_every": 1, "train.lr": 2e-2,
                              "train.baseline": False, "adaptive.replay_capacity": 4})
    result = run_tiny(tiny, objective, tmp_path / "run")

    evaluations = [r for r in result.metrics if "eval/ce" in r]
    assert [r["step"] for r in evaluations] == [0, 1, 2, 3, 4, 5]
    steps = [r for r in result.metrics if "loss/total" in r]
    probabilities = [r["sched/adaptive/prob"] for r in steps]
    assert probabilities[0] == 0.0
    assert probabilities[-1] > 0.0, evaluations
    assert probabilities == sorted(probabilities)
    drawn = {r["source/0"] for r, p in zip(steps, probabilities) if p == 0.0}
    assert drawn == {"d_data"}
    assert {r["source/0"] for r in steps} & {"d_q", "replay"}


def test_lora_student_on_local_jsonl(tiny, tmp_path):
    data = tmp_path / "pairs.jsonl"
    with data.open("w") as handle:
        for row in tiny["pairs"]:
            handle.write(json.dumps({"question": row["prompt"], "answer": row["response"]}) + "\n")
    settings = {"train.max_steps": 3, "train.baseline": False, "data": str(data), "data.prompt_field": "question",
                "data.response_field": "answer", "lora.r": 4, "lora.target_modules": "c_attn"}
    objective = load("objective = KL(o ‖ q)", **settings)
    student = make_model(len(tiny["tokenizer"]), seed=1)
    frozen_before = student.transformer.wpe.weight.detach().clone()
    result = train(objective, compile_objective(objective), out_dir=tmp_path / "run", student=student,
                   teacher=tiny["teacher"], tokenizer=tiny["tokenizer"], progress_bar=False)

    out = tmp_path / "run"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "student" / "model.safetensors").is_file()
    assert result.report["heldout_pairs"] == 3  # a tenth of the 32 pairs is held out
    # Only adapters train: a weight outside c_attn is unchanged in the merged student.
    assert torch.equal(result.student.transformer.wpe.weight, frozen_before)
    assert not torch.equal(result.student.transformer.h[0].attn.c_attn.weight,
                           make_model(len(tiny["tokenizer"]), seed=1).transformer.h[0].attn.c_attn.weight)


def test_cli_run_with_local_models(tiny, tmp_path):
    from kdsl.cli import main

    make_model(len(tiny["tokenizer"]), seed=1).save_pretrained(tmp_path / "student")
    tiny["tokenizer"].save_pretrained(tmp_path / "student")
    tiny["teacher"].save_pretrained(tmp_path / "teacher")
    tiny["tokenizer"].save_pretrained(tmp_path / "teacher")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                            for r in tiny["pairs"]))
    spec = tmp_path / "run.kd"
    spec.write_text(
        f'teacher = "{tmp_path / "teacher"}"\nstudent = "{tmp_path / "student"}"\ndata = "{data}"\n'
        "train.max_steps = 2\ntrain.batch_size = 4\ntrain.baseline = false\ntrain.teacher_dtype = \"float32\"\n"
        "data.max_prompt_tokens = 12\ndata.max_response_tokens = 12\neval.max_pairs = 4\n"
        "objective = KL(o ‖ q) + CE\n"
    )
    assert main(["run", str(spec), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "spec.kd").read_text() == spec.read_text()
    assert len(step_losses(tmp_path / "run")) == 2

    # Resuming a finished run trains nothing again and keeps the metrics.
    assert main(["run", str(spec), "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert len(step_losses(tmp_path / "run")) == 2


def test_learning_rate_warms_up_then_decays(tiny, tmp_path):
    objective = load("objective = CE", **{"train.max_steps": 6, "train.warmup_steps": 2, "train.lr": 1e-3,
                                          "train.baseline": False})
    result = run_tiny(tiny, objective, tmp_path / "run")
    rates = [r["lr"] for r in result.metrics if "loss/total" in r]
    assert rates[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert rates[3] > rates[4] > rates[5] > 0.0


class ScaledObjective(torch.nn.Module):
    """A compiled objective with one trainable parameter: its loss times exp(log_scale)."""

    def __init__(self, compiled):
        super().__init__()
        self.compiled = compiled
        self.log_scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, **kwargs):
        result = self.compiled(**kwargs)
        result.loss = result.loss * self.log_scale.exp() + self.log_scale ** 2
        return result


def test_objective_parameters_train_at_projector_lr(tiny, tmp_path):
    from accelerate import Accelerator

    objective = load("objective = KL(o ‖ q)", **{"train.max_steps": 2, "train.projector_lr": 0.05})
    scaled = ScaledObjective(compile_objective(objective))
    trainer = Trainer(
        name="t", objective=objective, compiled=scaled, student=make_model(len(tiny["tokenizer"])),
        teacher=tiny["teacher"], tokenizer=tiny["tokenizer"], pairs=tiny["pairs"], heldout=None,
        config=TrainConfig.from_settings(objective.settings), accelerator=Accelerator(), run_dir=tmp_path,
        progress_bar=False,
    )
    groups = trainer.optimizer.param_groups
    assert len(groups) == 3
    assert groups[-1]["params"] == [scaled.log_scale]
    assert groups[-1]["initial_lr"] == 0.05
    trainer.run()
    assert scaled.log_scale.item() != 0.0
