"""Exposure-bias study: train one student per recipe from the same start and compare them.

Every recipe trains a copy of the same initial student (builtin:tiny-student)
against the same teacher (builtin:tiny-teacher) with the same budget: the same
optimizer steps, batch size, seed and transfer set (a seeded
`data.train_fraction` of the builtin Shakespeare training pairs). The recipes
are the shipped specs plus a CE-only baseline:

    ce        objective = CE                      (no teacher)
    kd        specs/kd.kd        KL(o ‖ q) on dataset responses (teacher forcing)
    gkd       specs/gkd.kd       JS[0.5] under 0.5·d_q + 0.5·d_data (student-generated outputs)
    distillm  specs/distillm.kd  SKL[0.1] under adaptive(d_q, d_data)
    wsgo      specs/wsgo.kd      weighted KL under 0.5·d_q + 0.5·d_data, plus a decaying CE
    dimp      specs/dimp.kd      KL(o ‖ q) on teacher samples weighted by (ref(w)/q(w))^(1/T)

Each student is then evaluated on held-out validation pairs with
`kdsl.evaluate`: held-out CE and KL(o ‖ q) per token, ROUGE-L, and the
exposure-bias metrics of Arora et al. (ACL 2022) with the teacher as the
oracle, every number with a 95% bootstrap band. The held-out CE measured every
`--eval-every` steps during training gives the validation curves.

The shared budget overrides each spec's own learning rate, warmup and
sgo.max_new_tokens (`--lr`, `--warmup-steps`, `--max-new-tokens`). The
defaults are the budget of docs/study.md, which reports this command (about
47 minutes on a shared 2-core machine):

    python examples/exposure_bias_study.py --out runs/study_300 --docs docs --threads 1 --steps 300

writes into --out: one run directory per recipe (spec.kd, settings.json,
metrics.jsonl, student/), eval/ (metrics.json, summary.csv,
exposure_bias.csv), study.json (settings, timings, table) and study.md (the
table in Markdown), and the figures exposure_bias.png (ExAccErr(l) of every
recipe) and validation_ce.png. With --docs the two figures are copied there as
study_exposure_bias.png and study_validation_ce.png. A recipe whose student
is already saved in --out with the same settings is not trained again, so
several `--train-only` runs with disjoint `--recipes` can train in parallel
before one run evaluates them all.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import kdsl  # noqa: E402
from kdsl import checkpoint, evaluate  # noqa: E402
from kdsl.cli import parse_assignments  # noqa: E402
from kdsl.errors import ConfigError  # noqa: E402
from kdsl.samplers import PairEncoder  # noqa: E402
from kdsl.settings import SETTINGS  # noqa: E402
from kdsl.train import (  # noqa: E402
    Parts, Trainer, TrainConfig, compile_objective, heldout_ce, jsonable, load_parts, write_run_files,
)

log = logging.getLogger("kdsl.study")

SPECS = REPO / "specs"
RECIPES: dict[str, str | Path] = {
    "ce": "# CE-only baseline: the student's own cross-entropy on dataset responses.\nobjective = CE\n",
    "kd": SPECS / "kd.kd",
    "gkd": SPECS / "gkd.kd",
    "distillm": SPECS / "distillm.kd",
    "wsgo": SPECS / "wsgo.kd",
    "dimp": SPECS / "dimp.kd",
}
# Prefix lengths shown in the table besides the largest one; the figure shows every l.
TABLE_LENGTHS = (8, 16)


# --- Command line -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/exposure_bias_study"), help="output folder")
    parser.add_argument("--docs", type=Path, default=None, help="also copy the two figures into this folder")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated recipes to train (default: all of {', '.join(RECIPES)})")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per recipe (default 300)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step and sampling group (default 8)")
    parser.add_argument("--train-fraction", type=float, default=0.1, help="share of the training pairs used (default 0.1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every recipe (default 1e-3)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps of every recipe (default 10)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="sgo.max_new_tokens: tokens per generated response of d_q and d_o (default 32)")
    parser.add_argument("--eval-every", type=int, default=10, help="held-out CE every N steps during training (default 10)")
    parser.add_argument("--eval-pairs", type=int, default=80, help="held-out pairs of every evaluation (default 80)")
    parser.add_argument("--max-l", type=int, default=32, help="largest prefix length of the exposure-bias metrics (default 32)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of each band (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed of every recipe (default 0)")
    parser.add_argument("--teacher", default=None, help="teacher model (default: each spec's, builtin:tiny-teacher)")
    parser.add_argument("--student", default=None, help="initial student (default: each spec's, builtin:tiny-student)")
    parser.add_argument("--ref", default=None, help="reference model of dimp (default: the spec's, builtin:tiny-ref)")
    parser.add_argument("--data", default=None, help="dataset (default: each spec's, builtin:shakespeare)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of every recipe, e.g. --set train.chunk_size=512 (repeatable)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--train-only", action="store_true",
                        help="train the recipes and stop; a later run with the same settings evaluates them")
    args = parser.parse_args(argv)

    args.recipes = [name.strip() for name in args.recipes.split(",") if name.strip()]
    unknown = [name for name in args.recipes if name not in RECIPES]
    if unknown or not args.recipes:
        parser.error(f"unknown recipe(s) {unknown or args.recipes}; choose from {', '.join(RECIPES)}")
    for name in ("steps", "batch_size", "eval_pairs", "max_l", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 < args.train_fraction <= 1.0:
        parser.error(f"--train-fraction must lie in (0, 1], got {args.train_fraction}")
    return args


# Settings a spec may also set that are part of the budget, pinned to their registry defaults for every recipe.
PINNED = ("train.grad_accum", "train.schedule", "train.weight_decay", "train.max_grad_norm",
          "data.max_prompt_tokens", "data.max_response_tokens", "eval.max_new_tokens", "eval.seed")


def study_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Return the settings every recipe shares: the budget, the data and the evaluation."""
    settings: dict[str, Any] = {name: SETTINGS[name].default for name in PINNED}
    settings.update({
        "train.max_steps": args.steps,
        "train.batch_size": args.batch_size,
        "train.lr": args.lr,
        "train.warmup_steps": args.warmup_steps,
        "sgo.max_new_tokens": args.max_new_tokens,
        "train.seed": args.seed,
        "train.eval_every": args.eval_every,
        "train.save_every": 0,
        "train.baseline": False,
        "data.train_fraction": args.train_fraction,
        "eval.max_pairs": args.eval_pairs,
        "eval.max_l": args.max_l,
        "eval.bootstrap": args.bootstrap,
    })
    for key in ("teacher", "student", "data"):
        if getattr(args, key):
            settings[key] = getattr(args, key)
    settings.update(parse_assignments(args.set))
    return settings


def load_recipe(name: str, settings: dict[str, Any], ref: str | None) -> Any:
    """Check one recipe's spec with the shared settings; `ref` replaces the spec's reference model, if it has one."""
    source = RECIPES[name]
    objective = kdsl.load(source, settings)
    if ref and objective.settings.get("ref"):
        objective = kdsl.load(source, {**settings, "ref": ref})
    return objective


# --- Training -------------------------------------------------------------------------------


class TimedTrainer(Trainer):
    """The kdsl training loop, timing batch sampling (generation included) and in-training evaluations."""

    sample_seconds = 0.0
    eval_seconds = 0.0

    def draw(self, point):
        started = time.perf_counter()
        batches = super().draw(point)
        self.sample_seconds += time.perf_counter() - started
        return batches

    def evaluate(self, point):
        started = time.perf_counter()
        loss = super().evaluate(point)
        self.eval_seconds += time.perf_counter() - started
        return loss


@dataclass
class RecipeRun:
    """One trained student, its metrics and where its training time went."""

    name: str
    student: Any
    metrics: list[dict]
    timing: dict[str, float] = field(default_factory=dict)
    eval_seconds: float = 0.0

    def validation_curve(self, initial_ce: float) -> list[tuple[int, float]]:
        """Held-out CE at step 0, at every in-training evaluation and after the last step, as (step, CE)."""
        points = {0: initial_ce}
        points.update({r["step"]: r["eval/ce"] for r in self.metrics if "eval/ce" in r})
        points[int(self.timing["steps"])] = self.timing["final_heldout_ce"]
        return sorted(points.items())


def measure_heldout_ce(model: Any, parts: Parts, config: TrainConfig, accelerator: Any) -> float:
    """Held-out CE in nats per response token, measured as the trainer measures it during training."""
    encoder = PairEncoder(parts.tokenizer, config.max_prompt_tokens, config.max_response_tokens)
    return heldout_ce(accelerator, model, encoder, parts.heldout, config.eval_pairs, config.batch_size)


def train_recipe(name: str, objective: Any, initial: Any, parts: Parts, accelerator: Any, out_dir: Path) -> RecipeRun:
    """Train a copy of `initial` with one recipe, or load its student when `out_dir/<name>` has it with the same settings."""
    from accelerate.utils import set_seed

    run_dir = out_dir / name
    student = copy.deepcopy(initial)
    timing_path = run_dir / "study_run.json"
    settings_path = run_dir / "settings.json"
    same = settings_path.exists() and json.loads(settings_path.read_text()) == jsonable(objective.settings)
    finished = checkpoint.load_finished(run_dir, student, name) if same else None
    if finished is not None and timing_path.exists():
        log.info("%s: student already trained in %s", name, run_dir)
        return RecipeRun(name, finished.student, finished.metrics, json.loads(timing_path.read_text()))

    config = TrainConfig.from_settings(objective.settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_files(run_dir, objective)
    set_seed(config.seed)
    started = time.perf_counter()
    trainer = TimedTrainer(
        name=name, objective=objective, compiled=compile_objective(objective), student=student,
        teacher=parts.teacher, tokenizer=parts.tokenizer, pairs=parts.pairs, heldout=parts.heldout,
        config=config, accelerator=accelerator, run_dir=run_dir, ref=parts.ref, progress_bar=False,
    )
    trainer.metrics.open(0)
    fit = trainer.run()
    total = time.perf_counter() - started
    timing = {
        # Millisecond resolution: a tiny run's sampling takes well under 0.1 s and must not round to 0.
        "train_seconds": round(total, 3),
        "sample_seconds": round(trainer.sample_seconds, 3),
        "heldout_ce_seconds": round(trainer.eval_seconds, 3),
        "steps": fit.steps,
        "tokens": fit.tokens,
        "final_heldout_ce": measure_heldout_ce(fit.student, parts, config, accelerator),
    }
    checkpoint.atomic_write_json(timing_path, timing)
    log.info("%s: %d steps in %.0f s (sampling %.0f s)", name, fit.steps, total, trainer.sample_seconds)
    return RecipeRun(name, fit.student.eval(), fit.metrics, timing)


# --- Evaluation and report -----------------------------------------------------------------


def evaluate_runs(runs: list[RecipeRun], initial: Any, parts: Parts, settings: dict, out_dir: Path) -> dict:
    """Evaluate every student (and the initial one, CE and KL only); write eval/ and exposure_bias.png."""
    results = {}
    heldout = list(zip(parts.heldout["prompt"], parts.heldout["response"]))
    started = time.perf_counter()
    results.update(evaluate.evaluate_checkpoints(
        settings, {"initial": initial}, None, teacher=parts.teacher, tokenizer=parts.tokenizer,
        pairs=heldout, metrics=["ce", "bpc", "kl"],
    ))
    log.info("initial student evaluated in %.0f s", time.perf_counter() - started)
    for run in runs:
        started = time.perf_counter()
        results.update(evaluate.evaluate_checkpoints(
            settings, {run.name: run.student}, None, teacher=parts.teacher, tokenizer=parts.tokenizer, pairs=heldout,
        ))
        run.eval_seconds = time.perf_counter() - started
        log.info("%s evaluated in %.0f s", run.name, run.eval_seconds)
    evaluate.write_report(results, str(out_dir / "eval"))
    curves = {run.name: results[run.name].exposure for run in runs}
    evaluate.plot_exposure_bias(curves, str(out_dir / "exposure_bias.png"))
    return results


def plot_validation(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Plot held-out CE over training steps for every recipe into a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    for name, points in curves.items():
        steps, values = zip(*points)
        axes.plot(steps, values, marker="o", markersize=3, label=name)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("held-out CE (nats per token)")
    axes.set_title("Held-out CE during training")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.name)
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def exposure_slope(result: evaluate.ExposureBiasResult) -> float:
    """Least-squares slope of ExAccErr(l) in percent per token over l ≥ 2 (l = 1 is 0 by construction)."""
    points = [(l, v) for l, v in zip(result.l, result.ex_acc_err) if l >= 2 and math.isfinite(v)]
    if len(points) < 2:
        return math.nan
    mean_l = sum(l for l, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    numerator = sum((l - mean_l) * (v - mean_v) for l, v in points)
    denominator = sum((l - mean_l) ** 2 for l, _ in points)
    return numerator / denominator


def table_rows(runs: list[RecipeRun], results: dict, curves: dict) -> list[dict]:
    """Return one row per recipe (and the initial student) with every number of the study table."""
    rows = []
    for label, result in results.items():
        h, r, e = result.heldout, result.rouge, result.exposure
        row: dict[str, Any] = {
            "recipe": label,
            "ce": h.ce, "ce_ci": list(h.ce_ci),
            "kl": h.kl, "kl_ci": list(h.kl_ci),
            "teacher_ce": h.teacher_ce,
        }
        if r is not None:
            row.update({"rouge_l": 100 * r.f1, "rouge_l_ci": [100 * v for v in r.f1_ci]})
        if e is not None:
            for l in [l for l in TABLE_LENGTHS if l < len(e.l)] + [len(e.l)]:
                row[f"ex_acc_err_{l}"] = e.ex_acc_err[l - 1]
                row[f"ex_acc_err_{l}_ci"] = [e.ex_acc_err_ci[0][l - 1], e.ex_acc_err_ci[1][l - 1]]
            row["ex_acc_err_slope"] = exposure_slope(e)
            row["alive_student_max_l"] = e.alive_student[-1]
            row["alive_oracle_max_l"] = e.alive_oracle[-1]
        points = curves.get(label, [])
        if points:
            values = [v for _, v in points]
            row.update({"val_ce_first": values[0], "val_ce_min": min(values), "val_ce_last": values[-1],
                        "val_ce_max_rise": max(later - min(values[: i + 1]) for i, later in enumerate(values))})
        run = next((run for run in runs if run.name == label), None)
        if run is not None:
            row.update(run.timing)
            row["eval_seconds"] = round(run.eval_seconds, 1)
            probs = [m["sched/adaptive/prob"] for m in run.metrics if "sched/adaptive/prob" in m]
            if probs:
                row["adaptive_prob_last"] = probs[-1]
        rows.append(row)
    return rows


def _cell(value: Any, band: Any = None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}g}"
    if band and all(b is not None and math.isfinite(b) for b in band):
        text += f" [{band[0]:.{digits}g}, {band[1]:.{digits}g}]"
    return text


def markdown_table(rows: list[dict]) -> str:
    """Render the study table in Markdown: metrics with 95% bands, then the training time."""
    shown = {int(key.split("_")[-1]) for row in rows for key in row if key.startswith("ex_acc_err_") and key[-1].isdigit()}
    lengths = sorted(shown)
    header = ["recipe", "held-out CE", "KL(o‖q)/tok", "ROUGE-L"] + [f"ExAccErr({l}) %" for l in lengths]
    header += ["slope %/tok", "val CE first → min → last", "train s (sampling)", "eval s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["recipe"], _cell(row["ce"], row["ce_ci"]), _cell(row["kl"], row["kl_ci"]),
                 _cell(row.get("rouge_l"), row.get("rouge_l_ci"))]
        cells += [_cell(row.get(f"ex_acc_err_{l}"), row.get(f"ex_acc_err_{l}_ci")) for l in lengths]
        cells.append(_cell(row.get("ex_acc_err_slope"), digits=2))
        if "val_ce_first" in row:
            cells.append(f"{row['val_ce_first']:.3f} → {row['val_ce_min']:.3f} → {row['val_ce_last']:.3f}")
        else:
            cells.append("-")
        cells.append(f"{row['train_seconds']:.0f} ({row['sample_seconds']:.0f})" if "train_seconds" in row else "-")
        cells.append(f"{row['eval_seconds']:.0f}" if "eval_seconds" in row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(args, settings: dict, rows: list[dict], curves: dict, wall: float) -> None:
    out = args.out
    plot_validation(curves, out / "validation_ce.png")
    table = markdown_table(rows)
    atomic_write_bytes(out / "study.md", table.encode("utf-8"))
    document = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else "",
        "settings": {k: v if isinstance(v, (str, int, float, bool)) else str(v) for k, v in settings.items()},
        "recipes": args.recipes,
        "wall_seconds": round(wall, 1),
        "validation_ce": evaluate._finite_or_none(curves),
        "rows": evaluate._finite_or_none(rows),
    }
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
    atomic_write_bytes(out / "study.json", (text + "\n").encode("utf-8"))
    if args.docs is not None:
        for source, name in ((out / "exposure_bias.png", "study_exposure_bias.png"),
                             (out / "validation_ce.png", "study_validation_ce.png")):
            atomic_write_bytes(args.docs / name, source.read_bytes())
    print(table)
    print(f"wall time {wall:.0f} s; outputs in {out}")


# --- Main -------------------------------------------------------------------------------------


def load_shared_parts(objectives: dict[str, Any]) -> Parts:
    """Load the tokenizer, initial student, teacher, reference (if a recipe reads one) and data once for every recipe."""
    with_ref = next((o for o in objectives.values() if o.settings.get("ref")), None)
    first = with_ref or next(iter(objectives.values()))
    config = TrainConfig.from_settings(first.settings)
    return load_parts(first.settings, config, Parts(None, None, None, None, None, None))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    started = time.perf_counter()
    settings = study_settings(args)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # kdsl.train logs through accelerate
    try:
        objectives = {name: load_recipe(name, settings, args.ref) for name in args.recipes}
        parts = load_shared_parts(objectives)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    initial = parts.student.eval()
    log.info("%d training pairs, %d held-out pairs, recipes: %s", len(parts.pairs), len(parts.heldout),
             ", ".join(args.recipes))

    args.out.mkdir(parents=True, exist_ok=True)
    runs = [train_recipe(name, objectives[name], initial, parts, accelerator, args.out) for name in args.recipes]
    if args.train_only:
        return 0
    eval_settings = next(iter(objectives.values())).settings
    results = evaluate_runs(runs, initial, parts, eval_settings, args.out)
    initial_ce = measure_heldout_ce(initial, parts, TrainConfig.from_settings(eval_settings), accelerator)
    curves = {run.name: run.validation_curve(initial_ce) for run in runs}
    rows = table_rows(runs, results, curves)
    write_outputs(args, settings, rows, curves, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
