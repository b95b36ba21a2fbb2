"""kdsl run with two tokenizers: the builtin Unigram student distilled from the byte-level BPE teacher."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdsl
from kdsl import models
from kdsl.data import load_pairs
from kdsl.errors import ConfigError
from kdsl.train import compile_objective, train

SPECS = Path(__file__).resolve().parents[1] / "specs"

# A few steps on a few pairs: the wiring is under test here, not the learning.
SMALL = {
    "train.max_steps": 3,
    "train.batch_size": 4,
    "train.baseline": False,
    "data.max_prompt_tokens": 16,
    "data.max_response_tokens": 16,
    "eval.max_pairs": 4,
    "eval.max_new_tokens": 4,
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return {
        "pairs": load_pairs("builtin:shakespeare", "train", fraction=0.002, seed=0),
        "heldout": load_pairs("builtin:shakespeare", "validation", fraction=1.0, seed=0).select(range(4)),
    }


def dskd(**overrides):
    return kdsl.load(SPECS / "dskd.kd", {**SMALL, **overrides}, same_vocab=False)


def test_projector_sized_from_models():
    objective = dskd()
    student = models.load_model("builtin:tiny-student-unigram")
    teacher = models.load_model("builtin:tiny-teacher")
    compiled = compile_objective(objective, student, teacher)
    assert compiled.projector.student_hidden_size == student.config.n_embd == 128
    assert compiled.projector.teacher_hidden_size == teacher.config.n_embd == 256
    assert compiled.projector.accuracy_gate is True  # projection.accuracy_gate = true in the spec


def test_projection_init_file_not_found(tmp_path):
    objective = dskd(**{"projection.init": str(tmp_path / "missing.safetensors")})
    student = models.load_model("builtin:tiny-student-unigram")
    teacher = models.load_model("builtin:tiny-teacher")
    with pytest.raises(ConfigError, match=r"projection.init = .*missing.safetensors.*: file not found"):
        compile_objective(objective, student, teacher)


def test_run_gives_each_model_its_tokens(data, tmp_path):
    teacher = models.load_model("builtin:tiny-teacher")
    student_tokenizer = models.load_tokenizer("builtin:tiny-student-unigram")
    teacher_tokenizer = models.load_tokenizer("builtin:tiny-teacher")
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        if kwargs.get("output_hidden_states"):  # the training forward; the report's calls ask for no hidden states
            seen.append(kwargs["input_ids"].detach().clone())

    handle = teacher.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = train(dskd(**{"train.save_every": 2}), None, out_dir=tmp_path / "run", teacher=teacher,
                       teacher_tokenizer=teacher_tokenizer,
                       pairs=data["pairs"], heldout=data["heldout"], progress_bar=False)
    finally:
        handle.remove()

    # Every teacher forward read ids of the teacher's own vocabulary that spell the training text.
    assert seen
    prompts = {p.strip() for p in data["pairs"]["prompt"]} | {p.strip() for p in data["heldout"]["prompt"]}
    for ids in seen:
        for row in ids:
            text = teacher_tokenizer.decode(row.tolist(), skip_special_tokens=True)
            assert text.strip(), "the teacher read an empty row"
            assert any(prompt[-20:] in text or text[:20] in prompt for prompt in prompts), text[:60]
    assert max(int(ids.max()) for ids in seen) >= len(student_tokenizer), "no id past the student's vocabulary: BPE ids expected"

    records = [r for r in result.metrics if "loss/total" in r]
    assert len(records) == 3
    expected = {"loss/total", "loss/CE", "loss/CE(o→q)", "loss/KL(o→q[τ=1]‖q[τ=1])", "loss/KL(o[τ=1]‖q→o[τ=1])"}
    for record in records:
        losses = {key: value for key, value in record.items() if key.startswith("loss/")}
        assert set(losses) == expected
        for key, value in losses.items():
            assert math.isfinite(value), key

    # The trained projector is saved next to the student and starts a later run.
    saved = tmp_path / "run" / "projector.safetensors"
    tensors = load_file(str(saved))
    assert {"query.0.weight", "t2s.0.weight", "s2t.0.weight"} <= set(tensors)
    student = models.load_model("builtin:tiny-student-unigram")
    restarted = compile_objective(dskd(**{"projection.init": str(saved)}), student, teacher)
    for name, tensor in restarted.projector.state_dict().items():
        torch.testing.assert_close(tensor, tensors[name], rtol=0, atol=0)

    # Checkpoints contain the projector beside the student, so a resumed run continues both.
    checkpoint_files = list((tmp_path / "run" / "checkpoints").glob("step-*/*.safetensors"))
    keys = set().union(*(load_file(str(f)).keys() for f in checkpoint_files))
    assert any(key.endswith("projector.query.0.weight") for key in keys), sorted(keys)[:5]

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["tokenizers"].startswith("two")
    rows = {row["model"]: row for row in report["rows"]}
    assert rows["teacher"]["kl"] is None
    assert rows["distilled"]["kl"] is None
    assert rows["teacher"]["bits_per_char"] < rows["student (initial)"]["bits_per_char"]


def test_unprojected_kl_across_tokenizers_rejected(data, tmp_path):
    objective = kdsl.load("objective = KL(o ‖ q) + CE", {**SMALL, "student": "builtin:tiny-student-unigram"})
    with pytest.raises(ConfigError, match=r"different tokenizers.*project one side"):
        train(objective, None, out_dir=tmp_path / "run", pairs=data["pairs"], heldout=data["heldout"],
              progress_bar=False)


def test_teacher_generation_across_tokenizers(data, tmp_path):
    """Under d_o the teacher reads prompts in its own tokens, and the student reads its text in the student's."""
    objective = kdsl.load("objective = E[w ~ d_o] KL(o→q ‖ q) + CE(o→q)",
                          {**SMALL, "train.max_steps": 2, "student": "builtin:tiny-student-unigram",
                           "sgo.max_new_tokens": 8}, same_vocab=False)
    student_tokenizer = models.load_tokenizer("builtin:tiny-student-unigram")
    teacher_tokenizer = models.load_tokenizer("builtin:tiny-teacher")
    teacher = models.load_model("builtin:tiny-teacher")
    generated, trained = [], []
    original = teacher.generate

    def generate(*args, **kwargs):
        output = original(*args, **kwargs)
        generated.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone(), output.clone()))
        return output

    teacher.generate = generate
    student = models.load_model("builtin:tiny-student-unigram")
    handle = student.register_forward_pre_hook(lambda module, args, kwargs: trained.append(
        (kwargs["input_ids"].clone(), kwargs["attention_mask"].clone())) if module.training else None, with_kwargs=True)
    try:
        result = train(objective, None, out_dir=tmp_path / "run", student=student, teacher=teacher,
                       teacher_tokenizer=teacher_tokenizer, pairs=data["pairs"], heldout=data["heldout"],
                       progress_bar=False)
    finally:
        handle.remove()
    assert result.steps == 2
    assert generated
    generated_texts = set()
    for input_ids, attention_mask, output in generated:
        for row in range(input_ids.shape[0]):
            prompt = input_ids[row][attention_mask[row].bool()].tolist()
            prompt_text = teacher_tokenizer.decode(prompt, skip_special_tokens=True)
            prompts = list(data["pairs"]["prompt"]) + list(data["heldout"]["prompt"])
            assert any(prompt_text.strip()[-15:] in p for p in prompts), prompt_text
            completion = output[row, input_ids.shape[1]:].tolist()
            text = teacher_tokenizer.decode(completion, skip_special_tokens=True)
            generated_texts.add(text.strip())
    assert max(int(ids.max()) for ids, _, _ in generated) >= len(student_tokenizer) or any(
        int(out.max()) >= len(student_tokenizer) for _, _, out in generated), "the teacher read student ids"
    # The student reads student ids only; its d_o rows (half of its rows: CE(o→q) draws from d_data) spell
    # what the teacher generated.
    matched = 0
    for input_ids, attention_mask in trained:
        assert int(input_ids.max()) < len(student_tokenizer)
        for row in range(input_ids.shape[0]):
            text = student_tokenizer.decode(input_ids[row][attention_mask[row].bool()].tolist(), skip_special_tokens=True)
            matched += any(len(g) > 3 and g in text for g in generated_texts)
    assert matched >= 4, (matched, generated_texts)
    for record in (r for r in result.metrics if "loss/total" in r):
        assert math.isfinite(record["loss/total"])


@pytest.mark.parametrize(("student", "alignment"), [("builtin:tiny-student-unigram", "learned"),
                                                     ("builtin:tiny-student", "text")])
def test_run_with_either_alignment(data, tmp_path, student, alignment):
    """DSKD's learned alignment across tokenizers, and the text alignment with one tokenizer (position to position)."""
    objective = dskd(**{"train.max_steps": 2, "student": student, "projection.alignment": alignment})
    student_model = models.load_model(student)
    teacher = models.load_model("builtin:tiny-teacher")
    compiled = compile_objective(objective, student_model, teacher)
    seen = []
    compiled.projector.register_forward_hook(lambda module, args, output: seen.append(output))
    train(objective, compiled, out_dir=tmp_path / "run", student=student_model, teacher=teacher,
          teacher_tokenizer=models.load_tokenizer("builtin:tiny-teacher"),
          pairs=data["pairs"], heldout=data["heldout"], progress_bar=False)
    assert len(seen) == 2
    for projection in seen:
        assert torch.isfinite(projection.o_to_q[projection.student_mask]).all()
        weights = projection.attention
        if alignment == "text":
            # One tokenization: every scored position reads the teacher at its own index, and only there.
            pairs = projection.student_mask.unsqueeze(-1) & projection.teacher_mask.unsqueeze(1)
            assert torch.equal(projection.student_mask, projection.teacher_mask)
            eye = torch.eye(weights.shape[1], weights.shape[2], dtype=torch.bool).expand_as(weights)
            torch.testing.assert_close(weights, (eye & pairs).to(weights.dtype))
        else:
            # Across tokenizers the learned attention spreads over the teacher's scored positions.
            rows = weights[projection.student_mask]
            assert bool(((rows > 0).sum(dim=-1) > 1).all())


TWO_PROCESS_DRIVER = r'''
import json, sys
import torch
from accelerate import PartialState
import kdsl
from kdsl import models
from kdsl.data import load_pairs
from kdsl.train import compile_objective, train

spec, out_dir, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
objective = kdsl.load(spec, overrides, same_vocab=False)
student = models.load_model(objective.settings["student"])
teacher = models.load_model(objective.settings["teacher"])
torch.manual_seed(0)  # the projector's initial weights, equal in both runs
compiled = compile_objective(objective, student, teacher)
train(objective, compiled, out_dir=out_dir, student=student, teacher=teacher,
      teacher_tokenizer=models.load_tokenizer(objective.settings["teacher"]),
      pairs=load_pairs("builtin:shakespeare", "train", fraction=0.002, seed=0),
      heldout=load_pairs("builtin:shakespeare", "validation", fraction=1.0, seed=0).select(range(4)),
      progress_bar=False)
compiled.projector.save_pretrained(f"{out_dir}/projector_rank{PartialState().process_index}.safetensors")
'''


@pytest.mark.slow
def test_two_processes_match_one_big_batch(data, tmp_path, loopback_port):
    """Two gloo processes with batch 2 each train the student and the projector as one process with batch 4."""
    import os
    import subprocess
    import sys

    settings = {**SMALL, "train.max_steps": 3, "train.seed": 3, "train.eval_every": 0}
    driver = tmp_path / "driver.py"
    driver.write_text(TWO_PROCESS_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(SPECS.parent), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    two = {**settings, "train.batch_size": 2}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(loopback_port), str(driver), str(SPECS / "dskd.kd"), str(tmp_path / "two"),
               json.dumps(two)]
    launched = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-4000:]
    single = subprocess.run([sys.executable, str(driver), str(SPECS / "dskd.kd"), str(tmp_path / "one"),
                             json.dumps(settings)], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]

    def losses(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss/total"], r["loss/KL(o[τ=1]‖q→o[τ=1])"]) for r in records if "loss/total" in r]

    one_process, two_processes = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [step for step, _, _ in two_processes] == [1, 2, 3]
    # Step 3 depends on the all-reduced gradients of steps 1 and 2, the projector's included.
    for (_, total, projected), (_, total_two, projected_two) in zip(one_process, two_processes):
        assert total_two == pytest.approx(total, rel=1e-4)
        assert projected_two == pytest.approx(projected, rel=1e-4)
    # Every process ends with the same projector: its gradients are all-reduced with the student's.
    ranks = [load_file(str(tmp_path / "two" / f"projector_rank{rank}.safetensors")) for rank in range(2)]
    for name, tensor in ranks[0].items():
        assert torch.equal(ranks[1][name], tensor), name
    # s2t and query match one process. t2s does not quite: each process scales the teacher side over its own rows,
    # so CE(o→q) differs in its fifth digit. Adam turns the near-zero t2s gradients that moves into steps of up to
    # the learning rate.
    single = load_file(str(tmp_path / "one" / "projector.safetensors"))
    for name in ("s2t.0.weight", "s2t.0.bias", "query.0.weight"):
        torch.testing.assert_close(ranks[0][name], single[name], rtol=1e-4, atol=1e-5)


def test_sequence_weight_across_tokenizers(data, tmp_path):
    """ρ(w) compares the teacher's log-probability of the text in its tokens with the student's in the student's."""
    objective = kdsl.load("rho.clip = 2\nρ(T, w) = (o(w) / q(w))^(1/T)\nobjective = CE + ρ(T, w)·KL(o ‖ q→o)",
                          {**SMALL, "train.max_steps": 2, "student": "builtin:tiny-student-unigram"}, same_vocab=False)
    result = train(objective, None, out_dir=tmp_path / "run", pairs=data["pairs"], heldout=data["heldout"],
                   progress_bar=False)
    records = [r for r in result.metrics if "loss/total" in r]
    assert len(records) == 2
    for record in records:
        rho = {key: value for key, value in record.items() if key.startswith("rho/")}
        assert rho, record.keys()
        assert all(math.isfinite(value) for value in rho.values()), rho
        assert 0.0 < record["rho/mean"] <= 2.0
        assert math.isfinite(record["loss/KL(o‖q→o)"])


def test_reference_model_weight_on_projected_terms(data, tmp_path):
    """ref(w) in a sequence weight of a projected objective: the reference model reads the student's tokens."""
    objective = kdsl.load('ref = "builtin:tiny-ref"\nρ(w) = ref(w) / q(w)\nrho.clip = 2\n'
                          "objective = CE(o→q) + ρ(w)·KL(o→q ‖ q)",
                          {**SMALL, "train.max_steps": 2, "student": "builtin:tiny-student"}, same_vocab=False)
    seen = []
    ref = models.load_model("builtin:tiny-ref")
    ref.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()),
                                  with_kwargs=True)
    result = train(objective, None, out_dir=tmp_path / "run", ref=ref, pairs=data["pairs"], heldout=data["heldout"],
                   progress_bar=False)
    assert len(seen) == 2  # one reference forward per step
    records = [r for r in result.metrics if "loss/total" in r]
    assert all(0.0 < r["rho/mean"] <= 2.0 for r in records), records
