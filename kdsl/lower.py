"""Lower a verified graph to a torch module, `CompiledObjective`, that computes the loss in chunks.

Fused evaluation (the default) visits the valid tokens of a batch (labels
other than -100) in chunks of at most `train.chunk_size` rows and at most
`max_chunk_elements` logits per model. For each chunk it builds the
student's logits rows, read from `student_logits` (a view where the chunk's
positions are consecutive in memory) or computed as
`student_hidden @ student_head.T`. It evaluates every term of the selected
sampling groups on them and at once takes the gradient of the chunk's share
of the loss (`torch.autograd.grad`) with respect to those rows, or to the
hidden rows, in which case the head's gradient is added in place
(`_HeadProjection`). Nothing of the chunk is kept, because the backward pass
of the returned loss only scales the precomputed gradients
(`_PrecomputedGradients`). So no full-vocabulary tensor exists for more than
one chunk at a time, beyond the inputs and their gradients.

The kernels take a mask-free fast path where a chunk's log-probabilities
are all finite (`kdsl.numerics`). Each log-softmax output is checked once
per chunk, and the kernels that read it get the result.

Dense evaluation (`fused=False`) evaluates the same nodes on all valid rows
at once with ordinary autograd. Tests and the benchmark compare the two.

Each node kind has one small emitter (`_EMITTERS`). The chunk loop runs the
emitters of the per-position nodes in graph order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch
from torch import Tensor, nn

from kdsl import numerics, scalars
from kdsl.errors import InternalError, KdslError
from kdsl.ir import INPUT_ROLES, Graph, Node
from kdsl.objective import ALL_ROLES, Objective
from kdsl.settings import defaults

__all__ = ["lower", "CompiledObjective", "LossResult"]

logger = logging.getLogger("kdsl.lower")

IGNORE_INDEX = -100

# Default bound on rows × vocabulary of one chunk. At their peak the kernels of a chunk keep about 5
# (KL) to 9 (JS, or λ·KL + CE + SKL) chunk-sized float32 tensors alive, as measured with
# benchmarks/loss_bench.py. So 1M logits (4 MiB) per tensor keep the working set near 20-40 MiB.
CHUNK_ELEMENTS = 1 << 20
# From hidden states every chunk reads the student's head [V, H] twice and the teacher's once and
# updates the student's head gradient, about 20·V·H bytes for 8·rows·V·H flops, so few rows make
# those matrix products slow. Chunks keep at least this many rows. With 32 rows and H ≥ 1024 the working set (5 to 9 tensors of rows × V) is a
# sixth (KL) to a quarter (JS) of the head gradient [V, H] that the pass returns anyway. More rows
# run the products faster for a higher peak: pass max_chunk_elements to choose.
HIDDEN_MIN_ROWS = 32

# Nodes evaluated once per call on whole sequences, before the chunk loop.
SEQUENCE_OPS = ("sequence_logp", "sequence_length", "sequence_weight", "schedule")
TERM_OPS = ("token_mean", "sequence_mean")

_ROLE_SYMBOLS = {str(symbol): symbol for symbol in ALL_ROLES}

# The call arguments that provide each input role, as the error for a missing input names them.
_ROLE_ARGUMENTS = {
    "labels": "labels (token ids aligned with the logits, -100 where a position is not scored)",
    "student_logits": "student_logits or student_hidden+student_head",
    "teacher_logits": "teacher_logits or teacher_hidden+teacher_head",
    "ref_logits": "ref_logits",
    "student_hidden": "student_hidden",
    "teacher_hidden": "teacher_hidden",
}


def lower(
    graph: Graph,
    objective: Objective,
    *,
    fused: bool = True,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    max_chunk_elements: int | None = None,
    hidden_sizes: tuple[int, int] | None = None,
    projector: Any = None,
) -> "CompiledObjective":
    """Build the torch module that evaluates `graph`; `objective` supplies settings and the spec text.

    A graph with o→q or q→o compiles to `kdsl.projected.ProjectedObjective`, which needs `hidden_sizes`
    (student, teacher) or a `projector`.
    """
    graph.verify()
    from kdsl.projected import ProjectedObjective, has_projection

    if has_projection(graph):
        return ProjectedObjective(graph, objective, hidden_sizes=hidden_sizes, projector=projector)
    return CompiledObjective(
        graph, objective, fused=fused, chunk_size=chunk_size, vocab_size=vocab_size, max_chunk_elements=max_chunk_elements,
    )


@dataclass
class SequenceWeights:
    """The sequence weights ρ(w) that one term applied to a batch, one float64 value per row."""

    applied: Tensor  # [B], after rho.clip
    unclipped: Tensor  # [B], before rho.clip
    scored: Tensor  # [B] bool: rows with at least one scored token
    clip: float | None


@dataclass
class LossResult:
    """The value of a compiled objective on one batch.

    `loss` is a scalar with a gradient path to the student inputs. `terms`
    maps each term's name to its detached contribution to `loss`
    (coefficient included, so the values sum to `loss`). `num_items` is the
    denominator: valid tokens (token reduction) or sequences with at least
    one valid token (sequence reduction), or the `num_items` passed in.
    `sequence_weights` maps the name of each term with a sequence weight to
    the weights it applied.
    """

    loss: Tensor
    terms: dict[str, Tensor]
    num_items: int | float | Tensor
    sequence_weights: dict[str, SequenceWeights] = field(default_factory=dict)


# --- Inputs of one call -----------------------------------------------------------------


@dataclass
class _ModelInput:
    """One model's scores: full logits [B, T, V], or hidden states [B, T, H] with a head [V, H]."""

    side: str  # "student", "teacher" or "ref"
    logits: Tensor | None = None
    hidden: Tensor | None = None
    head: Tensor | None = None
    bias: Tensor | None = None

    @property
    def present(self) -> bool:
        return self.logits is not None or (self.hidden is not None and self.head is not None)

    @property
    def vocab(self) -> int:
        return self.logits.shape[-1] if self.logits is not None else self.head.shape[0]

    def check(self, labels: Tensor) -> None:
        """Check shapes against the labels [B, T]; raise KdslError naming the bad argument."""
        if self.logits is not None:
            _check_float(f"{self.side}_logits", self.logits)
            if self.logits.dim() != 3 or self.logits.shape[:2] != labels.shape:
                raise KdslError(
                    f"{self.side}_logits have shape {tuple(self.logits.shape)}, expected {tuple(labels.shape)} + (vocab,) "
                    "to match labels; logits must be aligned with labels (logits[:, :-1] with labels = input_ids[:, 1:])"
                )
            return
        if self.hidden is None and self.head is None:
            return
        if self.hidden is None or self.head is None:
            given, missing = ("hidden", "head") if self.hidden is not None else ("head", "hidden")
            raise KdslError(f"{self.side}_{given} was given without {self.side}_{missing}; pass both, or pass {self.side}_logits")
        _check_float(f"{self.side}_hidden", self.hidden)
        _check_float(f"{self.side}_head", self.head)
        if self.hidden.dim() != 3 or self.hidden.shape[:2] != labels.shape:
            raise KdslError(
                f"{self.side}_hidden has shape {tuple(self.hidden.shape)}, expected {tuple(labels.shape)} + (hidden,) "
                "to match labels"
            )
        if self.head.dim() != 2 or self.head.shape[1] != self.hidden.shape[-1]:
            raise KdslError(
                f"{self.side}_head has shape {tuple(self.head.shape)}, expected (vocab, {self.hidden.shape[-1]}) "
                f"for hidden states of size {self.hidden.shape[-1]} (pass the output embedding weight, not its transpose)"
            )
        if self.bias is not None and tuple(self.bias.shape) != (self.head.shape[0],):
            raise KdslError(f"{self.side}_head_bias has shape {tuple(self.bias.shape)}, expected ({self.head.shape[0]},)")

    def differentiable(self) -> list[Tensor]:
        """Return the tensors of this input that require a gradient."""
        tensors = [self.logits, self.hidden, self.head, self.bias]
        return [t for t in tensors if t is not None and t.requires_grad]


def _check_float(name: str, tensor: Any) -> None:
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        kind = getattr(tensor, "dtype", type(tensor).__name__)
        raise KdslError(f"{name} must be a floating-point torch.Tensor, got {kind}")


class _Rows:
    """The valid positions of a batch, one row each: sequence, column, label, t and T."""

    def __init__(self, labels: Tensor):
        batch, length = labels.shape
        mask = labels != IGNORE_INDEX  # [B, T]
        self.mask = mask
        self.batch = batch
        self.sequence, self.column = mask.nonzero(as_tuple=True)  # [N] each: row and column of each valid position
        self.flat = self.sequence * length + self.column  # [N] index of each valid position in the flattened [B·T]
        self.labels = labels[self.sequence, self.column]  # [N]
        self.position = mask.cumsum(dim=1)[self.sequence, self.column]  # [N], 1-based t
        self.lengths = mask.sum(dim=1)  # [B], T per sequence
        self.length = self.lengths.index_select(0, self.sequence)  # [N]

    @property
    def count(self) -> int:
        return self.sequence.numel()

    def sequences_with_tokens(self) -> int:
        return int((self.lengths > 0).sum())


@dataclass
class _Chunk:
    """One chunk of valid rows and the values computed on it, by node name."""

    rows: slice
    sequence: Tensor  # [c] batch row of each position
    column: Tensor  # [c] position along the sequence
    labels: Tensor  # [c]
    position: Tensor  # [c]
    length: Tensor  # [c]
    # Index of each position in the flattened [B·T] positions, and the chunk's (start, stop) there when its
    # positions are consecutive, else None.
    flat: Tensor | None = None
    span: tuple[int, int] | None = None
    values: dict[str, Tensor] = field(default_factory=dict)
    # Whether every entry of a value is finite, for the log-probabilities whose kernels have a fast path.
    finite: dict[str, bool] = field(default_factory=dict)
    # The student's logits rows [c, V], kept for graphs that read them more than once (one input node per
    # sampling group), except on the fused hidden-state path, where each read projects `grad_leaf` again.
    student_rows: Tensor | None = None
    # The tensor the fused pass takes the chunk's gradient with respect to: the student's logits rows [c, V],
    # or on the hidden-state path its hidden rows [c, H] (the head's gradient is added by _HeadProjection).
    grad_leaf: Tensor | None = None


# --- The module ---------------------------------------------------------------------------


class CompiledObjective(nn.Module):
    """A compiled kdsl objective: call it on a batch to get the loss and the value of each term.

    ```
    result = objective(student_logits=s, teacher_logits=t, labels=y, epoch=0.0, step=0, progress=0.0)
    result.loss.backward()
    ```

    Logits are aligned with labels (`logits[b, p]` scores `labels[b, p]`);
    -100 marks positions that are not scored. Instead of logits, pass
    `student_hidden` [B, T, H] and `student_head` [V, H], and optionally
    `student_head_bias` [V]. The logits are then formed chunk by chunk and
    never materialised. The teacher takes the same three arguments. Teacher and
    reference inputs are used without gradient. bf16 and fp16 inputs are
    computed in float32.

    `vocab_size` (the tokenizer's length), when set, is the number of head
    rows scored wherever teacher and student meet on one vocabulary.
    """

    def __init__(
        self,
        graph: Graph,
        objective: Objective,
        *,
        fused: bool = True,
        chunk_size: int | None = None,
        vocab_size: int | None = None,
        max_chunk_elements: int | None = None,
    ):
        super().__init__()
        self.graph = graph
        self.objective = objective
        self.settings = {**defaults(), **objective.settings}
        self.fused = fused
        self.chunk_size = int(chunk_size or self.settings["train.chunk_size"])
        if self.chunk_size < 1:
            raise KdslError(f"chunk_size must be a positive number of tokens, got {self.chunk_size}")
        if max_chunk_elements is not None and max_chunk_elements < 1:
            raise KdslError(f"max_chunk_elements must be a positive number of logits, got {max_chunk_elements}")
        self.max_chunk_elements = max_chunk_elements
        self.vocab_size = vocab_size
        self.head_policy = self.settings["head.policy"]
        self.term_keys = _term_keys(graph)
        self._warned_vocab: tuple[int, int] | None = None
        _reject_projections(graph)

    def extra_repr(self) -> str:
        text = self.objective.source_text.strip() or "\n".join(term.name for term in self.objective.terms)
        mode = "fused" if self.fused else "dense"
        return f"{mode}, chunk_size={self.chunk_size}, reduction={self.objective.reduction}\n{text}"

    # The call.

    # Under torch.compile the loss runs eagerly: dynamo skips this method (one graph break), because the
    # chunk loop has data-dependent shapes and calls torch.autograd.grad, which dynamo does not trace.
    @torch.compiler.disable
    def forward(
        self,
        student_logits: Tensor | None = None,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        epoch: float = 0.0,
        step: int = 0,
        progress: float = 0.0,
        num_items: int | float | Tensor | None = None,
        group: int | None = None,
        student_hidden: Tensor | None = None,
        student_head: Tensor | None = None,
        student_head_bias: Tensor | None = None,
        teacher_hidden: Tensor | None = None,
        teacher_head: Tensor | None = None,
        teacher_head_bias: Tensor | None = None,
        ref_logits: Tensor | None = None,
    ) -> LossResult:
        terms = self._select_terms(group)
        plan = _Plan(self.graph, terms)
        models = {
            "student": _ModelInput("student", student_logits, student_hidden, student_head, student_head_bias),
            "teacher": _ModelInput("teacher", teacher_logits, teacher_hidden, teacher_head, teacher_head_bias),
            "ref": _ModelInput("ref", ref_logits),
        }
        labels = self._check_inputs(plan, models, labels)
        rows = _Rows(labels)
        call = _Call(
            module=self,
            plan=plan,
            models=models,
            rows=rows,
            schedule={"epoch": float(epoch), "step": float(step), "progress": float(progress)},
            vocab=self._shared_vocab(models),
        )
        self._check_labels(models, rows, call.vocab)
        count = rows.sequences_with_tokens() if self.objective.reduction == "sequence" else rows.count
        denominator = self._denominator(count, num_items)
        return call.run(denominator, num_items if num_items is not None else count)

    def _select_terms(self, group: int | None) -> list[Node]:
        if group is None:
            return self.graph.term_nodes()
        groups = sorted({node.group for node in self.graph.term_nodes()})
        if isinstance(group, bool) or not isinstance(group, int) or group not in groups:
            raise KdslError(f"group={group!r} is not a sampling group of this objective; expected one of {groups} or None")
        return self.graph.term_nodes(group)

    def _check_inputs(self, plan: "_Plan", models: dict[str, _ModelInput], labels: Tensor | None) -> Tensor:
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
                kind = getattr(labels, "dtype", type(labels).__name__)
                raise KdslError(f"labels must be an int64 tensor of token ids, got {kind}")
            if labels.dim() != 2:
                raise KdslError(f"labels have shape {tuple(labels.shape)}, expected (batch, length)")
            for model in models.values():
                model.check(labels)
        for role in plan.roles:
            present = labels is not None if role == "labels" else _role_present(role, models)
            if not present:
                term = plan.first_term_needing(role)
                raise KdslError(f"term '{term.attr('name')}' needs {_ROLE_ARGUMENTS[role]}")
        if labels is None:
            raise KdslError("labels are required: token ids aligned with the logits, -100 where a position is not scored")
        return labels.long()

    def _shared_vocab(self, models: dict[str, _ModelInput]) -> int | None:
        """Return the number of head rows scored where teacher and student share a vocabulary, or None."""
        if not self.graph.shared_vocab:
            return None
        sizes = {side: models[side].vocab for side in ("student", "teacher") if models[side].present}
        if not sizes:
            return None
        if len(set(sizes.values())) > 1 and self.head_policy != "truncate":
            student, teacher = sizes["student"], sizes["teacher"]
            raise KdslError(
                f"the student scores {student} vocabulary entries and the teacher {teacher}; set "
                f'head.policy = "truncate" to score only the first {min(student, teacher)} rows (padded heads of one '
                "tokenizer), or use a projection (o→q, q→o) or ULD for different tokenizers"
            )
        if self.vocab_size is not None:
            for side, size in sizes.items():
                if size < self.vocab_size:
                    raise KdslError(
                        f"the {side} scores {size} vocabulary entries but vocab_size is {self.vocab_size}; the {side} "
                        "does not use this tokenizer, so project between vocabularies (o→q, q→o) instead"
                    )
            return self.vocab_size
        if len(set(sizes.values())) == 1:
            return next(iter(sizes.values()))
        return self._truncate(sizes["student"], sizes["teacher"])

    def _truncate(self, student: int, teacher: int) -> int:
        if self._warned_vocab != (student, teacher):
            # NOTE: without vocab_size the smaller head is taken as the tokenizer's length.
            logger.warning(
                "student scores %d vocabulary entries and teacher %d; scoring the first %d (head.policy=truncate)",
                student, teacher, min(student, teacher),
            )
            self._warned_vocab = (student, teacher)
        return min(student, teacher)

    @staticmethod
    def _check_labels(models: dict[str, _ModelInput], rows: _Rows, vocab: int | None) -> None:
        """Check that every scored label is a token id of each vocabulary it indexes."""
        if not rows.count:
            return
        lowest, highest = int(rows.labels.min()), int(rows.labels.max())
        if lowest < 0:
            raise KdslError(f"label {lowest} is negative; use {IGNORE_INDEX} for positions that are not scored")
        limits = []
        if vocab is not None:
            limits.append(("the shared vocabulary", vocab))
        elif models["student"].present:
            limits.append(("the student vocabulary", models["student"].vocab))
        if models["ref"].present:
            limits.append(("the reference model's vocabulary", models["ref"].vocab))
        for name, size in limits:
            if highest >= size:
                raise KdslError(f"label {highest} is outside {name} of {size} entries; labels must be token ids of that tokenizer")

    def _denominator(self, count: int, num_items: int | float | Tensor | None) -> float | Tensor:
        """Return what the summed loss is divided by: `num_items` when given, else this call's count (at least 1)."""
        if num_items is None:
            return max(count, 1)
        if isinstance(num_items, Tensor):
            return num_items.detach()
        if float(num_items) <= 0:
            raise KdslError(f"num_items must be positive (the global count of valid tokens or sequences), got {num_items}")
        return float(num_items)


def _term_keys(graph: Graph) -> dict[str, str]:
    """Map each term node to its key in `LossResult.terms`; repeated term names get a ` (2)` suffix."""
    keys: dict[str, str] = {}
    used: set[str] = set()
    for node in graph.term_nodes():
        key, counter = node.attr("name"), 2
        while key in used:
            key = f"{node.attr('name')} ({counter})"
            counter += 1
        keys[node.name] = key
        used.add(key)
    return keys


def _role_present(role: str, models: dict[str, _ModelInput]) -> bool:
    if role == "student_logits":
        return models["student"].present
    if role == "teacher_logits":
        return models["teacher"].present
    if role == "ref_logits":
        return models["ref"].present
    if role == "student_hidden":
        return models["student"].hidden is not None
    if role == "teacher_hidden":
        return models["teacher"].hidden is not None
    raise InternalError(f"unknown input role {role!r}")


def _reject_projections(graph: Graph) -> None:
    """Raise for a graph with o→q or q→o: `lower()` compiles those to `kdsl.projected.ProjectedObjective`."""
    for node in graph:
        if node.op == "projection":
            arrow = "o→q" if node.attr("source") == "o" else "q→o"
            raise KdslError(
                f"CompiledObjective does not evaluate the {arrow} projection (Dual-Space KD); build the module "
                "with kdsl.lower.lower(), which returns a ProjectedObjective for objectives with projections"
            )


# --- Evaluation plan ------------------------------------------------------------------------


class _Plan:
    """The nodes one call evaluates, split into the sequence pre-pass and the per-row chunk pass."""

    def __init__(self, graph: Graph, terms: list[Node]):
        self.graph = graph
        self.terms = terms
        needed = _needed(graph, [term.name for term in terms], stop=SEQUENCE_OPS)
        self.row_nodes = [node for node in needed if node.op not in SEQUENCE_OPS + TERM_OPS]
        all_needed = _needed(graph, [term.name for term in terms], stop=())
        self.sequence_nodes = [node for node in all_needed if node.op in SEQUENCE_OPS]
        sums = [node.name for node in self.sequence_nodes if node.op == "sequence_logp"]
        self.prepass_nodes = [node for node in _needed(graph, sums, stop=()) if node.op not in SEQUENCE_OPS]
        self.release = _last_uses(self.row_nodes, keep={name for term in terms for name in term.all_inputs})
        self.roles = sorted({node.attr("role") for node in all_needed if node.op == "input"}, key=list(INPUT_ROLES).index)
        self.student_used = any(node.attr("role") == "student_logits" for node in all_needed if node.op == "input")

    def first_term_needing(self, role: str) -> Node:
        for term in self.terms:
            if any(node.op == "input" and node.attr("role") == role for node in self.graph.ancestors(term.name)):
                return term
        raise InternalError(f"no selected term needs the input {role}")


def _last_uses(nodes: list[Node], keep: set[str]) -> list[list[str]]:
    """For each node, list the values no later node of `nodes` reads, so a chunk can drop them early."""
    last: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.all_inputs:
            last[name] = index
    release: list[list[str]] = [[] for _ in nodes]
    for name, index in last.items():
        if name not in keep:
            release[index].append(name)
    return release


def _needed(graph: Graph, roots: list[str], stop: tuple[str, ...]) -> list[Node]:
    """Return the nodes `roots` depend on, in graph order, not looking past nodes whose op is in `stop`."""
    needed = set(roots)
    for node in reversed(graph.nodes):
        if node.name in needed and (node.op not in stop or node.name in roots):
            needed.update(node.all_inputs)
    return [node for node in graph.nodes if node.name in needed]


# --- One call ---------------------------------------------------------------------------------


@dataclass
class _Call:
    """The state of one forward call: inputs, row layout, evaluated schedules and the chunk loop."""

    module: CompiledObjective
    plan: _Plan
    models: dict[str, _ModelInput]
    rows: _Rows
    schedule: dict[str, float]
    vocab: int | None
    sequence_values: dict[str, Tensor] = field(default_factory=dict)
    unclipped_weights: dict[str, Tensor] = field(default_factory=dict)  # float64 [B] per sequence_weight node
    floats: dict[tuple[str, str], Any] = field(default_factory=dict)
    heads: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)
    # Gradient buffers of the fused pass, set while the chunk loop of a call that needs a gradient runs.
    accumulator: "_GradientAccumulator | None" = None

    def head(self, side: str) -> tuple[Tensor, Tensor | None]:
        """Return a model's head weight [V, H] and bias [V] in float32, converted once per call."""
        if side not in self.heads:
            model = self.models[side]
            bias = model.bias.float() if model.bias is not None else None
            self.heads[side] = (model.head.float(), bias)
        return self.heads[side]

    # Schedules and constants.

    def value(self, node: Node, key: str) -> Any:
        """Evaluate a constant or schedule attribute of `node` (a sympy expression or a tuple of them) once per call."""
        cache_key = (node.name, key)
        if cache_key not in self.floats:
            raw = node.attr(key)
            if isinstance(raw, tuple):
                self.floats[cache_key] = tuple(self.scalar(item) for item in raw)
            elif raw is None:
                self.floats[cache_key] = None
            else:
                self.floats[cache_key] = self.scalar(raw)
        return self.floats[cache_key]

    def scalar(self, expr: sympy.Basic) -> float:
        return scalars.evaluate_schedule(expr, **self.schedule)

    def schedule_bindings(self) -> dict[sympy.Symbol, float]:
        return {_ROLE_SYMBOLS[name]: value for name, value in self.schedule.items()}

    # The loop.

    def run(self, denominator: float | Tensor, num_items: Any) -> LossResult:
        fused = self.module.fused
        student = self.models["student"]
        wants_grad = torch.is_grad_enabled() and self.plan.student_used and bool(student.differentiable())

        self.sequence_pass()
        chunk_size = self.rows_per_chunk() if fused else max(self.rows.count, 1)
        totals = {term.name: torch.zeros((), dtype=torch.float32, device=self.rows.labels.device) for term in self.plan.terms}
        accumulator = _GradientAccumulator(student, self.rows) if fused and wants_grad else None
        self.accumulator = accumulator
        dense_loss = None

        for chunk in self.chunks(chunk_size):
            with torch.enable_grad() if wants_grad else torch.no_grad():
                contributions = self.evaluate_chunk(chunk)
                chunk_loss = sum(contributions.values()) / denominator
            for name, value in contributions.items():
                totals[name] = totals[name] + value.detach() / denominator
            if accumulator is not None:
                accumulator.add(chunk, chunk_loss)
            elif not fused:
                dense_loss = chunk_loss

        detached_total = sum(totals.values()) if totals else torch.zeros(())
        if accumulator is not None:
            loss = accumulator.attach(detached_total)
        elif wants_grad and dense_loss is not None:
            loss = dense_loss
        elif wants_grad:
            # No valid token: a zero loss that still reaches the student inputs (with zero gradient).
            loss = detached_total.detach() + sum(t.sum() * 0.0 for t in student.differentiable())
        else:
            loss = detached_total.detach()
        terms = {self.module.term_keys[name]: value.detach() for name, value in totals.items()}
        return LossResult(loss=loss, terms=terms, num_items=num_items, sequence_weights=self.applied_weights())

    def applied_weights(self) -> dict[str, SequenceWeights]:
        """Return the sequence weights of each weighted term of this call, keyed by the term's name."""
        result = {}
        scored = self.rows.lengths > 0
        for term in self.plan.terms:
            name = term.named_input("seq_weight")
            if name is None:
                continue
            clip = self.module.graph.node(name).attr("clip")
            unclipped = self.unclipped_weights[name]
            applied = unclipped.clamp(max=clip) if clip is not None else unclipped
            result[self.module.term_keys[term.name]] = SequenceWeights(applied, unclipped, scored, clip)
        return result

    def rows_per_chunk(self) -> int:
        """Return `chunk_size`, lowered so one chunk's logits of the widest model fit `max_chunk_elements`.

        Without an explicit `max_chunk_elements`, chunks from hidden states keep at least HIDDEN_MIN_ROWS rows.
        """
        present = [model for model in self.models.values() if model.present]
        widest = max((model.vocab for model in present), default=1)
        rows = (self.module.max_chunk_elements or CHUNK_ELEMENTS) // widest
        if self.module.max_chunk_elements is None and any(model.logits is None for model in present):
            rows = max(rows, HIDDEN_MIN_ROWS)
        return max(1, min(self.module.chunk_size, rows))

    def chunks(self, size: int):
        rows = self.rows
        parts = [slice(start, min(start + size, rows.count)) for start in range(0, rows.count, size)]
        for part, span in zip(parts, self._spans(parts)):
            chunk = _Chunk(part, rows.sequence[part], rows.column[part], rows.labels[part], rows.position[part], rows.length[part])
            chunk.flat, chunk.span = rows.flat[part], span
            yield chunk

    def _spans(self, parts: list[slice]) -> list[tuple[int, int] | None]:
        """Return each chunk's range in the flattened [B·T] positions where its positions are consecutive, else None.

        A chunk inside one sequence, or across sequences with no prompt or padding between them, reads its
        rows as a view of [B, T, V] inputs instead of a gathered copy. One transfer to the host for all chunks.
        """
        if not parts:
            return []
        flat = self.rows.flat
        first = flat[[part.start for part in parts]]
        last = flat[[part.stop - 1 for part in parts]]
        sizes = torch.tensor([part.stop - part.start for part in parts], device=flat.device)
        consecutive = (last - first + 1) == sizes
        spans = []
        for start, size, ok in zip(first.tolist(), sizes.tolist(), consecutive.tolist()):
            spans.append((start, start + size) if ok else None)
        return spans

    def sequence_pass(self) -> None:
        """Evaluate per-sequence nodes: log-probabilities of whole responses (one cheap pass) and their weights."""
        values = self.sequence_values
        sums = [node for node in self.plan.sequence_nodes if node.op == "sequence_logp"]
        # Sums of hundreds of log-probabilities (log p(w) near -700 for p(w) = 1e-300) are accumulated in float64,
        # so that a ratio exp(log ref(w) - log q(w)) keeps float32 precision.
        for node in sums:
            values[node.name] = torch.zeros(self.rows.batch, dtype=torch.float64, device=self.rows.labels.device)
        if sums:
            with torch.no_grad():
                for chunk in self.chunks(self.rows_per_chunk()):
                    for node in self.plan.prepass_nodes:
                        chunk.values[node.name] = _EMITTERS[node.op](self, node, chunk)
                    for node in sums:
                        logp, _ = node.inputs
                        picked = _gather_label(chunk.values[logp], chunk.labels)
                        values[node.name].index_add_(0, chunk.sequence, picked.double())
        for node in self.plan.sequence_nodes:
            if node.op == "sequence_length":
                values[node.name] = self.rows.lengths
            elif node.op == "sequence_weight":
                values[node.name] = self.sequence_weight(node)
            elif node.op == "schedule":
                values[node.name] = torch.tensor(self.value(node, "expr"), dtype=torch.float32)

    def sequence_weight(self, node: Node) -> Tensor:
        """Evaluate a sequence weight [B] in float64 (one value per sequence) and return it in float32."""
        bindings = self.schedule_bindings()
        bindings.update({_ROLE_SYMBOLS[key]: self.sequence_values[name] for key, name in node.named})
        with torch.no_grad():
            weight = scalars.evaluate(node.attr("expr"), bindings, dtype=torch.float64)
        weight = weight.expand(self.rows.batch) if weight.dim() == 0 else weight
        self.unclipped_weights[node.name] = weight
        clip = node.attr("clip")
        return (weight.clamp(max=clip) if clip is not None else weight).float()

    def evaluate_chunk(self, chunk: _Chunk) -> dict[str, Tensor]:
        """Run the per-row emitters on one chunk; return each term's sum over the chunk, coefficient included."""
        for node, released in zip(self.plan.row_nodes, self.plan.release):
            chunk.values[node.name] = _EMITTERS[node.op](self, node, chunk)
            for name in released:
                chunk.values.pop(name, None)
        return {term.name: self.term_sum(term, chunk) for term in self.plan.terms}

    def term_sum(self, term: Node, chunk: _Chunk) -> Tensor:
        loss = chunk.values[term.inputs[0]]  # [c]
        weights = []
        for key, name in term.named:
            if key == "weight":
                weights.append(chunk.values[name])
            elif key == "seq_weight":
                weights.append(self.sequence_values[name].index_select(0, chunk.sequence))
        for weight in weights:
            # A zero weight removes the row even where the loss is +inf (0·inf would be NaN).
            loss = torch.where(weight == 0, 0.0, weight * loss)
        total = loss.sum()
        coefficient = term.named_input("coef")
        if coefficient is not None:
            total = total * self.sequence_values[coefficient]
        elif term.attr("coef") is not None:
            total = total * self.value(term, "coef")
        return total


# --- Gradients computed inside the forward pass ------------------------------------------------


class _GradientAccumulator:
    """Collect, chunk by chunk, the gradient of the loss with respect to the student's inputs."""

    def __init__(self, student: _ModelInput, rows: _Rows):
        self.student = student
        self.rows = rows
        self.grads: dict[str, Tensor] = {}
        if student.logits is not None:
            # Every valid row is written by a chunk, so only the other rows are zeroed (in attach). The buffer is
            # contiguous whatever the strides of the logits, so chunks write to it with row copies.
            logits = student.logits
            self.grads["logits"] = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        else:
            self.grads["hidden"] = torch.zeros(student.hidden.shape, dtype=student.hidden.dtype, device=student.hidden.device)
            self.grads["head"] = torch.zeros(student.head.shape, dtype=torch.float32, device=student.head.device)
            if student.bias is not None:
                self.grads["bias"] = torch.zeros(student.bias.shape, dtype=torch.float32, device=student.bias.device)

    def add(self, chunk: _Chunk, chunk_loss: Tensor) -> None:
        """Store the chunk's gradient: its logits rows, or its hidden rows (the head's part is added in backward)."""
        grad = None
        if chunk_loss.requires_grad and chunk.grad_leaf is not None:
            (grad,) = torch.autograd.grad(chunk_loss, chunk.grad_leaf, allow_unused=True)  # [c, V] or [c, H]
        if "logits" in self.grads:
            _write_rows(self.grads["logits"], chunk, grad if grad is not None else 0.0)
        elif grad is not None:
            _write_rows(self.grads["hidden"], chunk, grad)

    def attach(self, value: Tensor) -> Tensor:
        """Return `value` as a loss whose backward pass hands out the collected gradients."""
        student = self.student
        if "logits" in self.grads:
            skipped = (~self.rows.mask).flatten().nonzero().squeeze(1)  # positions no chunk visits
            self.grads["logits"].view(-1, self.grads["logits"].shape[-1]).index_fill_(0, skipped, 0.0)
            pairs = [(student.logits, self.grads["logits"])]
        else:
            pairs = [(student.hidden, self.grads["hidden"]), (student.head, self.grads["head"])]
            if student.bias is not None:
                pairs.append((student.bias, self.grads["bias"]))
        pairs = [(tensor, grad.to(tensor.dtype)) for tensor, grad in pairs if tensor.requires_grad]
        inputs = [tensor for tensor, _ in pairs]
        grads = [grad for _, grad in pairs]
        return _PrecomputedGradients.apply(value.detach(), len(inputs), *inputs, *grads)


class _HeadProjection(torch.autograd.Function):
    """One chunk's student logits, hidden [c, H] @ head.T [H, V] (+ bias), inside the fused pass.

    The backward pass adds the gradients of the head and bias to the accumulator's buffers in place and
    returns only the gradient of the hidden rows. So autograd keeps neither the logits rows nor their
    gradient once they are used, and no head-sized gradient is allocated per chunk.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, grads: dict[str, Tensor]) -> Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.grads = grads
        return torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        hidden, weight = ctx.saved_tensors
        ctx.grads["head"].addmm_(grad_rows.t(), hidden)
        if "bias" in ctx.grads:
            ctx.grads["bias"].add_(grad_rows.sum(dim=0))
        return grad_rows @ weight, None, None, None


class _PrecomputedGradients(torch.autograd.Function):
    """An identity on the loss value whose backward pass returns gradients computed in the forward pass.

    The gradients are handed out without a copy (scaled in place unless the
    incoming gradient is 1), so the backward pass can run only once.
    """

    @staticmethod
    def forward(ctx, value: Tensor, count: int, *tensors: Tensor) -> Tensor:
        ctx.count = count
        ctx.grads = list(tensors[count:])
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError(
                "the backward pass of a compiled kdsl loss can run only once (its gradients are computed in the "
                "forward pass); call the objective again instead of backward(retain_graph=True)"
            )
        if not torch.equal(grad_output, torch.ones_like(grad_output)):
            for grad in grads:
                grad.mul_(grad_output.to(grad.dtype))
        return (None, None, *grads, *([None] * ctx.count))


# --- Emitters: one per node kind ----------------------------------------------------------------


def _emit_input(call: _Call, node: Node, chunk: _Chunk) -> Tensor:
    role = node.attr("role")
    if role == "labels":
        return chunk.labels
    if role == "student_logits":
        return _student_rows(call, chunk)
    if role == "teacher_logits":
        return _frozen_rows(call, "teacher", chunk)
    if role == "ref_logits":
        return _frozen_rows(call, "ref", chunk)
    raise InternalError(f"the input role {role} has no per-row lowering", call.module.graph.format(verify=False))


def _student_rows(call: _Call, chunk: _Chunk) -> Tensor:
    """Return the student's logits rows [c, V] in float32. In the fused pass they derive from `chunk.grad_leaf`."""
    if chunk.student_rows is not None:
        return chunk.student_rows
    student = call.models["student"]
    leaf = call.accumulator is not None and torch.is_grad_enabled()
    if student.logits is not None:
        rows = _read_rows(student.logits, chunk)  # [c, V], no copy of the whole (possibly strided) input
        if leaf:
            chunk.grad_leaf = rows = rows.detach().float().requires_grad_()
        chunk.student_rows = rows.float()
        return chunk.student_rows
    weight, bias = call.head("student")  # [V, H], [V]
    if not leaf:
        hidden = _read_rows(student.hidden, chunk).float()  # [c, H]
        chunk.student_rows = torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()
        return chunk.student_rows
    if chunk.grad_leaf is None:
        chunk.grad_leaf = _read_rows(student.hidden, chunk).float().detach().requires_grad_()  # [c, H]
    bias = bias.detach() if bias is not None else None
    return _HeadProjection.apply(chunk.grad_leaf, weight.detach(), bias, call.accumulator.grads)


def _frozen_rows(call: _Call, side: str, chunk: _Chunk) -> Tensor:
    """Return a model's logits rows [c, V] in float32 without gradient (teacher and reference)."""
    model = call.models[side]
    with torch.no_grad():
        if model.logits is not None:
            return _read_rows(model.logits, chunk).float()
        hidden = _read_rows(model.hidden, chunk).float()  # [c, H]
        weight, bias = call.head(side)
        return torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()


def _flat_view(tensor: Tensor) -> Tensor | None:
    """Return a [B·T, ...] view of a [B, T, ...] tensor, or None where its strides allow no such view."""
    if tensor.shape[0] > 1 and tensor.stride(0) != tensor.shape[1] * tensor.stride(1):
        return None
    return tensor.view(-1, *tensor.shape[2:])


def _read_rows(tensor: Tensor, chunk: _Chunk) -> Tensor:
    """Return the chunk's rows of a [B, T, ...] tensor: a view where they are consecutive in memory, else a copy."""
    flat = _flat_view(tensor)
    if flat is None:
        return tensor[chunk.sequence, chunk.column]
    if chunk.span is not None:
        return flat[chunk.span[0]:chunk.span[1]]
    return flat.index_select(0, chunk.flat)


def _write_rows(target: Tensor, chunk: _Chunk, rows: Tensor | float) -> None:
    """Write `rows` ([c, ...] or a number) to the chunk's positions of a [B, T, ...] tensor."""
    if isinstance(rows, Tensor):
        rows = rows.to(target.dtype)
    flat = _flat_view(target)
    if flat is None:
        target[chunk.sequence, chunk.column] = rows
    elif chunk.span is not None:
        flat[chunk.span[0]:chunk.span[1]] = rows
    elif isinstance(rows, Tensor):
        flat.index_copy_(0, chunk.flat, rows)
    else:
        flat.index_fill_(0, chunk.flat, rows)


def _emit_valid(call: _Call, node: Node, chunk: _Chunk) -> Tensor:
    return torch.ones_like(chunk.labels, dtype=torch.bool)  # every row of a chunk is a valid position


def _emit_position(call: _Call, node: Node, chunk: _Chunk) -> Tensor:
    return chunk.position


def _emit_length(call: _Call, node: Node, chunk: _Chunk) -> Tensor:
    return chunk.length


def _emit_log_softmax(call: _Call, node: Node, chunk: _Chunk) -> Tensor:
    logits = chunk.values[node.inputs[0]]  # [c, V]
    if node.type.shape[-1] == "V" and call.vocab is not None and logits.shape[-1] > call.vocab:
        logits = logits[:, : call.vocab]  # drop padded head rows (head.policy)
    logp = numerics.log_softmax(logits, temperature=call.value(node, "temperature"), top_k=node.attr("top_k"))
    # One check per distribution and chunk, so that its kernels take the fast path without checking again.
    chunk.finite[node.name] = numerics.all_finite(logp)
    return logp


def _known_finite(chunk: _Chunk, names: tuple[str, ...]) -> bool | None:
    """Return True when every named value is known finite, False when one is known not to be, else None."""
    known = [chunk.finite.get(name) for name in names]
    if False in known:
        return False
    return True if all(known) else None


def _emit_mixture(call: _Call, node: Node, chunk: _Chunk) -> Tensor:
    finite = _known_finite(chunk, node.inputs)
    if finite:
        chunk.finite[node.name] = True  # float weights: a mixture of finite log-probabilities is finite
    return numerics.log_mixture([chunk.values[name] for name in node.inputs], call.value(node, "weights"), finite=finite)


def _pair(function: Callable[..., Tensor], *, finite_hint: bool = False) -> Callable[[_Call, Node, _Chunk], Tensor]:
    """Emit a kernel of two log-probabilities. With `finite_hint` it passes the chunk's record of their finiteness."""

    def emit(call: _Call, node: Node, chunk: _Chunk) -> Tensor:
        first, second = node.inputs
        if finite_hint:
            return function(chunk.values[first], chunk.values[second], finite=_known_finite(chunk, node.inputs))
        return function(chunk.values[first], chunk.values[second])

    return emit


def _emit_entropy(call: _Call, node: Node, chunk: _Chunk) -> Tensor:
    return numerics.entropy(chunk.values[node.inputs[0]], finite=_known_finite(chunk, node.inputs))


def _emit_f_divergence(call: _Call, node: Node, chunk: _Chunk) -> Tensor:
    first, second = node.inputs
    return numerics.f_divergence(
        chunk.values[first], chunk.values[second], _Generator(node.attr("f")),
        f_zero=node.attr("f_zero"), f_inf_slope=node.attr("f_inf_slope"),
    )


def _emit_token_nll(call: _Call, node: Node, chunk: _Chunk) -> Tensor:
    logp, labels = node.inputs
    return numerics.token_nll(chunk.values[logp], chunk.values[labels])


def _emit_token_logp(call: _Call, node: Node, chunk: _Chunk) -> Tensor:
    logp, labels = node.inputs
    return _gather_label(chunk.values[logp], chunk.values[labels]).detach()


def _gather_label(logp: Tensor, labels: Tensor) -> Tensor:
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [c, V] -> [c]


def _emit_token_weight(call: _Call, node: Node, chunk: _Chunk) -> Tensor:
    bindings = call.schedule_bindings()
    for key, name in node.named:
        value = chunk.values.get(name)
        if value is None:  # a per-sequence value, one per row of the chunk
            value = call.sequence_values[name].index_select(0, chunk.sequence)
        bindings[_ROLE_SYMBOLS[key]] = value
    weight = scalars.evaluate_weight(node.attr("expr"), bindings)
    return weight.expand(chunk.labels.shape) if weight.dim() == 0 else weight


def _emit_combine(call: _Call, node: Node, chunk: _Chunk) -> Tensor:
    total = None
    for name, weight in zip(node.inputs, call.value(node, "weights")):
        if weight == 0:
            continue  # a zero weight drops the part, even where it is +inf
        part = weight * chunk.values[name]
        total = part if total is None else total + part
    if total is None:
        first = chunk.values[node.inputs[0]]
        return torch.where(torch.isfinite(first), first, 0.0) * 0.0
    return total


class _Generator:
    """The f of an f-divergence as a callable on float64 tensors of ratios."""

    def __init__(self, generator: sympy.Lambda):
        self.generator = generator

    def __call__(self, ratio: Tensor) -> Tensor:
        (variable,) = self.generator.variables
        return scalars.evaluate(self.generator.expr, {variable: ratio}, dtype=torch.float64)


_EMITTERS: dict[str, Callable[[_Call, Node, _Chunk], Tensor]] = {
    "input": _emit_input,
    "valid": _emit_valid,
    "position": _emit_position,
    "length": _emit_length,
    "log_softmax": _emit_log_softmax,
    "mixture": _emit_mixture,
    "kl": _pair(numerics.kl, finite_hint=True),
    "cross_entropy": _pair(numerics.cross_entropy, finite_hint=True),
    "total_variation": _pair(numerics.total_variation),
    "uld": _pair(numerics.uld),
    "entropy": _emit_entropy,
    "f_divergence": _emit_f_divergence,
    "token_nll": _emit_token_nll,
    "token_logp": _emit_token_logp,
    "token_weight": _emit_token_weight,
    "combine": _emit_combine,
}
