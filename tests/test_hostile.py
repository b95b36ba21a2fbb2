"""No text of a spec ever runs as code: hostile specs get positioned errors or are harmless names.

Every spec here goes through `kdsl check`, `kdsl.compile` and one training
step where it is valid, and a canary file that a code-execution bug would
create must still be absent afterwards.
"""

from __future__ import annotations

import ast as python_ast
from pathlib import Path

import pytest
import sympy
import torch

import kdsl
from kdsl.cli import main
from kdsl.errors import SpecError
from kdsl.latex import render
from kdsl.printing import canonical_hash, format_objective

ROOT = Path(__file__).resolve().parents[1]
CANARY = "CANARY"
TOUCH = f"__import__('os').system('touch {CANARY}')"

# (label, spec text, expected first error code or None where the spec is valid and harmless)
HOSTILE = [
    ("import call", f"objective = {TOUCH}", "KD010"),
    ("import call double quotes", 'objective = __import__("os")', "KD101"),
    ("dunder attribute", "objective = KL(o ‖ q).__class__", "KD010"),
    ("dotted dunder name", "objective = o.__class__.__bases__", "KD101"),
    ("dunder subscript", "objective = KL(o ‖ q)[__class__]", "KD120"),
    ("eval call", 'objective = eval("1") · KL(o ‖ q)', "KD101"),
    ("eval line with code", f"objective = KL(o ‖ q)\neval {TOUCH}", "KD010"),
    ("exec call", 'objective = exec("import os") · KL(o ‖ q)', "KD101"),
    ("lambda expression", "objective = (lambda: 0)() · KL(o ‖ q)", "KD010"),
    ("code in string setting", f'teacher = "{TOUCH}"\nobjective = KL(o ‖ q)', None),
    ("code in comment", f"# {TOUCH}\nobjective = KL(o ‖ q)", None),
    ("string as weight", f'objective = "{TOUCH}" · KL(o ‖ q)', "KD120"),
    ("string as setting number", f'train.lr = "{TOUCH}"\nobjective = KL(o ‖ q)', "KD114"),
    ("semicolon statements", "objective = KL(o ‖ q); import os", "KD010"),
    ("nul byte", "objective = KL(o ‖ q)\x00 + CE", "KD010"),
    ("zero-width space", "objective = KL(o ‖ q)\u200b + CE", "KD010"),
    ("bidi override", "objective = KL(o ‖ q) \u202e+ CE", "KD010"),
    ("escape sequence", "objective = KL(o ‖ q) \x1b[31m", "KD010"),
    ("huge literal", "objective = 1e999999 · KL(o ‖ q)", "KD003"),
    ("many digits", "objective = " + "9" * 5000 + " · KL(o ‖ q)", "KD003"),
    ("tiny literal", "objective = 1e-999999 · KL(o ‖ q)", "KD003"),
    ("power tower", "objective = 9^9^9^9 · KL(o ‖ q)", "KD003"),
    ("symbolic power", "g(t) = (t + 1)^1000000\nobjective = g(t) · KL(o ‖ q)", "KD003"),
    ("nested exponentials", "objective = exp(exp(exp(1000))) · KL(o ‖ q)", "KD003"),
    ("log of zero", "objective = log(0) · KL(o ‖ q)", "KD003"),
    ("square root of negative", "objective = sqrt(-4) · KL(o ‖ q)", "KD003"),
    ("division by zero", "objective = KL(o ‖ q) / (1 - 1)", "KD003"),
    ("long operator chain", "objective = " + " + ".join(["CE"] * 1000), "KD002"),
    ("deep unary minus", "objective = " + "-" * 2000 + "CE", "KD002"),
    ("deep calls", "g(t) = " + "exp(" * 400 + "t" + ")" * 400 + "\nobjective = g(t) · CE", "KD002"),
    ("unclosed brackets", "objective = " + "(" * 5000, "KD012"),
    ("balanced brackets", "objective = " + "(" * 3000 + "KL(o ‖ q)" + ")" * 3000, None),
    ("too long", "objective = KL(o ‖ q)\n" + "#" * 200_000, "KD001"),
    ("long name", "a" * 30000 + " = 0.5\nobjective = " + "a" * 30000 + " · KL(o ‖ q)", None),
    ("definition chain", "\n".join(f"f{i}(t) = f{i + 1}(t) + 1" for i in range(300)) + "\nf300(t) = t\nobjective = f0(t) · CE",
     "KD111"),
    ("recursive definition", "f(t) = f(t) + 1\nobjective = f(t) · CE", "KD111"),
    ("self-referencing setting", "train.epochs = train.epochs\nobjective = CE", "KD109"),
]

# Names that would break generated Python, LaTeX or graph text if they leaked into it unescaped.
ORDINARY_NAMES = [
    "__class__", "__import__", "__builtins__", "self", "None", "def", "import", "lambda_", "os", "loss",
    "mask", "labels", "student_logits", "_", "I", "N", "S", "oo", "zoo", "Symbol", "Add", "Expectation",
    "Plus", "Name", "frac", "begin",
]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Run every test in an empty directory, so that a `touch CANARY` would land there."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert not (tmp_path / CANARY).exists(), "spec text was executed"


def check_cli(tmp_path: Path, text: str, capsys) -> tuple[int, str]:
    spec = tmp_path / "hostile.kd"
    spec.write_text(text, encoding="utf-8")
    code = main(["check", str(spec)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("label, text, code", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_spec(label, text, code, in_tmp, capsys):
    if code is None:
        objective = kdsl.load(text)
        format_objective(objective)
        canonical_hash(objective)
        render(objective)
        module = kdsl.compile(text)
        assert isinstance(module, torch.nn.Module)
        return
    with pytest.raises(SpecError) as caught:
        kdsl.load(text)
    first = caught.value.diagnostics[0]
    assert first.code == code, caught.value.render()[:2000]
    assert first.span is not None
    assert first.span.line >= 1
    assert first.span.column >= 1
    assert first.hint
    exit_code, output = check_cli(in_tmp, text, capsys)
    assert exit_code == 1
    assert f"error[{code}]" in output


@pytest.mark.parametrize("name", ORDINARY_NAMES)
def test_ordinary_names_compile(name):
    text = f"{name} = 0.5\n{name}_w(t, w) = exp(-t / 64) · (1 - o(w_t))\nobjective = {name} · {name}_w(t, w) · KL(o ‖ q) + CE"
    objective = kdsl.load(text)
    assert objective.terms[0].coefficient.expr == sympy.Rational(1, 2)
    latex = render(objective)
    assert latex.isascii()
    module = kdsl.compile(text)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    result = module(student_logits=logits, teacher_logits=torch.randn(2, 5, 11), labels=labels)
    assert torch.isfinite(result.loss)


def test_overrides_cannot_inject():
    with pytest.raises(SpecError) as caught:
        kdsl.load("objective = KL(o ‖ q)", {"train.lr": TOUCH})
    assert caught.value.codes == ["KD114"]


def test_bom_and_crlf_are_accepted(in_tmp, capsys):
    spec = in_tmp / "windows.kd"
    spec.write_bytes("\ufeffλ = 0.5\r\nobjective = λ · KL(o ‖ q)\r\n".encode("utf-8"))
    assert main(["check", str(spec)]) == 0


def test_latex_header_sanitises_path(in_tmp):
    objective = kdsl.load("objective = KL(o ‖ q)")
    objective.path = "a\n\\input{/etc/passwd}.kd"
    header = render(objective).splitlines()[0]
    assert header.startswith("% ")
    assert "\\input" not in header


@pytest.mark.slow
def test_one_training_step_runs_no_spec_code(in_tmp):
    from tests.test_samplers import make_model, make_pairs, make_tokenizer
    from kdsl.train import compile_objective, train

    text = (f'teacher = "{TOUCH}"\n__import__ = 0.5\n# {TOUCH}\n'
            "objective = __import__ · KL(o ‖ q) + CE")
    settings = {"train.max_steps": 1, "train.batch_size": 2, "train.baseline": False, "data.max_prompt_tokens": 8,
                "data.max_response_tokens": 8, "eval.max_pairs": 2, "eval.max_new_tokens": 2}
    objective = kdsl.load(text, settings)
    tokenizer = make_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(objective, compile_objective(objective), out_dir=in_tmp / "run",
                       student=make_model(len(tokenizer), seed=1), teacher=make_model(len(tokenizer), seed=2),
                       tokenizer=tokenizer, pairs=make_pairs(4), heldout=make_pairs(2), progress_bar=False)
    finally:
        torch.set_num_threads(threads)
    assert result is not None
    assert (in_tmp / "run" / "metrics.jsonl").is_file()


# --- the source of kdsl itself --------------------------------------------------------------------------

FORBIDDEN_NAMES = {"eval", "exec", "sympify", "parse_expr", "lambdify"}


def forbidden_uses(path: Path) -> list[str]:
    """Find code in one module that could run text as code: eval/exec builtins and sympy's string parsers."""
    tree = python_ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in python_ast.walk(tree):
        if isinstance(node, python_ast.Name) and node.id in FORBIDDEN_NAMES:
            found.append(f"{path.name}:{node.lineno} {node.id}")
        elif isinstance(node, python_ast.Attribute) and node.attr in FORBIDDEN_NAMES - {"eval"}:
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif (isinstance(node, python_ast.Call) and isinstance(node.func, python_ast.Attribute)
              and node.func.attr == "eval" and (node.args or node.keywords)):
            found.append(f"{path.name}:{node.lineno} .eval(...) with arguments")
        elif isinstance(node, python_ast.ImportFrom) and any(a.name in FORBIDDEN_NAMES for a in node.names):
            found.append(f"{path.name}:{node.lineno} import of {[a.name for a in node.names]}")
    return found


def test_no_code_execution_in_kdsl():
    modules = sorted((ROOT / "kdsl").rglob("*.py"))
    assert len(modules) > 10
    found = [use for module in modules for use in forbidden_uses(module)]
    assert found == []


def test_scan_finds_planted_eval(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import sympy\nfrom sympy import sympify\nx = eval(text)\ny = sympy.sympify(text)\n"
                       "model.eval()\nz = sympy.parse_expr(text)\n", encoding="utf-8")
    found = forbidden_uses(planted)
    assert len(found) == 4
    assert not any("model" in use for use in found)
