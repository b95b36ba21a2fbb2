"""Evaluation of students against a teacher.

Metrics, all over prompt/response pairs (a list of dicts or a
`datasets.Dataset` with `prompt` and `response` columns):

- held-out cross-entropy (nats per response token), bits per character and
  KL(teacher ‖ student) per response token, teacher-forced on the dataset
  responses (`heldout_metrics`);
- ROUGE-L F1 of greedy continuations against the reference responses
  (`rouge_l`);
- the exposure-bias metrics of Arora et al., "Why Exposure Bias Matters: An
  Imitation Learning Perspective of Error Accumulation in Language
  Generation" (ACL 2022), with the teacher as the oracle (`exposure_bias`).

Exposure-bias definitions. For prompts x_1..x_N, the teacher samples an
oracle continuation y^o_i and the student samples its own continuation y^s_i,
each of at most `max_l` tokens. With ℓ the per-step loss (KL(o ‖ q) by
default) between the teacher's and the student's next-token distributions:

    ε_t      = (1/N) Σ_i ℓ(x_i, y^o_{i,<t})                  error on oracle prefixes
    ε_{≤l}   = (1/l) Σ_{t≤l} ε_t                             mean per-step error
    L_{≤l}   = (1/N) Σ_i Σ_{t≤l} ℓ(x_i, y^s_{i,<t})           accumulated, own prefixes
    AccErr(l)   = L_{≤l} / ε_{≤l}
    ExAccErr(l) = (L_{≤l} − l·ε_{≤l}) / (l·ε_{≤l}) · 100

ε_{≤l} is a mean, as in the authors' code (kushalarora/quantifying_exposure_bias,
which reports `acc_err = l · ratio` and `excess = (ratio − 1) · 100` for the ratio
of the two summed KLs), so l·ε_{≤l} = Σ_{t≤l} ε_t counts each step once. A
student without exposure bias has AccErr(l) = l and ExAccErr(l) = 0. A
continuation that ends with EOS at step T contributes ℓ = 0 at every t > T.
When Σ_{t≤l} ε_t and L_{≤l} are both zero (the student matches the teacher at
every measured step), AccErr(l) = l and ExAccErr(l) = 0, the limit as the
student approaches the teacher. When only Σ_{t≤l} ε_t is zero, both are +inf.

Confidence intervals come from a percentile bootstrap over prompts (or pairs):
each resample draws N indices with replacement, with a fixed seed.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from kdsl import numerics
from kdsl.errors import ConfigError
from kdsl.samplers import quiet_padding_warning
from kdsl.settings import defaults as default_settings

logger = logging.getLogger("kdsl.evaluate")

__all__ = [
    "EVAL_METRICS",
    "PER_STEP_LOSSES",
    "HeldoutMetrics",
    "PairedDifference",
    "paired_ce_difference",
    "RougeResult",
    "ExposureBiasResult",
    "CheckpointEvaluation",
    "load_pairs",
    "heldout_metrics",
    "rouge_l",
    "generate_continuations",
    "exposure_bias",
    "exposure_bias_from_losses",
    "evaluate_checkpoints",
    "write_report",
    "plot_exposure_bias",
    "format_table",
]

# Metric names an `eval` line may use. `ce`, `bpc` and `kl` come from one
# teacher-forced pass (`heldout_metrics`).
EVAL_METRICS = ("ce", "bpc", "kl", "rouge_l", "exposure_bias")
_HELDOUT_METRICS = frozenset({"ce", "bpc", "kl"})

# A summed per-step loss at or below this many nats per step counts as zero
# in AccErr and ExAccErr. The float32 KL of two identical distributions is exactly 0.
ZERO_LOSS_PER_STEP = 1e-9

CI_LEVEL = 0.95


# --- Per-step losses ------------------------------------------------------------------


def _forward_kl(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    return numerics.kl(teacher_logp, student_logp)


def _reverse_kl(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    return numerics.kl(student_logp, teacher_logp)


def _total_variation(teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
    return numerics.total_variation(teacher_logp, student_logp)


# name -> (function of (teacher log-probs, student log-probs), description)
PER_STEP_LOSSES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], str]] = {
    "kl": (_forward_kl, "KL(teacher ‖ student)"),
    "reverse_kl": (_reverse_kl, "KL(student ‖ teacher)"),
    "tvd": (_total_variation, "total variation distance"),
}


def _per_step_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    if name not in PER_STEP_LOSSES:
        known = ", ".join(PER_STEP_LOSSES)
        raise ConfigError(f"unknown per-step loss {name!r}; use one of {known}")
    return PER_STEP_LOSSES[name][0]


# --- Input checks and pairs ------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _check_temperature(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"temperature must be a finite number > 0, got {value!r}; use 1.0 to sample from the model itself")
    return float(value)


def load_pairs(pairs: Any) -> list[tuple[str, str]]:
    """Convert pairs (dicts, (prompt, response) tuples or a `datasets.Dataset`) into tuples.

    Raises `ConfigError` naming the first row without a string `prompt` or `response`.
    """
    if hasattr(pairs, "column_names"):
        missing = [name for name in ("prompt", "response") if name not in pairs.column_names]
        if missing:
            raise ConfigError(
                f"dataset has no column {missing[0]!r} (columns: {', '.join(pairs.column_names)}); "
                "rename the prompt and response columns to 'prompt' and 'response'"
            )
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise ConfigError(
            f"pairs must be a list of {{'prompt': ..., 'response': ...}} dicts or a datasets.Dataset, "
            f"got {type(pairs).__name__}"
        )

    result = []
    for index, row in enumerate(pairs):
        if isinstance(row, tuple) and len(row) == 2 and all(isinstance(text, str) for text in row):
            result.append(row)
            continue
        if not isinstance(row, Mapping):
            raise ConfigError(f"pair {index} is a {type(row).__name__}, expected a dict with 'prompt' and 'response'")
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                found = "missing" if key not in row else f"a {type(row[key]).__name__}"
                raise ConfigError(f"pair {index}: {key!r} is {found}, expected a string")
        result.append((row["prompt"], row["response"]))
    if not result:
        raise ConfigError("no prompt/response pairs to evaluate; pass at least one pair")
    return result


def _load_prompts(prompts: Any) -> list[str]:
    """Accept a list of prompt strings or pairs (dicts or a `datasets.Dataset`)."""
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        return list(prompts)
    return [prompt for prompt, _ in load_pairs(prompts)]


# --- Tokenization ----------------------------------------------------------------------


@dataclass(frozen=True)
class _EncodedPair:
    prompt_ids: list[int]
    response_ids: list[int]
    response_chars: int  # characters of the response text the kept tokens cover


def _token_ids(tokenizer: Any) -> tuple[int, int | None]:
    """Return (pad id, EOS id). The pad id falls back to EOS, then to 0 (always masked)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos if eos is not None else 0
    return pad, eos


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == bos


def _encode_prompt(tokenizer: Any, text: str, max_tokens: int, index: int) -> list[int]:
    """Encode a prompt, keep its last `max_tokens` tokens and restore a leading BOS the tokenizer adds."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if _adds_bos(tokenizer):
        # The BOS counts towards max_tokens and stays in front of the kept tail.
        tail = ids[len(ids) - (max_tokens - 1) :] if max_tokens > 1 else []
        return [tokenizer.bos_token_id] + tail
    ids = ids[-max_tokens:]
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ConfigError(
                f"pair {index} has an empty prompt and the tokenizer has no BOS or EOS token to start from; "
                "give the pair a non-empty prompt"
            )
        ids = [start]
    return ids


def _encode_response(tokenizer: Any, text: str, max_tokens: int) -> tuple[list[int], int]:
    """Encode a response, keep its first `max_tokens` tokens; return them and the characters they cover."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = encoded["input_ids"]
        if len(ids) <= max_tokens:
            return ids, len(text)
        return ids[:max_tokens], encoded["offset_mapping"][max_tokens - 1][1]

    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) <= max_tokens:
        return ids, len(text)
    # NOTE: slow tokenizers give no offsets, so the character count of a cut
    # response is the length of its decoded text.
    head = ids[:max_tokens]
    return head, len(tokenizer.decode(head))


def _encode_pairs(
    tokenizer: Any, pairs: list[tuple[str, str]], max_prompt_tokens: int, max_response_tokens: int
) -> list[_EncodedPair]:
    """Encode held-out pairs. A response that fits in `max_response_tokens` ends with the tokenizer's EOS.

    The EOS follows the training encoding (`kdsl.samplers.PairEncoder`), which
    scores it as a label, so the held-out CE here equals the trainer's
    `heldout_ce` on the same pairs. NOTE: prompts still differ from training
    under `data.chat_template` and with tokenizers that add a BOS (kept here).
    The EOS covers no characters.
    """
    eos = tokenizer.eos_token_id
    encoded = []
    for index, (prompt, response) in enumerate(pairs):
        prompt_ids = _encode_prompt(tokenizer, prompt, max_prompt_tokens, index)
        response_ids, chars = _encode_response(tokenizer, response, max_response_tokens)
        if not response_ids:
            raise ConfigError(
                f"pair {index} has an empty response; held-out metrics score response tokens only, "
                "so remove the pair or give it a response"
            )
        if eos is not None and len(response_ids) < max_response_tokens:
            response_ids = response_ids + [eos]
        encoded.append(_EncodedPair(prompt_ids, response_ids, chars))
    return encoded


# --- Models ----------------------------------------------------------------------------


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _head_rows(model: torch.nn.Module) -> int:
    """Return the number of rows of the model's output head (its logits' last dimension)."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def _vocab_size(tokenizer: Any, *models: torch.nn.Module | None) -> int:
    """Return the number of output rows every metric scores: the tokenizer's vocabulary.

    Output heads padded past the tokenizer are cut to it; a head smaller than the
    tokenizer cannot score all its ids and is rejected.
    """
    size = len(tokenizer)
    for model in models:
        if model is None:
            continue
        rows = _head_rows(model)
        if rows < size:
            name = type(model).__name__
            raise ConfigError(
                f"{name} has {rows} output rows but the tokenizer has {size} tokens; "
                "evaluate with the tokenizer the model was trained with"
            )
    return size


def _check_context(model: torch.nn.Module, length: int, fix: str) -> None:
    """Reject sequences longer than the model's position table, which would fail inside its forward."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ConfigError(
            f"{type(model).__name__} takes at most {limit} positions but a sequence needs {length}; {fix}"
        )


@contextlib.contextmanager
def _eval_mode(*models: torch.nn.Module | None) -> Iterator[None]:
    """Put models in eval mode without gradients and restore their training flags afterwards."""
    present = [m for m in models if m is not None]
    flags = [m.training for m in present]
    for model in present:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for model, flag in zip(present, flags):
            model.train(flag)


def _batches(items: Sequence[Any], batch_size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(items), batch_size):
        yield start, items[start : start + batch_size]


# --- Teacher-forced scoring ------------------------------------------------------------


def _right_padded(
    sequences: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Build a right-padded batch of prompt + response.

    Right padding keeps every real token at its own position, so no position
    ids are needed and causal attention never attends to the padding.
    Returns input_ids (B, L), attention_mask (B, L), the index of the logit
    that scores each response token (B, R) and the response mask (B, R).
    """
    lengths = [len(p) + len(r) for p, r in sequences]
    width = max(lengths)
    response_width = max(len(r) for _, r in sequences)

    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    score_index = torch.zeros((len(sequences), response_width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), response_width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        ids = prompt + response
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        # The logit at position p scores token p + 1: response token r is
        # scored by position len(prompt) - 1 + r.
        score_index[row, : len(response)] = torch.arange(len(response)) + len(prompt) - 1
        response_mask[row, : len(response)] = True
    return input_ids.to(device), attention_mask.to(device), score_index.to(device), response_mask.to(device)


def _response_log_probs(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, score_index: Tensor, vocab: int
) -> Tensor:
    """Return float32 log-probabilities of the next token at each response step, (B, R, V)."""
    device = _device_of(model)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    index = score_index.to(device).unsqueeze(-1).expand(-1, -1, logits.shape[-1])  # (B, R, V_head)
    picked = torch.gather(logits, 1, index)[..., :vocab]  # (B, R, V)
    return torch.log_softmax(picked.float(), dim=-1)


@dataclass
class _Scores:
    """Per-sequence arrays over response steps."""

    student_nll: list[np.ndarray] = field(default_factory=list)
    teacher_nll: list[np.ndarray] = field(default_factory=list)
    step_loss: list[np.ndarray] = field(default_factory=list)


def _score(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    sequences: Sequence[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    vocab: int,
    batch_size: int,
    loss: str = "kl",
) -> _Scores:
    """Score response tokens teacher-forced: NLL under each model and the per-step loss."""
    loss_fn = _per_step_loss(loss)
    scores = _Scores()
    device = _device_of(student)
    longest = max(len(p) + len(r) for p, r in sequences)
    for model in (student, teacher):
        if model is not None:
            _check_context(model, longest, "lower data.max_prompt_tokens or the response length")
    for _, batch in _batches(sequences, batch_size):
        input_ids, attention_mask, score_index, mask = _right_padded(batch, pad_id, device)
        targets = input_ids.gather(1, (score_index + 1).clamp(max=input_ids.shape[1] - 1))  # (B, R)

        student_logp = _response_log_probs(student, input_ids, attention_mask, score_index, vocab)
        student_nll = -student_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, R)
        if teacher is not None:
            teacher_logp = _response_log_probs(teacher, input_ids, attention_mask, score_index, vocab).to(device)
            teacher_nll = -teacher_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            # Divergences are non-negative; clamping removes float32 rounding below zero.
            step = loss_fn(teacher_logp, student_logp).clamp_min(0.0)  # (B, R)

        for row in range(len(batch)):
            valid = mask[row]
            scores.student_nll.append(student_nll[row][valid].double().cpu().numpy())
            if teacher is not None:
                scores.teacher_nll.append(teacher_nll[row][valid].double().cpu().numpy())
                scores.step_loss.append(step[row][valid].double().cpu().numpy())
    return scores


# --- Bootstrap -------------------------------------------------------------------------


def _bootstrap_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """Return how often each of n items is drawn in each resample, (resamples, n)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples)


def _percentile_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the 2.5 and 97.5 percentiles over axis 0.

    The lower bound rounds down and the upper bound rounds up to an actual
    resample value, so infinite resamples never interpolate into NaN.
    """
    tail = (1.0 - CI_LEVEL) / 2.0
    low = np.quantile(values, tail, axis=0, method="lower")
    high = np.quantile(values, 1.0 - tail, axis=0, method="higher")
    return low, high


def _ratio_with_ci(
    numerators: np.ndarray, denominators: np.ndarray, bootstrap: int, seed: int
) -> tuple[float, tuple[float, float]]:
    """Return Σ numerators / Σ denominators and its bootstrap band over items."""
    point = float(numerators.sum() / denominators.sum())
    if bootstrap == 0:
        return point, (math.nan, math.nan)
    counts = _bootstrap_counts(len(numerators), bootstrap, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        resampled = (counts @ numerators) / (counts @ denominators)
    low, high = _percentile_band(resampled)
    return point, (float(low), float(high))


# --- Held-out metrics ------------------------------------------------------------------


@dataclass
class HeldoutMetrics:
    """Teacher-forced metrics on the dataset responses; prompt tokens never count."""

    ce: float  # student cross-entropy, nats per response token
    bpc: float  # student response NLL in bits per response character
    kl: float | None  # KL(teacher ‖ student), nats per response token; None without a teacher
    teacher_ce: float | None  # teacher cross-entropy, nats per response token
    num_pairs: int
    num_tokens: int
    num_chars: int
    ce_ci: tuple[float, float] = (math.nan, math.nan)
    bpc_ci: tuple[float, float] = (math.nan, math.nan)
    kl_ci: tuple[float, float] = (math.nan, math.nan)
    # Per pair: the student's response NLL in nats, and the response tokens it covers.
    pair_nll: np.ndarray | None = field(default=None, repr=False, compare=False)
    pair_tokens: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def perplexity(self) -> float:
        return math.exp(self.ce)

    def summary(self) -> dict[str, Any]:
        """Return the metrics as a JSON-ready dictionary, without the per-pair arrays."""
        return {key: value for key, value in asdict(self).items() if key not in ("pair_nll", "pair_tokens")}


@dataclass
class PairedDifference:
    """CE of model A minus CE of model B on the same held-out pairs, nats per token, with a paired bootstrap band."""

    difference: float
    ci: tuple[float, float]
    num_pairs: int
    wins: int  # pairs on which A's CE per token is lower than B's


def paired_ce_difference(a: HeldoutMetrics, b: HeldoutMetrics, *, bootstrap: int = 1000,
                         seed: int = 1234) -> PairedDifference:
    """Compare two students scored on the same pairs with the same tokenizer.

    Each bootstrap resample draws pairs once and scores both models on that
    draw, so the band reflects the difference between the models rather
    than the spread of the pairs, which both share.
    """
    _check_non_negative_int("bootstrap", bootstrap)
    for name, metrics in (("a", a), ("b", b)):
        if metrics.pair_nll is None or metrics.pair_tokens is None:
            raise ConfigError(f"metrics {name} have no per-pair scores; compute them with kdsl.evaluate.heldout_metrics")
    if len(a.pair_tokens) != len(b.pair_tokens) or not np.array_equal(a.pair_tokens, b.pair_tokens):
        raise ConfigError("the two metrics were not computed on the same pairs with one tokenizer (their response token "
                          "counts differ); score both models with the same pairs, tokenizer and limits")
    tokens = a.pair_tokens
    difference = float((a.pair_nll.sum() - b.pair_nll.sum()) / tokens.sum())
    per_token = np.divide(a.pair_nll - b.pair_nll, tokens, out=np.zeros_like(tokens), where=tokens > 0)
    wins = int((per_token < 0).sum())
    if bootstrap == 0:
        return PairedDifference(difference, (math.nan, math.nan), len(tokens), wins)
    counts = _bootstrap_counts(len(tokens), bootstrap, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        resampled = (counts @ (a.pair_nll - b.pair_nll)) / (counts @ tokens)
    low, high = _percentile_band(resampled)
    return PairedDifference(difference, (float(low), float(high)), len(tokens), wins)


def heldout_metrics(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    tokenizer: Any,
    pairs: Any,
    *,
    batch_size: int = 8,
    max_prompt_tokens: int = 64,
    max_response_tokens: int = 64,
    bootstrap: int = 0,
    seed: int = 1234,
) -> HeldoutMetrics:
    """Compute held-out CE, bits per character and KL(teacher ‖ student) on dataset responses.

    Each prompt is cut to its last `max_prompt_tokens` tokens and each response
    to its first `max_response_tokens`; only response tokens are scored. A
    response that fits is followed by the EOS, which is scored as in training.
    Bits per character divide the total response NLL in bits (EOS included)
    by the characters the response tokens cover. With `teacher=None` only CE
    and BPC are computed. Both models must use `tokenizer`; a head padded past
    it is cut.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("max_prompt_tokens", max_prompt_tokens)
    _check_positive_int("max_response_tokens", max_response_tokens)
    _check_non_negative_int("bootstrap", bootstrap)
    pairs = load_pairs(pairs)
    encoded = _encode_pairs(tokenizer, pairs, max_prompt_tokens, max_response_tokens)
    vocab = _vocab_size(tokenizer, student, teacher)
    pad_id, _ = _token_ids(tokenizer)

    with _eval_mode(student, teacher):
        scores = _score(
            student, teacher, [(e.prompt_ids, e.response_ids) for e in encoded],
            pad_id=pad_id, vocab=vocab, batch_size=batch_size,
        )

    tokens = np.array([len(e.response_ids) for e in encoded], dtype=np.float64)
    chars = np.array([e.response_chars for e in encoded], dtype=np.float64)
    student_nll = np.array([s.sum() for s in scores.student_nll])
    if chars.sum() == 0:
        raise ConfigError("the responses cover no characters, so bits per character are undefined")
    ce, ce_ci = _ratio_with_ci(student_nll, tokens, bootstrap, seed)
    bpc, bpc_ci = _ratio_with_ci(student_nll / math.log(2), chars, bootstrap, seed)

    kl = teacher_ce = None
    kl_ci = (math.nan, math.nan)
    if teacher is not None:
        kl, kl_ci = _ratio_with_ci(np.array([s.sum() for s in scores.step_loss]), tokens, bootstrap, seed)
        teacher_ce = float(sum(s.sum() for s in scores.teacher_nll) / tokens.sum())

    return HeldoutMetrics(
        ce=ce, bpc=bpc, kl=kl, teacher_ce=teacher_ce,
        num_pairs=len(encoded), num_tokens=int(tokens.sum()), num_chars=int(chars.sum()),
        ce_ci=ce_ci, bpc_ci=bpc_ci, kl_ci=kl_ci, pair_nll=student_nll, pair_tokens=tokens,
    )


# --- Generation ------------------------------------------------------------------------


def _quiet_absl() -> None:
    """Raise absl's log threshold to warnings, so rouge-score's info messages stay off the terminal."""
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    if absl_logging.get_verbosity() > absl_logging.WARNING:
        absl_logging.set_verbosity(absl_logging.WARNING)
    # Before absl's flags are parsed, its messages go through the standard "absl" logger. The verbosity above
    # does not reach that logger, so under a root logger at INFO they would still print.
    absl_logger = logging.getLogger("absl")
    if absl_logger.getEffectiveLevel() < logging.WARNING:
        absl_logger.setLevel(logging.WARNING)


@contextlib.contextmanager
def _plain_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Hide the model's own generation defaults (penalties, top-k) while kdsl generates.

    `generate` fills every option the passed config leaves unset from
    `model.generation_config`, so a checkpoint's repetition penalty would
    otherwise change what is measured.
    """
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for sampling and restore the caller's RNG state afterwards."""
    devices = []
    if device.type == "cuda":
        devices.append(device.index if device.index is not None else torch.cuda.current_device())
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _left_padded(prompts: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-pad prompts so every continuation starts in the same column.

    `generate` derives position ids from the attention mask for models whose
    `forward` takes `position_ids`, so a padded prompt keeps positions 0, 1, ...
    """
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _cut_at_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """Keep tokens up to and including the first EOS; what follows is padding."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def generate_continuations(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    *,
    max_new_tokens: int,
    greedy: bool,
    temperature: float = 1.0,
    seed: int = 1234,
    batch_size: int = 8,
) -> list[list[int]]:
    """Generate a continuation of each tokenized prompt with KV-cached `generate`.

    Sampling (`greedy=False`) draws from softmax(logits / temperature) over the
    whole vocabulary (no top-k or top-p), with torch's RNG seeded by `seed` and
    restored afterwards. Each continuation ends after its first EOS (kept) or
    after `max_new_tokens` tokens. Ids past the tokenizer's vocabulary (rows of
    a padded head) are never generated.
    """
    from transformers import GenerationConfig

    _check_positive_int("max_new_tokens", max_new_tokens)
    _check_positive_int("batch_size", batch_size)
    temperature = _check_temperature(temperature)
    vocab = _vocab_size(tokenizer, model)
    head_rows = _head_rows(model)
    pad_id, eos_id = _token_ids(tokenizer)
    options: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id)
    if greedy:
        options.update(do_sample=False)
    else:
        options.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    if head_rows > vocab:
        options["suppress_tokens"] = list(range(vocab, head_rows))
    config = GenerationConfig(**options)
    longest = max(len(p) for p in prompt_ids) + max_new_tokens
    _check_context(model, longest, "lower data.max_prompt_tokens or the number of new tokens")

    device = _device_of(model)
    continuations = []
    with _eval_mode(model), _plain_generation_config(model), _seeded(seed, device), quiet_padding_warning():
        for _, batch in _batches(list(prompt_ids), batch_size):
            input_ids, attention_mask = _left_padded(batch, pad_id, device)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            for row in output[:, input_ids.shape[1] :].tolist():
                continuations.append(_cut_at_eos(row, eos_id))
    return continuations


# --- ROUGE-L ---------------------------------------------------------------------------


@dataclass
class RougeResult:
    """ROUGE-L F1 of generated continuations against reference responses."""

    f1: float  # mean over pairs
    scores: list[float]
    generations: list[str]
    references: list[str]
    f1_ci: tuple[float, float] = (math.nan, math.nan)


def rouge_l(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Any,
    *,
    max_new_tokens: int = 48,
    greedy: bool = True,
    max_prompt_tokens: int = 64,
    batch_size: int = 8,
    temperature: float = 1.0,
    seed: int = 1234,
    bootstrap: int = 0,
    use_stemmer: bool = False,
) -> RougeResult:
    """Compute the mean ROUGE-L F1 (rouge-score package) of continuations against the full reference responses.

    Continuations are greedy by default; `greedy=False` samples them at
    `temperature` with `seed`. Generated text is decoded without special tokens
    and stripped of surrounding whitespace.
    """
    from rouge_score import rouge_scorer

    _check_positive_int("max_prompt_tokens", max_prompt_tokens)
    _check_non_negative_int("bootstrap", bootstrap)
    pairs = load_pairs(pairs)
    prompts = [_encode_prompt(tokenizer, prompt, max_prompt_tokens, i) for i, (prompt, _) in enumerate(pairs)]
    continuations = generate_continuations(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, greedy=greedy,
        temperature=temperature, seed=seed, batch_size=batch_size,
    )

    generations = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in continuations]
    references = [response for _, response in pairs]
    _quiet_absl()  # rouge-score logs "Using default tokenizer." at info level on every scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    scores = [scorer.score(ref, gen)["rougeL"].fmeasure for ref, gen in zip(references, generations)]

    values = np.array(scores, dtype=np.float64)
    f1, f1_ci = _ratio_with_ci(values, np.ones_like(values), bootstrap, seed)
    return RougeResult(f1=f1, scores=scores, generations=generations, references=references, f1_ci=f1_ci)


# --- Exposure bias ---------------------------------------------------------------------


@dataclass
class ExposureBiasResult:
    """Per-l table of the exposure-bias metrics, each with a 95% bootstrap band.

    Lists are indexed by l - 1. Each `*_ci` is a (low, high) pair of lists, NaN
    when `bootstrap` is 0. `alive_*[l-1]` is the share of continuations still
    running at step l (no EOS before it). `notes[l-1]` explains a value that
    comes from a zero denominator.
    """

    l: list[int]
    eps_t: list[float]
    eps_le: list[float]
    loss_le: list[float]
    acc_err: list[float]
    ex_acc_err: list[float]
    eps_t_ci: tuple[list[float], list[float]]
    eps_le_ci: tuple[list[float], list[float]]
    loss_le_ci: tuple[list[float], list[float]]
    acc_err_ci: tuple[list[float], list[float]]
    ex_acc_err_ci: tuple[list[float], list[float]]
    alive_oracle: list[float]
    alive_student: list[float]
    notes: list[str]
    num_prompts: int
    loss: str = "kl"
    temperature: float = 1.0
    seed: int = 1234
    bootstrap: int = 0

    COLUMNS: ClassVar[tuple[str, ...]] = ("eps_t", "eps_le", "loss_le", "acc_err", "ex_acc_err")

    def rows(self) -> list[dict[str, Any]]:
        """Return one dict per l with every value and band (for CSV)."""
        rows = []
        for i, length in enumerate(self.l):
            row: dict[str, Any] = {"l": length}
            for name in self.COLUMNS:
                low, high = getattr(self, f"{name}_ci")
                row[name] = getattr(self, name)[i]
                row[f"{name}_low"] = low[i]
                row[f"{name}_high"] = high[i]
            row["alive_oracle"] = self.alive_oracle[i]
            row["alive_student"] = self.alive_student[i]
            row["note"] = self.notes[i]
            rows.append(row)
        return rows


def _accumulation_ratio(eps_sum: np.ndarray, loss_sum: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Return L_{≤l} / Σ_{t≤l} ε_t, with 1 where both are zero and +inf where only ε is zero."""
    zero = ZERO_LOSS_PER_STEP * lengths
    eps_zero = eps_sum <= zero
    loss_zero = loss_sum <= zero
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(eps_zero, np.where(loss_zero, 1.0, math.inf), loss_sum / np.where(eps_zero, 1.0, eps_sum))
    return ratio


def _exposure_statistics(oracle_mean: np.ndarray, student_mean: np.ndarray) -> dict[str, np.ndarray]:
    """Compute every column from mean per-step losses over prompts, (..., max_l) in and out."""
    lengths = np.arange(1, oracle_mean.shape[-1] + 1, dtype=np.float64)
    eps_sum = np.cumsum(oracle_mean, axis=-1)
    loss_le = np.cumsum(student_mean, axis=-1)
    ratio = _accumulation_ratio(eps_sum, loss_le, lengths)
    return {
        "eps_t": oracle_mean,
        "eps_le": eps_sum / lengths,
        "loss_le": loss_le,
        "acc_err": lengths * ratio,
        "ex_acc_err": (ratio - 1.0) * 100.0,
    }


def _zero_notes(oracle_mean: np.ndarray, student_mean: np.ndarray) -> list[str]:
    lengths = np.arange(1, oracle_mean.shape[-1] + 1, dtype=np.float64)
    eps_zero = np.cumsum(oracle_mean) <= ZERO_LOSS_PER_STEP * lengths
    loss_zero = np.cumsum(student_mean) <= ZERO_LOSS_PER_STEP * lengths
    notes = []
    for e, s in zip(eps_zero, loss_zero):
        if e and s:
            notes.append("student matches teacher at every measured step: AccErr = l, ExAccErr = 0")
        elif e:
            notes.append("zero error on oracle prefixes but not on the student's own: AccErr and ExAccErr are +inf")
        else:
            notes.append("")
    return notes


def exposure_bias_from_losses(
    oracle_losses: np.ndarray,
    student_losses: np.ndarray,
    *,
    bootstrap: int = 0,
    seed: int = 1234,
    oracle_lengths: Sequence[int] | None = None,
    student_lengths: Sequence[int] | None = None,
    loss: str = "kl",
    temperature: float = 1.0,
) -> ExposureBiasResult:
    """Build the exposure-bias table from per-prompt, per-step losses.

    `oracle_losses[i, t-1]` is ℓ at step t on prompt i's oracle (teacher)
    continuation and `student_losses[i, t-1]` the same on the student's own
    continuation, both (N, max_l) with 0 after a continuation ends. Row i of
    both arrays belongs to prompt i, so a bootstrap resample keeps the pairs.
    Lengths (default: max_l for every prompt) give the `alive_*` columns.
    """
    oracle_losses = np.asarray(oracle_losses, dtype=np.float64)
    student_losses = np.asarray(student_losses, dtype=np.float64)
    if oracle_losses.ndim != 2 or oracle_losses.shape != student_losses.shape or oracle_losses.size == 0:
        raise ConfigError(
            f"oracle and student losses must both have shape (prompts, max_l) with at least one entry, "
            f"got {oracle_losses.shape} and {student_losses.shape}"
        )
    if not (np.all(np.isfinite(oracle_losses)) and np.all(np.isfinite(student_losses))):
        raise ConfigError("per-step losses contain inf or NaN; a student gives zero probability to a teacher token")
    _check_non_negative_int("bootstrap", bootstrap)
    n, max_l = oracle_losses.shape

    point = _exposure_statistics(oracle_losses.mean(axis=0), student_losses.mean(axis=0))
    bands: dict[str, tuple[list[float], list[float]]] = {}
    if bootstrap > 0:
        counts = _bootstrap_counts(n, bootstrap, seed)  # (B, N)
        resampled = _exposure_statistics(counts @ oracle_losses / n, counts @ student_losses / n)  # (B, max_l)
        for name, values in resampled.items():
            low, high = _percentile_band(values)
            bands[name] = (low.tolist(), high.tolist())
    else:
        for name in ExposureBiasResult.COLUMNS:
            bands[name] = ([math.nan] * max_l, [math.nan] * max_l)

    steps = np.arange(1, max_l + 1)
    oracle_lengths = np.full(n, max_l) if oracle_lengths is None else np.asarray(oracle_lengths)
    student_lengths = np.full(n, max_l) if student_lengths is None else np.asarray(student_lengths)
    return ExposureBiasResult(
        l=steps.tolist(),
        **{name: point[name].tolist() for name in ExposureBiasResult.COLUMNS},
        **{f"{name}_ci": bands[name] for name in ExposureBiasResult.COLUMNS},
        alive_oracle=[float(np.mean(oracle_lengths >= t)) for t in steps],
        alive_student=[float(np.mean(student_lengths >= t)) for t in steps],
        notes=_zero_notes(oracle_losses.mean(axis=0), student_losses.mean(axis=0)),
        num_prompts=n, loss=loss, temperature=temperature, seed=seed, bootstrap=bootstrap,
    )


def _losses_on_continuations(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompts: Sequence[list[int]],
    continuations: Sequence[list[int]],
    *,
    max_l: int,
    pad_id: int,
    vocab: int,
    batch_size: int,
    loss: str,
) -> np.ndarray:
    """Return ℓ per prompt and step on the given continuations, (N, max_l), 0 after a continuation ends."""
    losses = np.zeros((len(prompts), max_l), dtype=np.float64)
    scored_rows = [i for i, c in enumerate(continuations) if c]
    sequences = [(list(prompts[i]), list(continuations[i])) for i in scored_rows]
    if sequences:
        scores = _score(student, teacher, sequences, pad_id=pad_id, vocab=vocab, batch_size=batch_size, loss=loss)
        for row, step in zip(scored_rows, scores.step_loss):
            losses[row, : len(step)] = step[:max_l]
    return losses


def exposure_bias(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer: Any,
    prompts: Any,
    *,
    max_l: int = 32,
    seed: int = 1234,
    bootstrap: int = 1000,
    temperature: float = 1.0,
    loss: str = "kl",
    max_prompt_tokens: int = 64,
    batch_size: int = 8,
) -> ExposureBiasResult:
    """Measure error accumulation of `student` with `teacher` as the oracle (Arora et al., ACL 2022).

    The teacher samples one oracle continuation per prompt (seed `seed`) and the
    student samples its own (seed `seed + 1`, an independent draw), each of at
    most `max_l` tokens at `temperature` over the full vocabulary. Both models
    then score both continuations teacher-forced, and ℓ (`loss`, one of
    PER_STEP_LOSSES, computed at temperature 1) gives ε_t on the oracle
    continuations and L_{≤l} on the student's. See the module docstring for the
    formulas. `prompts` is a list of strings or of prompt/response pairs.
    """
    _check_positive_int("max_l", max_l)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("max_prompt_tokens", max_prompt_tokens)
    _check_non_negative_int("seed", seed)
    _per_step_loss(loss)
    if teacher is None:
        raise ConfigError("exposure_bias needs a teacher: it is the oracle that samples the reference prefixes")
    texts = _load_prompts(prompts)
    prompt_ids = [_encode_prompt(tokenizer, text, max_prompt_tokens, i) for i, text in enumerate(texts)]
    vocab = _vocab_size(tokenizer, student, teacher)
    pad_id, _ = _token_ids(tokenizer)
    generate = dict(max_new_tokens=max_l, greedy=False, temperature=temperature, batch_size=batch_size)

    oracle = generate_continuations(teacher, tokenizer, prompt_ids, seed=seed, **generate)
    own = generate_continuations(student, tokenizer, prompt_ids, seed=seed + 1, **generate)
    score = dict(max_l=max_l, pad_id=pad_id, vocab=vocab, batch_size=batch_size, loss=loss)
    with _eval_mode(student, teacher):
        oracle_losses = _losses_on_continuations(student, teacher, prompt_ids, oracle, **score)
        student_losses = _losses_on_continuations(student, teacher, prompt_ids, own, **score)

    return exposure_bias_from_losses(
        oracle_losses, student_losses, bootstrap=bootstrap, seed=seed,
        oracle_lengths=[len(c) for c in oracle], student_lengths=[len(c) for c in own],
        loss=loss, temperature=temperature,
    )


# --- Checkpoints -----------------------------------------------------------------------


@dataclass
class CheckpointEvaluation:
    """Every metric computed for one student checkpoint; a metric not requested is None."""

    label: str
    heldout: HeldoutMetrics | None = None
    rouge: RougeResult | None = None
    exposure: ExposureBiasResult | None = None


def _requested_metrics(metrics: Iterable[str] | None) -> set[str]:
    if metrics is None:
        return set(EVAL_METRICS)
    chosen = set()
    for name in metrics:
        if name not in EVAL_METRICS:
            close = difflib.get_close_matches(name, EVAL_METRICS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known metrics: {', '.join(EVAL_METRICS)}"
            raise ConfigError(f"unknown evaluation metric {name!r}{hint}")
        chosen.add(name)
    return chosen


def _load_checkpoint(path: str, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint directory {path!r} not found; pass a folder with config.json and the weights")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"checkpoint directory {path!r} has no config.json; pass a folder written by save_pretrained")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device)


def _unique_labels(checkpoints: Sequence[Any]) -> list[str]:
    labels: list[str] = []
    for index, item in enumerate(checkpoints):
        base = os.path.basename(os.path.normpath(item)) if isinstance(item, str) else f"model{index}"
        label, suffix = base, 2
        while label in labels:
            label, suffix = f"{base}-{suffix}", suffix + 1
        labels.append(label)
    return labels


def evaluate_checkpoints(
    spec_settings: Mapping[str, Any],
    checkpoints: Sequence[str | torch.nn.Module] | Mapping[str, str | torch.nn.Module],
    out_dir: str | None,
    *,
    teacher: torch.nn.Module,
    tokenizer: Any,
    pairs: Any,
    metrics: Iterable[str] | None = None,
    batch_size: int | None = None,
) -> dict[str, CheckpointEvaluation]:
    """Evaluate student checkpoints against `teacher` and write the report to `out_dir`.

    `checkpoints` lists checkpoint folders (loaded with `from_pretrained`, local
    files only) or models already in memory, or maps labels to either. Labels
    default to folder names. Settings come from `spec_settings` over the
    registry defaults: `eval.max_pairs` (the first pairs are used),
    `eval.max_new_tokens`, `eval.max_l`, `eval.bootstrap`, `eval.seed`,
    `data.max_prompt_tokens`, `data.max_response_tokens` and
    `train.batch_size`. `metrics` picks from EVAL_METRICS (default: all).
    With `out_dir` None nothing is written.
    """
    settings = {**default_settings(), **dict(spec_settings)}
    chosen = _requested_metrics(metrics)
    batch_size = batch_size or settings["train.batch_size"]
    pairs = load_pairs(pairs)[: settings["eval.max_pairs"]]
    if isinstance(checkpoints, Mapping):
        labels, items = list(checkpoints.keys()), list(checkpoints.values())
    else:
        items = list(checkpoints)
        labels = _unique_labels(items)
    if not items:
        raise ConfigError("no checkpoints to evaluate; pass at least one checkpoint folder or model")

    seed = settings["eval.seed"]
    bootstrap = settings["eval.bootstrap"]
    results: dict[str, CheckpointEvaluation] = {}
    for label, item in zip(labels, items):
        student = _load_checkpoint(item, _device_of(teacher)) if isinstance(item, str) else item
        logger.info("evaluating %s on %d pairs", label, len(pairs))
        result = CheckpointEvaluation(label=label)
        if chosen & _HELDOUT_METRICS:
            # Without `kl` the teacher stays out, so a student with another vocabulary still gets CE.
            result.heldout = heldout_metrics(
                student, teacher if "kl" in chosen else None, tokenizer, pairs, batch_size=batch_size,
                max_prompt_tokens=settings["data.max_prompt_tokens"],
                max_response_tokens=settings["data.max_response_tokens"],
                bootstrap=bootstrap, seed=seed,
            )
        if "rouge_l" in chosen:
            result.rouge = rouge_l(
                student, tokenizer, pairs, max_new_tokens=settings["eval.max_new_tokens"],
                max_prompt_tokens=settings["data.max_prompt_tokens"], batch_size=batch_size,
                seed=seed, bootstrap=bootstrap,
            )
        if "exposure_bias" in chosen:
            result.exposure = exposure_bias(
                student, teacher, tokenizer, pairs, max_l=settings["eval.max_l"], seed=seed,
                bootstrap=bootstrap, max_prompt_tokens=settings["data.max_prompt_tokens"], batch_size=batch_size,
            )
        results[label] = result

    if out_dir is not None:
        write_report(results, out_dir)
        curves = {label: r.exposure for label, r in results.items() if r.exposure is not None}
        if curves:
            plot_exposure_bias(curves, os.path.join(out_dir, "exposure_bias.png"))
    return results


# --- Reports ---------------------------------------------------------------------------


def _atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        # mkstemp creates the file as 0600; give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _finite_or_none(value: Any) -> Any:
    """Replace inf and NaN (which JSON cannot hold) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _as_results(results: Any) -> dict[str, CheckpointEvaluation]:
    if isinstance(results, CheckpointEvaluation):
        return {results.label: results}
    if isinstance(results, Mapping) and all(isinstance(r, CheckpointEvaluation) for r in results.values()):
        return dict(results)
    raise ConfigError(
        f"expected a CheckpointEvaluation or a dict of them (as evaluate_checkpoints returns), got {type(results).__name__}"
    )


def _summary_row(result: CheckpointEvaluation) -> dict[str, Any]:
    row: dict[str, Any] = {"label": result.label}
    h = result.heldout
    for name in ("ce", "bpc", "kl"):
        value = getattr(h, name) if h is not None else None
        low, high = getattr(h, f"{name}_ci") if h is not None else (None, None)
        row.update({name: value, f"{name}_low": low, f"{name}_high": high})
    row["teacher_ce"] = h.teacher_ce if h is not None else None
    r = result.rouge
    row.update({
        "rouge_l": r.f1 if r else None,
        "rouge_l_low": r.f1_ci[0] if r else None,
        "rouge_l_high": r.f1_ci[1] if r else None,
    })
    e = result.exposure
    row.update({
        "max_l": e.l[-1] if e else None,
        "ex_acc_err": e.ex_acc_err[-1] if e else None,
        "ex_acc_err_low": e.ex_acc_err_ci[0][-1] if e else None,
        "ex_acc_err_high": e.ex_acc_err_ci[1][-1] if e else None,
    })
    return row


def _csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue().encode("utf-8")


def write_report(results: Any, out_dir: str) -> dict[str, str]:
    """Write `metrics.json`, `summary.csv` and `exposure_bias.csv` into `out_dir`, each atomically.

    `summary.csv` has one row per checkpoint: CE, BPC, KL, ROUGE-L and
    ExAccErr at the largest l, each with its band. `exposure_bias.csv` has one
    row per checkpoint and l. In JSON, inf and NaN become null. Returns the
    paths by name.
    """
    results = _as_results(results)
    summary = [_summary_row(r) for r in results.values()]
    curves = [
        {"label": label, **row}
        for label, r in results.items() if r.exposure is not None
        for row in r.exposure.rows()
    ]
    document = {
        "ci_level": CI_LEVEL,
        "checkpoints": {
            label: {
                "heldout": r.heldout.summary() if r.heldout else None,
                "rouge_l": asdict(r.rouge) if r.rouge else None,
                "exposure_bias": asdict(r.exposure) if r.exposure else None,
            }
            for label, r in results.items()
        },
    }
    paths = {
        "json": os.path.join(out_dir, "metrics.json"),
        "summary": os.path.join(out_dir, "summary.csv"),
        "exposure_bias": os.path.join(out_dir, "exposure_bias.csv"),
    }
    text = json.dumps(_finite_or_none(document), indent=2, ensure_ascii=False, allow_nan=False)
    _atomic_write(paths["json"], (text + "\n").encode("utf-8"))
    _atomic_write(paths["summary"], _csv_bytes(summary))
    if curves:
        _atomic_write(paths["exposure_bias"], _csv_bytes(curves))
    else:
        del paths["exposure_bias"]
    return paths


def plot_exposure_bias(curves: Mapping[str, ExposureBiasResult], path: str) -> str:
    """Plot ExAccErr(l) with its 95% band for several checkpoints in one PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if not curves:
        raise ConfigError("no exposure-bias results to plot; run exposure_bias on at least one student")
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for label, result in curves.items():
        values = np.array(result.ex_acc_err, dtype=np.float64)
        low, high = (np.array(band, dtype=np.float64) for band in result.ex_acc_err_ci)
        # Infinite values would stretch the axis; they are drawn as gaps.
        values, low, high = (np.where(np.isfinite(a), a, np.nan) for a in (values, low, high))
        (line,) = axes.plot(result.l, values, marker="o", markersize=3, label=label)
        axes.fill_between(result.l, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axes.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
    axes.set_xlabel("prefix length l (tokens)")
    axes.set_ylabel("ExAccErr(l) (%)")
    axes.set_title(f"Excess accumulated error, {int(CI_LEVEL * 100)}% bootstrap band")
    axes.legend()
    figure.tight_layout()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    _atomic_write(path, buffer.getvalue())
    return path


def _cell(value: Any, band: tuple[Any, Any] | None = None, digits: int = 4) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}g}"
    if band is not None and band[0] is not None and not (math.isnan(band[0]) and math.isnan(band[1])):
        text += f" [{band[0]:.{digits}g}, {band[1]:.{digits}g}]"
    return text


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _shown_lengths(result: ExposureBiasResult, max_rows: int) -> list[int]:
    """Return every l, or powers of two plus the largest l when there are more than `max_rows`."""
    if len(result.l) <= max_rows:
        return result.l
    lengths = [l for l in result.l if l & (l - 1) == 0]
    if result.l[-1] not in lengths:
        lengths.append(result.l[-1])
    return lengths


def _percent(value: float | None, band: tuple[float | None, float | None]) -> tuple[Any, tuple[Any, Any]]:
    """Scale a fraction and its band to percent, as the report of kdsl run prints ROUGE-L."""
    def scale(x):
        return None if x is None else 100.0 * x
    return scale(value), (scale(band[0]), scale(band[1]))


def format_table(results: Any, *, max_rows: int = 12) -> str:
    """Render a plain-text summary table and one exposure-bias table per checkpoint.

    Values show their 95% bootstrap band in brackets when one was computed.
    Exposure-bias tables with more than `max_rows` rows show l = 1, 2, 4, ...
    and the largest l.
    """
    results = _as_results(results)
    header = ["checkpoint", "CE (nats/tok)", "BPC", "KL(o‖q)/tok", "ROUGE-L F1 ×100", "ExAccErr(max l) %"]
    rows = []
    for r in results.values():
        row = _summary_row(r)
        rows.append([
            r.label,
            _cell(row["ce"], (row["ce_low"], row["ce_high"])),
            _cell(row["bpc"], (row["bpc_low"], row["bpc_high"])),
            _cell(row["kl"], (row["kl_low"], row["kl_high"])),
            _cell(*_percent(row["rouge_l"], (row["rouge_l_low"], row["rouge_l_high"]))),
            _cell(row["ex_acc_err"], (row["ex_acc_err_low"], row["ex_acc_err_high"])),
        ])
    blocks = [_render(header, rows)]

    for r in results.values():
        e = r.exposure
        if e is None:
            continue
        index = {l: i for i, l in enumerate(e.l)}
        header = ["l", "eps_t", "eps_<=l", "L_<=l", "AccErr", "ExAccErr %"]
        table = []
        for l in _shown_lengths(e, max_rows):
            i = index[l]
            table.append([str(l)] + [
                _cell(getattr(e, name)[i], (getattr(e, f"{name}_ci")[0][i], getattr(e, f"{name}_ci")[1][i]))
                for name in ExposureBiasResult.COLUMNS
            ])
        loss = PER_STEP_LOSSES[e.loss][1]
        title = f"{r.label}: exposure bias, per-step loss {loss}, {e.num_prompts} prompts"
        blocks.append(title + "\n" + _render(header, table))
    return "\n\n".join(blocks)
