"""Cross-vocabulary distillation primitives: Dual-Space KD projections, padded heads, re-tokenisation.

Dual-Space KD (Zhang et al., "Dual-Space Knowledge Distillation for Large
Language Models", EMNLP 2024) compares a teacher and a student that use
different tokenizers. It projects each model's last hidden states into the
other model's representation space and reads them out with the other
model's output head:

- `o→q`: teacher hidden states projected to the student's hidden size,
  aligned to the student's positions by cross-model attention, and turned
  into logits over the student vocabulary by the student's head;
- `q→o`: student hidden states projected to the teacher's hidden size,
  aligned to the teacher's positions by the transposed attention, and turned
  into logits over the teacher vocabulary by the teacher's head.

All tensors follow the kdsl contract: `hidden[b, p]`, `input_ids[b, p]` and
`labels[b, p]` are aligned, so `labels[b, p]` is the token that follows
`input_ids[b, p]`, and -100 marks prompt and padding positions.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from kdsl.errors import ConfigError

IGNORE_INDEX = -100
COMPAT_MODES = ("masked", "dskd")
ALIGNMENTS = ("learned", "text")
HEAD_POLICIES = ("truncate", "error")

# Projector layouts in the notation of DSKD's projector config: sizes joined by
# "-", where "s" is the student hidden size, "t" the teacher's, "2t" twice it,
# and "relu" inserts an activation. Each size pair becomes one nn.Linear.
DEFAULT_STRUCTURES = {"query": "2s-2t", "t2s": "t-s", "s2t": "s-t"}

# DSKD adds this constant to masked attention logits instead of -inf.
DSKD_MASK_OFFSET = -100000.0


# --- Projector construction -----------------------------------------------------------


def build_projector(structure: str, student_hidden_size: int, teacher_hidden_size: int) -> nn.Sequential:
    """Build one projector from a structure string such as "t-s" or "s-2t-relu-t"."""
    sizes = {"s": student_hidden_size, "t": teacher_hidden_size}
    layers: list[nn.Module] = []
    previous: int | None = None
    for part in structure.split("-"):
        if part == "relu":
            if previous is None:
                raise ConfigError(f"invalid projector structure {structure!r}: it must start with a size such as 's' or '2t'")
            layers.append(nn.ReLU())
            continue
        size = _parse_size(part, sizes, structure)
        if previous is not None:
            layers.append(nn.Linear(previous, size))
        previous = size
    if not any(isinstance(layer, nn.Linear) for layer in layers):
        raise ConfigError(f"invalid projector structure {structure!r}: it needs at least two sizes, e.g. 't-s'")
    return nn.Sequential(*layers)


def _parse_size(part: str, sizes: dict[str, int], structure: str) -> int:
    multiplier, unit = part[:-1], part[-1:]
    if unit not in sizes or (multiplier and not multiplier.isdigit()):
        raise ConfigError(
            f"invalid projector structure {structure!r}: unknown part {part!r}; "
            "use 's' or 't' with an optional integer multiplier (e.g. '2t'), or 'relu'"
        )
    return (int(multiplier) if multiplier else 1) * sizes[unit]


def _io_sizes(projector: nn.Sequential) -> tuple[int, int]:
    linears = [layer for layer in projector if isinstance(layer, nn.Linear)]
    return linears[0].in_features, linears[-1].out_features


# --- Results --------------------------------------------------------------------------


@dataclass
class Projection:
    """Projected logits of one batch and the masks of the positions that count.

    `o_to_q` is [B, S, Vs]: the teacher projected onto the student's positions
    and vocabulary. `q_to_o` is [B, T, Vt], or None when no teacher head was
    given. `kd_mask` marks the student positions where a KD term on `o_to_q`
    applies: `student_mask`, restricted by the accuracy gate when the
    projector has it on. `attention` is the [B, S, T] weight matrix of the
    teacher-to-student direction, or None for the same-length projection.
    """

    o_to_q: torch.Tensor
    q_to_o: torch.Tensor | None
    student_mask: torch.Tensor
    teacher_mask: torch.Tensor
    kd_mask: torch.Tensor
    attention: torch.Tensor | None = None


# --- The projector --------------------------------------------------------------------


class DualSpaceProjector(nn.Module):
    """The projector parameters of Dual-Space KD and the two projections built from them.

    Submodules `query` (2·d_s → 2·d_t), `t2s` (d_t → d_s) and `s2t` (d_s → d_t)
    are `nn.Sequential` stacks, so `state_dict()` keys (`query.0.weight`, ...)
    are those of the projector file DSKD saves. `compat="masked"` (kdsl's
    default) takes the scale statistics over valid teacher positions only.
    `compat="dskd"` takes them over the whole padded batch as DSKD does, so
    it reproduces DSKD's numbers. With `accuracy_gate=True` a KD term on `o→q` only
    counts where the projected teacher's argmax equals the gold token.

    `alignment="learned"` (DSKD) lets every position attend to every valid
    position of the other stream, so the attention has to learn which
    tokens correspond. `alignment="text"` (kdsl) uses where each token ends
    in the text (`student_ends`, `teacher_ends` of the forward call): a
    position attends only to the other stream's positions that have read
    the same text, or, where no token of the other stream ends there, to
    those that end latest before it. No position then reads text that lies
    ahead of it.
    """

    def __init__(
        self,
        student_hidden_size: int,
        teacher_hidden_size: int,
        *,
        cross_attention: bool = True,
        compat: str = "masked",
        accuracy_gate: bool = False,
        alignment: str = "learned",
        structures: dict[str, str] | None = None,
    ):
        super().__init__()
        if compat not in COMPAT_MODES:
            raise ConfigError(f"invalid projection compat mode {compat!r}; expected one of {', '.join(COMPAT_MODES)}")
        if alignment not in ALIGNMENTS:
            raise ConfigError(f"invalid projection alignment {alignment!r}; expected one of {', '.join(ALIGNMENTS)}")
        for name, size in (("student_hidden_size", student_hidden_size), ("teacher_hidden_size", teacher_hidden_size)):
            if not isinstance(size, int) or size < 1:
                raise ConfigError(f"{name} must be a positive integer, got {size!r}")
        self.student_hidden_size = student_hidden_size
        self.teacher_hidden_size = teacher_hidden_size
        self.cross_attention = cross_attention
        self.compat = compat
        self.accuracy_gate = accuracy_gate
        self.alignment = alignment

        layout = dict(DEFAULT_STRUCTURES)
        layout.update(structures or {})
        unknown = set(layout) - set(DEFAULT_STRUCTURES)
        if unknown:
            raise ConfigError(f"unknown projector name(s) {sorted(unknown)}; expected {sorted(DEFAULT_STRUCTURES)}")
        self.structures = layout
        if cross_attention:
            self.query = build_projector(layout["query"], student_hidden_size, teacher_hidden_size)
        self.t2s = build_projector(layout["t2s"], student_hidden_size, teacher_hidden_size)
        self.s2t = build_projector(layout["s2t"], student_hidden_size, teacher_hidden_size)
        self._check_layout()

    def _check_layout(self) -> None:
        d_s, d_t = self.student_hidden_size, self.teacher_hidden_size
        expected = {"t2s": (d_t, d_s), "s2t": (d_s, d_t)}
        if self.cross_attention:
            expected["query"] = (2 * d_s, 2 * d_t)
        for name, sizes in expected.items():
            found = _io_sizes(getattr(self, name))
            if found != sizes:
                raise ConfigError(
                    f"projector {name!r} with structure {self.structures[name]!r} maps {found[0]} → {found[1]} features, "
                    f"expected {sizes[0]} → {sizes[1]}; its first size must be the input and its last the output"
                )

    @classmethod
    def for_models(cls, student: nn.Module, teacher: nn.Module, **options) -> "DualSpaceProjector":
        """Build a projector sized for two Hugging Face causal language models."""
        return cls(model_hidden_size(student, "student"), model_hidden_size(teacher, "teacher"), **options)

    def extra_repr(self) -> str:
        return (
            f"student_hidden_size={self.student_hidden_size}, teacher_hidden_size={self.teacher_hidden_size}, "
            f"cross_attention={self.cross_attention}, compat={self.compat!r}, accuracy_gate={self.accuracy_gate}, "
            f"alignment={self.alignment!r}"
        )

    # --- Cross-model attention ---------------------------------------------------------

    def forward(
        self,
        student_hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        *,
        student_input_ids: torch.Tensor,
        student_labels: torch.Tensor,
        teacher_input_ids: torch.Tensor,
        teacher_labels: torch.Tensor,
        student_embedding: nn.Module | torch.Tensor,
        teacher_embedding: nn.Module | torch.Tensor,
        student_head: nn.Module | torch.Tensor,
        teacher_head: nn.Module | torch.Tensor | None = None,
        student_ends: torch.Tensor | None = None,
        teacher_ends: torch.Tensor | None = None,
    ) -> Projection:
        """Project both ways with cross-model attention (sequences of different tokenizers).

        Queries are the student's embeddings of the current and next token,
        [E_s(x); E_s(y)] through `query`. Keys are the teacher's, [E_t(x); E_t(y)]
        scaled to unit standard deviation. Values of `o→q` are
        `t2s(H_t/std + E_t(y)/std)`; values of `q→o` are `s2t(H_s)`. The
        attention logits QKᵀ/√(2·d_t) are shared: softmax over teacher
        positions gives `o→q`, softmax of the transpose over student
        positions gives `q→o`. Embeddings and heads are used without gradient;
        gradients reach the projectors and `student_hidden`. With
        `alignment="text"`, `student_ends` [B, S] and `teacher_ends` [B, T]
        (characters of the text read through each position, as
        `kdsl.teacher_tokens.teacher_batch` gives them) restrict the pairs.
        """
        if not self.cross_attention:
            raise ConfigError(
                "this projector was built with cross_attention=False and has no query projector; "
                "use project_aligned() for position-aligned sequences, or build it with cross_attention=True"
            )
        self._check_side("student", student_hidden, student_input_ids, student_labels, self.student_hidden_size)
        self._check_side("teacher", teacher_hidden, teacher_input_ids, teacher_labels, self.teacher_hidden_size)
        if student_hidden.shape[0] != teacher_hidden.shape[0]:
            raise ConfigError(
                f"student and teacher batches differ in size: {student_hidden.shape[0]} vs {teacher_hidden.shape[0]}; "
                "each row must hold the same sample in both tokenisations"
            )
        student_mask = student_labels.ne(IGNORE_INDEX)  # [B, S]
        teacher_mask = teacher_labels.ne(IGNORE_INDEX)  # [B, T]
        param_dtype = self.t2s[0].weight.dtype
        pairs = student_mask.unsqueeze(-1) & teacher_mask.unsqueeze(1)  # [B, S, T]
        pairs_t2s, pairs_s2t = pairs, pairs.transpose(-1, -2)
        if self.alignment == "text":
            pairs_t2s, pairs_s2t = self._text_pairs(pairs, student_ends, teacher_ends, student_labels, teacher_labels)

        # Index embeddings of (current, next) token; masked positions look up id 0.
        student_current = _lookup(student_embedding, student_input_ids, student_mask, self.student_hidden_size, "student")
        student_next = _lookup(student_embedding, student_labels, student_mask, self.student_hidden_size, "student")
        teacher_current = _lookup(teacher_embedding, teacher_input_ids, teacher_mask, self.teacher_hidden_size, "teacher")
        teacher_next = _lookup(teacher_embedding, teacher_labels, teacher_mask, self.teacher_hidden_size, "teacher")
        student_index = torch.cat([student_current, student_next], dim=-1).to(param_dtype)  # [B, S, 2·d_s]
        teacher_index = torch.cat([teacher_current, teacher_next], dim=-1).float()  # [B, T, 2·d_t]

        # Scale the teacher side to unit standard deviation.
        teacher_hidden = teacher_hidden.detach().float()
        keys = teacher_index / self._std(teacher_index, teacher_mask)
        teacher_values = teacher_hidden / self._std(teacher_hidden, teacher_mask)
        teacher_values = teacher_values + teacher_next.float() / self._std(teacher_next.float(), teacher_mask)

        queries = self.query(student_index).float()  # [B, S, 2·d_t]
        values_t2s = self.t2s(teacher_values.to(param_dtype)).float()  # [B, T, d_s]
        scores = queries @ keys.transpose(-1, -2) / math.sqrt(2 * self.teacher_hidden_size)  # [B, S, T]

        weights_t2s = self._attend(scores, pairs_t2s)  # [B, S, T]
        o_to_q = _read_out(weights_t2s @ values_t2s, student_head, self.student_hidden_size, "student")
        q_to_o = None
        if teacher_head is not None:
            values_s2t = self.s2t(student_hidden.to(param_dtype)).float()  # [B, S, d_t]
            weights_s2t = self._attend(scores.transpose(-1, -2), pairs_s2t)  # [B, T, S]
            q_to_o = _read_out(weights_s2t @ values_s2t, teacher_head, self.teacher_hidden_size, "teacher")

        kd_mask = self._kd_mask(o_to_q, student_labels, student_mask)
        return Projection(o_to_q, q_to_o, student_mask, teacher_mask, kd_mask, weights_t2s)

    def _std(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return the unbiased standard deviation used to scale a teacher-side tensor [B, T, D]."""
        if self.compat == "dskd":
            # DSKD's statistic: every entry of the padded batch, padding included.
            return values.std().clamp_min(torch.finfo(values.dtype).tiny)
        selected = values[mask]  # [N_valid, D]
        if selected.numel() < 2:
            return values.new_ones(())
        return selected.std().clamp_min(torch.finfo(values.dtype).tiny)

    def _text_pairs(self, pairs: torch.Tensor, student_ends: torch.Tensor | None, teacher_ends: torch.Tensor | None,
                    student_labels: torch.Tensor, teacher_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Restrict the valid pairs [B, S, T] to positions that have read the same text; return both directions."""
        for side, ends, labels in (("student", student_ends, student_labels), ("teacher", teacher_ends, teacher_labels)):
            if ends is None:
                raise ConfigError(
                    f'projection alignment "text" needs {side}_ends: the characters of the text each {side} position '
                    'has read (kdsl.teacher_tokens.teacher_batch returns them); pass them, or use alignment "learned"'
                )
            if tuple(ends.shape) != tuple(labels.shape):
                raise ConfigError(f"{side}_ends have shape {tuple(ends.shape)} but the {side} labels have "
                                  f"{tuple(labels.shape)}; shift them the same way as the labels")
        ends_s = student_ends.to(pairs.device).long().unsqueeze(-1)  # [B, S, 1]
        ends_t = teacher_ends.to(pairs.device).long().unsqueeze(1)  # [B, 1, T]
        return (_latest_not_after(pairs, ends_t, ends_s, dim=-1),
                _latest_not_after(pairs.transpose(-1, -2), ends_s.transpose(-1, -2), ends_t.transpose(-1, -2), dim=-1))

    def _attend(self, scores: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights over the last axis of `scores` [B, R, C], over the pairs `pair_mask` keeps."""
        if self.compat == "dskd":
            # DSKD adds a large negative constant, so a fully masked row becomes uniform.
            offset = (1.0 - pair_mask.to(scores.dtype)) * DSKD_MASK_OFFSET
            return torch.softmax(scores + offset, dim=-1)
        filled = scores.masked_fill(~pair_mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(filled, dim=-1)
        # A row with no valid pair (a masked position, or no valid column at all) gets zero weights.
        return weights * pair_mask.any(dim=-1, keepdim=True).to(weights.dtype)

    def _kd_mask(self, o_to_q: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.accuracy_gate:
            return mask
        return mask & projected_accuracy(o_to_q, labels)

    # --- Same-length projection --------------------------------------------------------

    def project_aligned(
        self,
        student_hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        *,
        student_labels: torch.Tensor,
        teacher_labels: torch.Tensor,
        student_head: nn.Module | torch.Tensor,
        teacher_head: nn.Module | torch.Tensor | None = None,
    ) -> Projection:
        """Project both ways position by position (Dual-Space KD without cross-model attention).

        Only valid when both models tokenise the text identically, so position
        p of the student and the teacher is the same token: `o→q` is
        `t2s(H_t)` read out by the student head, `q→o` is `s2t(H_s)` read out
        by the teacher head. No attention and no scaling take place.
        """
        if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
            raise ConfigError(
                f"project_aligned needs position-aligned sequences (one tokenizer), but the student hidden states "
                f"are {tuple(student_hidden.shape[:2])} and the teacher's {tuple(teacher_hidden.shape[:2])}; "
                "use the cross-attention projection (calling the projector) for different tokenizers"
            )
        self._check_side("student", student_hidden, None, student_labels, self.student_hidden_size)
        self._check_side("teacher", teacher_hidden, None, teacher_labels, self.teacher_hidden_size)
        student_mask = student_labels.ne(IGNORE_INDEX)
        teacher_mask = teacher_labels.ne(IGNORE_INDEX)
        param_dtype = self.t2s[0].weight.dtype

        projected_teacher = self.t2s(teacher_hidden.detach().to(param_dtype)).float()  # [B, S, d_s]
        o_to_q = _read_out(projected_teacher, student_head, self.student_hidden_size, "student")
        q_to_o = None
        if teacher_head is not None:
            projected_student = self.s2t(student_hidden.to(param_dtype)).float()  # [B, S, d_t]
            q_to_o = _read_out(projected_student, teacher_head, self.teacher_hidden_size, "teacher")

        kd_mask = self._kd_mask(o_to_q, student_labels, student_mask)
        return Projection(o_to_q, q_to_o, student_mask, teacher_mask, kd_mask)

    # --- Input checks ------------------------------------------------------------------

    @staticmethod
    def _check_side(
        side: str, hidden: torch.Tensor, input_ids: torch.Tensor | None, labels: torch.Tensor, hidden_size: int
    ) -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != hidden_size:
            raise ConfigError(
                f"{side} hidden states have shape {tuple(hidden.shape)}, expected [batch, length, {hidden_size}]; "
                f"pass the last hidden layer and build the projector with {side}_hidden_size={hidden.shape[-1]} "
                "if the model changed"
            )
        for name, tensor in (("labels", labels), ("input_ids", input_ids)):
            if tensor is not None and tuple(tensor.shape) != tuple(hidden.shape[:2]):
                raise ConfigError(
                    f"{side} {name} have shape {tuple(tensor.shape)} but the hidden states have {tuple(hidden.shape[:2])} "
                    "positions; labels, input ids and hidden states must be aligned (labels[b, p] follows input_ids[b, p])"
                )

    # --- Saving and loading ------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the projector parameters to a safetensors file."""
        from safetensors.torch import save_file

        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        metadata = {
            "student_hidden_size": str(self.student_hidden_size),
            "teacher_hidden_size": str(self.teacher_hidden_size),
            **{f"structure.{name}": text for name, text in self.structures.items()},
        }
        save_file(tensors, os.fspath(path), metadata=metadata)

    def load_pretrained(self, path: str | os.PathLike, strict: bool = True) -> list[str]:
        """Load projector parameters from a safetensors file or a DSKD `projector.pt`; return the ignored keys.

        Keys may be this module's own (`query.0.weight`, also what DSKD saves)
        or the flat form `proj_<name>_weight` / `proj_<name>_bias` for a
        projector that is a single linear layer. With `strict=True` a missing
        parameter or an unrecognised key is an error.
        """
        raw = _read_tensors(path)
        own = self.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        ignored: list[str] = []
        for key, tensor in raw.items():
            name = self._own_key(key)
            if name is None:
                ignored.append(key)
            else:
                mapped[name] = tensor
        missing = sorted(set(own) - set(mapped))
        if strict and (missing or ignored):
            raise ConfigError(
                f"projector file {os.fspath(path)} does not match this projector: missing {missing or 'nothing'}, "
                f"unexpected {sorted(ignored) or 'nothing'}; check the hidden sizes and structures, or load with strict=False"
            )
        wrong = [
            f"{name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}"
            for name, tensor in sorted(mapped.items())
            if tuple(tensor.shape) != tuple(own[name].shape)
        ]
        if wrong:
            raise ConfigError(
                f"projector file {os.fspath(path)} was saved for other hidden sizes: {'; '.join(wrong)}"
            )
        self.load_state_dict(mapped, strict=False)
        return sorted(ignored)

    def _own_key(self, key: str) -> str | None:
        own = self.state_dict()
        if key in own:
            return key
        if key.startswith("proj_"):
            name, _, param = key[len("proj_") :].rpartition("_")
            linears = [i for i, layer in enumerate(getattr(self, name, ())) if isinstance(layer, nn.Linear)]
            if len(linears) == 1 and f"{name}.{linears[0]}.{param}" in own:
                return f"{name}.{linears[0]}.{param}"
        return None


def _read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"projector file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(f"projector file {path} does not contain a dictionary of tensors (a state_dict)")
    return loaded


# --- Pieces shared by both projections ------------------------------------------------


def _latest_not_after(pairs: torch.Tensor, column_ends: torch.Tensor, row_ends: torch.Tensor, dim: int) -> torch.Tensor:
    """Keep, in each row of `pairs` [B, R, C], the columns that end latest but not after the row's end.

    `column_ends` broadcasts as [B, 1, C] and `row_ends` as [B, R, 1].
    """
    candidates = pairs & (column_ends <= row_ends)
    latest = torch.where(candidates, column_ends, torch.iinfo(torch.long).min).amax(dim=dim, keepdim=True)
    return candidates & (column_ends == latest)


def projected_accuracy(o_to_q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return where the projected teacher's most likely token is the gold token, [B, S] bool.

    DSKD distils `o→q` into the student only at these positions; masked
    positions (label -100) are never counted as correct.
    """
    return o_to_q.argmax(dim=-1).eq(labels) & labels.ne(IGNORE_INDEX)


def _lookup(
    embedding: nn.Module | torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, hidden_size: int, side: str
) -> torch.Tensor:
    """Embed `ids` without gradient, looking up id 0 at masked positions; [B, L] → [B, L, d]."""
    weight = embedding.weight if isinstance(embedding, nn.Module) else embedding
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise ConfigError(
            f"{side} embedding matrix has shape {tuple(weight.shape)}, expected [vocab, {hidden_size}]; "
            f"pass the {side} model's input embeddings (model.get_input_embeddings())"
        )
    safe_ids = torch.where(mask, ids, torch.zeros_like(ids))
    outside = (safe_ids < 0) | (safe_ids >= weight.shape[0])
    if bool(outside.any()):
        bad = int(safe_ids[outside][0])
        raise ConfigError(
            f"{side} token id {bad} is outside the {side} embedding ({weight.shape[0]} rows); "
            f"{side} ids must come from the {side} tokenizer (see retokenize)"
        )
    return nn.functional.embedding(safe_ids, weight.detach())


def _read_out(hidden: torch.Tensor, head: nn.Module | torch.Tensor, hidden_size: int, side: str) -> torch.Tensor:
    """Turn hidden states [B, L, d] into logits [B, L, V] with a head used without gradient."""
    weight = head.weight if isinstance(head, nn.Module) else head
    bias = getattr(head, "bias", None) if isinstance(head, nn.Module) else None
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise ConfigError(
            f"{side} output head has shape {tuple(weight.shape)}, expected [vocab, {hidden_size}]; "
            f"pass the {side} model's output embeddings (model.get_output_embeddings())"
        )
    # NOTE: DSKD's cross-attention criterion ignores a head bias; the heads it supports have none.
    logits = hidden @ weight.detach().float().transpose(0, 1)
    if bias is not None:
        logits = logits + bias.detach().float()
    return logits


def model_hidden_size(model: nn.Module, side: str) -> int:
    """Return the hidden size of a Hugging Face model from its config; `side` names it in the error."""
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "n_embed", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"cannot read the hidden size of the {side} model: its config has no hidden_size or n_embd")


# --- Padded output heads --------------------------------------------------------------


def align_heads(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int, policy: str = "truncate"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make the logits of two models that share a tokenizer comparable when their heads differ in size.

    Output heads are often padded beyond the tokenizer (e.g. 151936 vs 152064
    rows for one tokenizer). Rows at and after `vocab_size` (the tokenizer's
    length) never score a real token. Policy "truncate" keeps the first
    `vocab_size` rows of both, so the softmax runs over real tokens only.
    Policy "error" raises when the head sizes differ and otherwise returns
    the logits unchanged.
    """
    if policy not in HEAD_POLICIES:
        raise ConfigError(f"invalid head policy {policy!r}; expected one of {', '.join(HEAD_POLICIES)}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"vocab_size must be the tokenizer's length (a positive integer), got {vocab_size!r}")
    student_rows, teacher_rows = student_logits.shape[-1], teacher_logits.shape[-1]
    for side, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows < vocab_size:
            raise ConfigError(
                f"the {side} output head has {rows} rows but the tokenizer has {vocab_size} tokens; "
                f"the {side} model does not use this tokenizer, so project between vocabularies (o→q, q→o) instead"
            )
    if policy == "error":
        if student_rows != teacher_rows:
            raise ConfigError(
                f"the student output head has {student_rows} rows and the teacher output head has {teacher_rows} rows, for a tokenizer "
                f"of {vocab_size} tokens; set head.policy = \"truncate\" to score only the first {vocab_size} rows, "
                "or give both models heads of one size"
            )
        return student_logits, teacher_logits
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]


# --- Token streams across tokenizers --------------------------------------------------


@dataclass
class TokenAlignment:
    """One text in two tokenisations, with character spans and the token spans that overlap.

    `student_offsets[i]` and `teacher_offsets[j]` are [start, end) character
    ranges in `text`. `student_to_teacher[i]` is the [start, end) range of
    teacher tokens whose characters overlap student token i, and
    `teacher_to_student[j]` the reverse. Tokens without characters (a skipped
    special token) map to an empty range, except a final EOS, which maps to
    the other side's final EOS.
    """

    text: str
    student_ids: list[int]
    teacher_ids: list[int]
    student_offsets: list[tuple[int, int]]
    teacher_offsets: list[tuple[int, int]]
    student_to_teacher: list[tuple[int, int]]
    teacher_to_student: list[tuple[int, int]]


class _TokenizerView:
    """The decode/encode/offsets calls `retokenize` needs from a `tokenizers` or transformers tokenizer."""

    def __init__(self, tokenizer, eos_id: int | None, side: str):
        from tokenizers import Tokenizer

        if isinstance(tokenizer, Tokenizer):
            self.backend = tokenizer
            default_eos = None
        elif isinstance(getattr(tokenizer, "backend_tokenizer", None), Tokenizer):
            self.backend = tokenizer.backend_tokenizer
            default_eos = getattr(tokenizer, "eos_token_id", None)
        else:
            raise ConfigError(
                f"the {side} tokenizer ({type(tokenizer).__name__}) has no fast backend, so it cannot report character "
                "offsets; load it with AutoTokenizer.from_pretrained(..., use_fast=True) or pass a tokenizers.Tokenizer"
            )
        self.side = side
        self.eos_id = eos_id if eos_id is not None else default_eos
        self.size = self.backend.get_vocab_size(with_added_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.backend.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(span) for span in encoding.offsets]

    def check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.size]
        if bad:
            raise ConfigError(
                f"{self.side} token id {bad[0]} is outside the {self.side} tokenizer's vocabulary ({self.size} tokens); "
                f"these ids were not produced by the {self.side} tokenizer"
            )


def retokenize(
    student_ids: Sequence[int] | torch.Tensor,
    student_tokenizer,
    teacher_tokenizer,
    *,
    context_ids: Sequence[int] | torch.Tensor | None = None,
    student_eos_id: int | None = None,
    teacher_eos_id: int | None = None,
) -> TokenAlignment:
    """Re-encode student token ids (e.g. a generated response) with the teacher's tokenizer.

    The ids are decoded with the student tokenizer (special tokens dropped)
    and the text is encoded with the teacher tokenizer, so each model receives
    its own tokenisation of one string. `context_ids` (the student's prompt)
    are decoded in front of the ids and cut off again, which keeps the
    response's leading space that a decoder drops at the start of a text.
    A final student EOS becomes the teacher's EOS. EOS ids default to the
    tokenizers' `eos_token_id` (transformers tokenizers only).
    """
    student = _TokenizerView(student_tokenizer, student_eos_id, "student")
    teacher = _TokenizerView(teacher_tokenizer, teacher_eos_id, "teacher")
    ids = _as_id_list(student_ids)
    context = _as_id_list(context_ids) if context_ids is not None else []
    student.check_ids(ids)
    student.check_ids(context)

    text, student_offsets = _decoded_spans(student, context, ids)
    teacher_ids, teacher_offsets = teacher.encode(text)

    ends_with_eos = bool(ids) and student.eos_id is not None and ids[-1] == student.eos_id
    if ends_with_eos:
        if teacher.eos_id is None:
            raise ConfigError(
                "the student ids end with EOS but the teacher tokenizer's EOS id is unknown; pass teacher_eos_id="
            )
        teacher_ids.append(teacher.eos_id)
        teacher_offsets.append((len(text), len(text)))

    student_to_teacher = _overlaps(student_offsets, teacher_offsets)
    teacher_to_student = _overlaps(teacher_offsets, student_offsets)
    if ends_with_eos:
        student_to_teacher[-1] = (len(teacher_ids) - 1, len(teacher_ids))
        teacher_to_student[-1] = (len(ids) - 1, len(ids))
    return TokenAlignment(
        text, ids, teacher_ids, student_offsets, teacher_offsets, student_to_teacher, teacher_to_student
    )


def retokenize_batch(
    sequences: Sequence[Sequence[int]],
    student_tokenizer,
    teacher_tokenizer,
    *,
    contexts: Sequence[Sequence[int]] | None = None,
    student_eos_id: int | None = None,
    teacher_eos_id: int | None = None,
) -> list[TokenAlignment]:
    """Apply `retokenize` to each sequence (unpadded), with its context when `contexts` is given."""
    if contexts is not None and len(contexts) != len(sequences):
        raise ConfigError(f"got {len(sequences)} sequences but {len(contexts)} contexts; pass one context per sequence")
    return [
        retokenize(
            sequence,
            student_tokenizer,
            teacher_tokenizer,
            context_ids=None if contexts is None else contexts[row],
            student_eos_id=student_eos_id,
            teacher_eos_id=teacher_eos_id,
        )
        for row, sequence in enumerate(sequences)
    ]


def _as_id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ConfigError(f"expected a 1-D sequence of token ids, got a tensor of shape {tuple(ids.shape)}")
        return [int(i) for i in ids.tolist()]
    return [int(i) for i in ids]


def _decoded_spans(view: _TokenizerView, context: list[int], ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decode `context + ids` and return the text after the context with each id's character span.

    Each prefix is decoded in turn. A token whose decoded prefix is not yet a
    prefix of the full text (part of a multi-byte character, or a decoder
    that rewrites earlier text) is grouped with the following tokens until
    the text agrees again. Every token of a group gets the group's span.
    This costs one decode per token, O(n²) characters in all.
    """
    full = view.decode(context + ids)
    start = _common_prefix_length(view.decode(context), full) if context else 0
    spans: list[tuple[int, int]] = []
    group_start, pending = start, 0
    for count in range(1, len(ids) + 1):
        prefix = view.decode(context + ids[:count])
        pending += 1
        if full.startswith(prefix) and len(prefix) >= group_start:
            spans.extend([(group_start - start, len(prefix) - start)] * pending)
            group_start, pending = len(prefix), 0
    spans.extend([(group_start - start, len(full) - start)] * pending)
    return full[start:], spans


def _common_prefix_length(a: str, b: str) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def _overlaps(spans: list[tuple[int, int]], others: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each [start, end) span, the range of `others` (sorted by position) whose characters overlap it."""
    other_starts = [start for start, _ in others]
    other_ends = [end for _, end in others]
    ranges = []
    for start, end in spans:
        if end <= start:
            first = bisect.bisect_right(other_ends, start)
            ranges.append((first, first))
            continue
        first = bisect.bisect_right(other_ends, start)  # first other token ending after `start`
        last = bisect.bisect_left(other_starts, end)  # first other token starting at or after `end`
        ranges.append((first, max(first, last)))
    return ranges
