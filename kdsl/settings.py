"""Registry of the settings a spec may assign (`train.lr = 3e-4`).

Each setting has a type, a default, an optional range and help text. The
checker rejects unknown names (with the nearest known name as a hint) and
values of the wrong type or out of range. The trainer reads the resolved
flat dictionary; it never receives a name that is not declared here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    """Declaration of one setting: its type, default, bounds and help text."""

    name: str
    kind: type  # str, int, float or bool
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None

    def describe_range(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.minimum is not None and self.maximum is not None:
            return f"a value in [{self.minimum}, {self.maximum}]"
        if self.minimum is not None:
            return f"a value >= {self.minimum}"
        if self.maximum is not None:
            return f"a value <= {self.maximum}"
        return f"a {self.kind.__name__}"


_DECLARED: list[Setting] = [
    # Models and data.
    Setting("teacher", str, "builtin:tiny-teacher", "teacher model: a builtin name, a local path or a hub id"),
    Setting("student", str, "builtin:tiny-student", "student model: a builtin name, a local path or a hub id"),
    Setting("ref", str, "", "reference model for sequence weights such as the DIMP ratio (empty: none)"),
    Setting("data", str, "builtin:shakespeare", "dataset: a builtin name, a local file or a hub dataset id"),
    Setting("data.prompt_field", str, "prompt", "field holding the prompt in a json/jsonl/csv/parquet dataset"),
    Setting("data.response_field", str, "response", "field holding the response"),
    Setting("data.train_fraction", float, 1.0, "fraction of the training pairs used (a small transfer set)", 0.0, 1.0),
    Setting("data.max_prompt_tokens", int, 64, "prompts are cut to their last N tokens", 1, None),
    Setting("data.max_response_tokens", int, 64, "responses are cut to their first N tokens", 1, None),
    Setting("data.chat_template", bool, False, "format each prompt as one user turn with the tokenizer's chat template"),
    Setting("lora.r", int, 0, "LoRA rank of the student's adapters through peft (0: train all weights)", 0, None),
    Setting("lora.alpha", float, 16.0, "LoRA scaling numerator (the update is scaled by alpha / r)", 0.0, None),
    Setting("lora.dropout", float, 0.0, "dropout on the LoRA input", 0.0, 1.0),
    Setting("lora.target_modules", str, "", "comma-separated module names to adapt (empty: peft's default for the architecture)"),
    Setting("trust_remote_code", bool, False, "allow model code from the hub (off unless the spec opts in)"),
    # Training.
    Setting("train.seed", int, 0, "seed for initialisation, data order and sampling", 0, None),
    Setting("train.epochs", float, 1.0, "passes over the training pairs (fractions allowed)", 0.0, None),
    Setting("train.max_steps", int, 0, "stop after this many optimizer steps (0: epochs decide)", 0, None),
    Setting("train.batch_size", int, 8, "sequences per micro-batch and sampling group", 1, None),
    Setting("train.grad_accum", int, 1, "micro-batches per optimizer step", 1, None),
    Setting("train.lr", float, 3e-4, "peak learning rate of the student (AdamW)", 0.0, 1.0),
    Setting("train.projector_lr", float, 1e-3, "learning rate of the objective's own parameters (projections)", 0.0, 1.0),
    Setting("train.weight_decay", float, 0.01, "AdamW weight decay", 0.0, 1.0),
    Setting("train.warmup_steps", int, 0, "linear warmup steps before the cosine decay", 0, None),
    Setting("train.schedule", str, "cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant")),
    Setting("train.max_grad_norm", float, 1.0, "gradient clipping norm (0: no clipping)", 0.0, None),
    Setting("train.eval_every", int, 0, "evaluate every N optimizer steps (0: only at the end)", 0, None),
    Setting("train.save_every", int, 0, "write a checkpoint every N optimizer steps (0: only at the end)", 0, None),
    Setting("train.keep_checkpoints", int, 2, "how many step checkpoints to keep", 1, None),
    Setting("train.baseline", bool, True, "also train the same student with CE only for the report"),
    Setting("train.teacher_dtype", str, "auto", "teacher dtype: auto picks bf16 where the CPU or GPU supports it", choices=("auto", "float32", "bfloat16", "float16")),
    Setting("train.mixed_precision", str, "no", "accelerate mixed precision for the student", choices=("no", "bf16", "fp16")),
    Setting("train.chunk_size", int, 1024, "tokens per chunk in the fused loss", 1, None),
    # Generation for d_q and d_o.
    Setting("sgo.max_new_tokens", int, 64, "maximum tokens generated per response", 1, None),
    Setting("sgo.temperature", float, 1.0, "sampling temperature for generated responses", 0.0, None),
    Setting("sgo.top_k", int, 0, "sample from the k most likely tokens (0: all)", 0, None),
    Setting("sgo.top_p", float, 1.0, "nucleus sampling mass", 0.0, 1.0),
    Setting("mixture.per", str, "batch", "a mixture draws its source once per batch or once per sequence", choices=("batch", "sequence")),
    # Adaptive SGO (DistiLLM).
    Setting("adaptive.init_prob", float, 0.0, "initial probability of student generation", 0.0, 1.0),
    Setting("adaptive.max_prob", float, 0.5, "maximum probability of student generation", 0.0, 1.0),
    Setting("adaptive.step", float, 0.1, "increase of the probability when validation loss rises", 0.0, 1.0),
    Setting("adaptive.threshold", float, 0.0, "minimum rise of validation loss that counts", 0.0, None),
    Setting("adaptive.replay_capacity", int, 1000, "sequences kept in the replay buffer", 0, None),
    Setting("adaptive.replay_ratio", float, 0.5, "share of student draws replayed from the buffer when adaptive.fresh_schedule is constant", 0.0, 1.0),
    Setting("adaptive.fresh_schedule", str, "decreasing", "share of student draws generated afresh: decreasing (1 - progress, DistiLLM's default), constant (1 - adaptive.replay_ratio) or increasing (progress)", choices=("decreasing", "constant", "increasing")),
    # Loss.
    Setting("reduction", str, "token", "token: mean over valid tokens; sequence: sum over each response, mean over sequences", choices=("token", "sequence")),
    Setting("js.endpoint", str, "warn", "JS[β] at β = 0 or 1: warn and use the continuous value (0), or reject", choices=("warn", "error")),
    Setting("rho.clip", float, 0.0, "clip sequence weights ρ(w) to at most this value (0: no clipping)", 0.0, None),
    Setting("projection.compat", str, "masked", "projection statistics: masked (kdsl) or dskd (reproduce DSKD numbers)", choices=("masked", "dskd")),
    Setting("projection.accuracy_gate", bool, False, "distil o→q into the student only at positions where argmax o→q is the label (DSKD)"),
    Setting("projection.init", str, "", "projector weights to start from: a safetensors file saved by kdsl or DSKD's projector.pt (empty: random initialisation)"),
    Setting("projection.alignment", str, "learned", "pairs of the cross attention: learned (DSKD: every position may attend to every position of the other stream) or text (only positions that have read the same text, or the latest before)", choices=("learned", "text")),
    Setting("projection.attention", str, "cross", "o→q and q→o: cross (attention across two tokenizations) or aligned (one tokenization, position to position)", choices=("cross", "aligned")),
    Setting("head.policy", str, "truncate", "padded output heads: score only the rows the tokenizer uses", choices=("truncate", "error")),
    # Evaluation.
    Setting("eval.max_pairs", int, 200, "held-out pairs used by evaluation", 1, None),
    Setting("eval.max_new_tokens", int, 48, "tokens generated per response for ROUGE-L and exposure bias", 1, None),
    Setting("eval.max_l", int, 32, "largest prefix length l of the exposure-bias metrics", 1, None),
    Setting("eval.bootstrap", int, 1000, "bootstrap resamples for confidence intervals", 0, None),
    Setting("eval.seed", int, 1234, "seed of evaluation sampling and bootstrap", 0, None),
]

SETTINGS: dict[str, Setting] = {s.name: s for s in _DECLARED}


def nearest_setting(name: str) -> str | None:
    """Return the declared setting name closest to `name`, if any is close."""
    matches = difflib.get_close_matches(name, SETTINGS.keys(), n=1, cutoff=0.6)
    return matches[0] if matches else None


def defaults() -> dict[str, Any]:
    """Return every setting at its default value."""
    return {name: setting.default for name, setting in SETTINGS.items()}
