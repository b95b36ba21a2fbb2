"""The run's report: teacher, initial student, CE baseline and distilled student on held-out pairs.

Each model gets the held-out CE of the reference responses (nats per token),
bits per character, the KL from the teacher KL(o ‖ q) averaged over response
tokens (the headline number of a distillation run) and ROUGE-L of greedy
continuations. The table is printed by the main process and written to
`report.json`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from kdsl import checkpoint
from kdsl.samplers import GenerationSettings, PairEncoder, collate, generate_examples

logger = logging.getLogger("kdsl.report")

COLUMNS = (
    ("model", "model", "{}"),
    ("steps", "steps", "{}"),
    ("ce", "CE nats/tok", "{:.4f}"),
    ("bits_per_char", "bits/char", "{:.4f}"),
    ("kl", "KL(o‖q)", "{:.4f}"),
    ("rouge_l", "ROUGE-L", "{:.2f}"),
)


def run_report(*, accelerator: Any, out_dir: Path, settings: dict, tokenizer: Any, teacher: Any,
               initial: Any, distilled: Any, baseline: Any, heldout: Any, print_table: bool = True) -> dict | None:
    """Evaluate every model of the run on the held-out pairs; write report.json on the main process.

    Returns the report on the main process and None on the others.
    """
    accelerator.wait_for_everyone()
    report = None
    if accelerator.is_main_process and heldout is not None and len(heldout) > 0:
        device = accelerator.device
        encoder = PairEncoder(tokenizer, int(settings.get("data.max_prompt_tokens", 64)),
                              int(settings.get("data.max_response_tokens", 64)))
        options = EvalOptions.from_settings(settings)
        pairs = heldout.select(range(min(options.max_pairs, len(heldout))))
        rows = []
        entries = [("teacher", teacher, None), ("student (initial)", initial, 0)]
        if baseline is not None:
            entries.append(("baseline (CE)", baseline.student, baseline.steps))
        entries.append(("distilled", distilled.student, distilled.steps))
        for name, model, steps in entries:
            if model is None:
                continue
            moved = model.to(device)
            metrics = evaluate_model(moved, teacher.to(device), encoder, pairs, tokenizer, options)
            rows.append({"model": name, "steps": steps, **metrics})
        report = {
            "heldout_pairs": len(pairs),
            "tokens": {"distilled": distilled.tokens, "baseline": baseline.tokens if baseline else None},
            "rows": rows,
        }
        checkpoint.atomic_write_json(Path(out_dir) / "report.json", report)
        table = format_table(rows)
        logger.info("report on %d held-out pairs:\n%s", len(pairs), table)
        if print_table:
            print(table)
    accelerator.wait_for_everyone()
    return report


class EvalOptions:
    """Evaluation options of the report, read from the eval.* settings."""

    def __init__(self, max_pairs: int, max_new_tokens: int, batch_size: int):
        self.max_pairs = max_pairs
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @classmethod
    def from_settings(cls, settings: dict) -> "EvalOptions":
        return cls(int(settings.get("eval.max_pairs", 200)), int(settings.get("eval.max_new_tokens", 48)),
                   int(settings.get("train.batch_size", 8)))


def evaluate_model(model: Any, teacher: Any, encoder: PairEncoder, pairs: Any, tokenizer: Any,
                   options: EvalOptions) -> dict[str, float]:
    """Compute held-out CE, bits per character, KL(o ‖ q) and ROUGE-L of one model."""
    was_training = model.training
    model.eval()
    nll = kl = 0.0
    tokens = characters = 0
    scores = []
    vocab = len(tokenizer)
    with torch.no_grad():
        for start in range(0, len(pairs), options.batch_size):
            rows = pairs[start : start + options.batch_size]
            examples = [encoder.encode(p, r) for p, r in zip(rows["prompt"], rows["response"])]
            batch = collate(examples, encoder.pad_id).to(next(model.parameters()).device)
            labels = batch.labels[:, 1:]  # (B, L-1)
            mask = labels != -100
            log_q = log_probs(model, batch, vocab)  # (B, L-1, V)
            log_o = log_q if model is teacher else log_probs(teacher, batch, vocab)

            safe_labels = labels.clamp(min=0).unsqueeze(-1)
            nll += float(-(log_q.gather(-1, safe_labels).squeeze(-1) * mask).sum())
            kl_per_position = (log_o.exp() * (log_o - log_q)).sum(-1)  # (B, L-1)
            kl += float((kl_per_position * mask).sum())
            tokens += int(mask.sum())
            characters += sum(len(tokenizer.decode(e.response, skip_special_tokens=True)) for e in examples)

            scores.extend(rouge_scores(model, examples, rows["response"], encoder, tokenizer, options))
    model.train(was_training)
    return {
        "ce": nll / max(tokens, 1),
        "bits_per_char": nll / math.log(2) / max(characters, 1),
        "kl": kl / max(tokens, 1),
        "rouge_l": 100.0 * sum(scores) / max(len(scores), 1),
    }


def log_probs(model: Any, batch: Any, vocab: int) -> torch.Tensor:
    """Log-probabilities over the tokenizer's vocabulary at each position that predicts a next token."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    return torch.log_softmax(logits[..., :vocab].float(), dim=-1)  # (B, L-1, V); padded head rows dropped


def rouge_scores(model: Any, examples: Sequence[Any], references: Sequence[str], encoder: PairEncoder,
                 tokenizer: Any, options: EvalOptions) -> list[float]:
    """Score the model's greedy continuation of each prompt against its reference response (ROUGE-L F1)."""
    greedy = GenerationSettings(max_new_tokens=options.max_new_tokens, temperature=0.0)
    generated = generate_examples(
        model, [e.prompt for e in examples], pad_id=encoder.pad_id,
        eos_ids=frozenset({encoder.eos_id}), settings=greedy, source="eval",
    )
    scores = []
    for example, reference in zip(generated, references):
        reference_ids = tokenizer(reference, add_special_tokens=False)["input_ids"][: options.max_new_tokens]
        hypothesis = tokenizer.decode(example.response, skip_special_tokens=True)
        scores.append(rouge_l(hypothesis, tokenizer.decode(reference_ids, skip_special_tokens=True)))
    return scores


def rouge_l(hypothesis: str, reference: str) -> float:
    """Compute ROUGE-L F1 over lower-cased whitespace words (Lin, 2004), in [0, 1]."""
    hyp, ref = hypothesis.lower().split(), reference.lower().split()
    if not hyp or not ref:
        return 0.0
    previous = [0] * (len(ref) + 1)
    for word in hyp:
        current = [0]
        for j, other in enumerate(ref):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def format_table(rows: list[dict]) -> str:
    """Render report rows as a fixed-width text table."""
    header = [title for _, title, _ in COLUMNS]
    body = []
    for row in rows:
        cells = []
        for key, _, form in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else form.format(value))
        body.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) for cells in body)
    return "\n".join(lines)
