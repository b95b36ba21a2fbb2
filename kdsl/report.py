"""The run's report: teacher, initial student, CE baseline and distilled student on held-out pairs.

Each model gets the held-out CE of the reference responses (nats per token),
bits per character, the KL from the teacher KL(o ‖ q) averaged over response
tokens (the headline number of a distillation run) and ROUGE-L of greedy
continuations, all computed by `kdsl.evaluate` with bootstrap intervals
(`eval.bootstrap`). The table is printed by the main process and written to
`report.json`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from kdsl import checkpoint

logger = logging.getLogger("kdsl.report")

COLUMNS = (
    ("model", "model", "{}"),
    ("steps", "steps", "{}"),
    ("ce", "CE nats/tok", "{:.4f}"),
    ("bits_per_char", "bits/char", "{:.4f}"),
    ("kl", "KL(o‖q)", "{:.4f}"),
    ("rouge_l", "ROUGE-L F1 ×100", "{:.2f}"),
)


def run_report(*, accelerator: Any, out_dir: Path, settings: dict, tokenizer: Any, teacher: Any,
               initial: Any, distilled: Any, baseline: Any, heldout: Any, print_table: bool = True,
               teacher_tokenizer: Any = None) -> dict | None:
    """Evaluate every model of the run on the held-out pairs; write report.json on the main process.

    With `teacher_tokenizer` (a teacher with its own vocabulary) the teacher
    is scored on its own tokens, and KL(o ‖ q) is left out: the two models
    have no common positions. Bits per character compare them across
    tokenizers. Returns the report on the main process and None on the others.
    """
    accelerator.wait_for_everyone()
    report = None
    if accelerator.is_main_process and heldout is not None and len(heldout) > 0:
        device = accelerator.device
        options = EvalOptions(settings)
        pairs = heldout.select(range(min(options.max_pairs, len(heldout))))
        rows = []
        entries = [("teacher", teacher, None), ("student (initial)", initial, 0)]
        if baseline is not None:
            entries.append(("baseline (CE)", baseline.student, baseline.steps))
        entries.append(("distilled", distilled.student, distilled.steps))
        two_vocabularies = teacher_tokenizer is not None
        scored = {}
        for name, model, steps in entries:
            if model is None:
                continue
            if not two_vocabularies:
                metrics = evaluate_model(model.to(device), teacher.to(device), tokenizer, pairs, options)
            elif model is teacher:
                metrics = evaluate_model(model.to(device), None, teacher_tokenizer, pairs, options)
            else:
                metrics = evaluate_model(model.to(device), None, tokenizer, pairs, options)
            scored[name] = metrics.pop("heldout")
            rows.append({"model": name, "steps": steps, **metrics})
        report = {
            "heldout_pairs": len(pairs),
            "tokenizers": "two: the teacher's CE counts its own tokens, compare bits/char" if two_vocabularies else "one",
            "tokens": {"distilled": distilled.tokens, "baseline": baseline.tokens if baseline else None},
            "rows": rows,
        }
        if "baseline (CE)" in scored:
            report["distilled_minus_baseline"] = compare_students(scored["distilled"], scored["baseline (CE)"], options)
        report = finite(report)
        checkpoint.atomic_write_text(Path(out_dir) / "report.json", json.dumps(report, indent=2) + "\n")
        table = format_table(rows)
        if two_vocabularies:
            table += ("\nThe teacher has its own tokenizer: its CE is per teacher token and KL(o‖q) is not defined; "
                      "compare models by bits/char.")
        if "distilled_minus_baseline" in report:
            table += "\n" + format_comparison(report["distilled_minus_baseline"])
        if print_table:
            print(f"report on {len(pairs)} held-out pairs:\n{table}")
        else:
            logger.info("report on %d held-out pairs:\n%s", len(pairs), table)
    accelerator.wait_for_everyone()
    return report


class EvalOptions:
    """Evaluation options of the report, read from the eval.* and data.* settings."""

    def __init__(self, settings: dict):
        self.max_pairs = int(settings.get("eval.max_pairs", 200))
        self.max_new_tokens = int(settings.get("eval.max_new_tokens", 48))
        self.batch_size = int(settings.get("train.batch_size", 8))
        self.max_prompt_tokens = int(settings.get("data.max_prompt_tokens", 64))
        self.max_response_tokens = int(settings.get("data.max_response_tokens", 64))
        self.bootstrap = int(settings.get("eval.bootstrap", 0))
        self.seed = int(settings.get("eval.seed", 1234))


def evaluate_model(model: Any, teacher: Any, tokenizer: Any, pairs: Any, options: EvalOptions) -> dict[str, Any]:
    """Compute held-out CE, bits per character, KL(o ‖ q) and ROUGE-L of one model with kdsl.evaluate."""
    from kdsl import evaluate

    heldout = evaluate.heldout_metrics(
        model, teacher, tokenizer, pairs, batch_size=options.batch_size,
        max_prompt_tokens=options.max_prompt_tokens, max_response_tokens=options.max_response_tokens,
        bootstrap=options.bootstrap, seed=options.seed,
    )
    rouge = evaluate.rouge_l(
        model, tokenizer, pairs, max_new_tokens=options.max_new_tokens,
        max_prompt_tokens=options.max_prompt_tokens, batch_size=options.batch_size,
        bootstrap=options.bootstrap, seed=options.seed,
    )
    return {
        "ce": heldout.ce,
        "bits_per_char": heldout.bpc,
        "kl": heldout.kl,
        "rouge_l": 100.0 * rouge.f1,
        "ce_ci": list(heldout.ce_ci),
        "kl_ci": list(heldout.kl_ci),
        "rouge_l_ci": [100.0 * v for v in rouge.f1_ci],
        "tokens": heldout.num_tokens,
        "heldout": heldout,
    }


def compare_students(distilled: Any, baseline: Any, options: EvalOptions) -> dict[str, Any]:
    """CE of the distilled student minus the baseline's on the same pairs, with a paired bootstrap band."""
    from kdsl import evaluate

    paired = evaluate.paired_ce_difference(distilled, baseline, bootstrap=options.bootstrap, seed=options.seed)
    return {"ce": paired.difference, "ce_ci": list(paired.ci), "pairs": paired.num_pairs,
            "pairs_distilled_lower": paired.wins}


def format_comparison(comparison: dict[str, Any]) -> str:
    """Say in one line how much lower (or higher) the distilled student's held-out CE is than the baseline's."""
    low, high = comparison["ce_ci"]
    band = "" if low is None or high is None else f", 95% paired bootstrap interval [{low:+.4f}, {high:+.4f}]"
    return (f"distilled - baseline: {comparison['ce']:+.4f} nats/token{band}; the distilled student is lower on "
            f"{comparison['pairs_distilled_lower']} of {comparison['pairs']} pairs.")


def finite(value: Any) -> Any:
    """Replace NaN and infinities by None, so that report.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def format_table(rows: list[dict]) -> str:
    """Render report rows as a fixed-width text table."""
    header = [title for _, title, _ in COLUMNS]
    body = []
    for row in rows:
        cells = []
        for key, _, form in COLUMNS:
            value = row.get(key)
            missing = value is None or (isinstance(value, float) and not math.isfinite(value))
            cells.append("-" if missing else form.format(value))
        body.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) for cells in body)
    return "\n".join(lines)
