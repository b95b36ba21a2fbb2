"""The compiled loss of objectives with cross-vocabulary projections (o→q, q→o), as a torch module.

`ProjectedObjective` owns the `DualSpaceProjector` as its submodule
`projector`, so `parameters()` and `state_dict()` hold the projector
weights. Each call runs the projector once and every term that reads `o→q`
or `q→o` uses that result.

Positions: the student's distributions (`q`, `o→q`) live at the student's
positions and are scored against `labels`. The teacher's (`o`, `q→o`) live at
the teacher's own positions, scored against `teacher_labels`. Every term is
summed over its valid positions and divided by the number of valid student
labels, teacher-position sums included, as Dual-Space KD does.

Gradient rules of Dual-Space KD: `CE(o→q)` trains the projector through
`o→q`. In any other loss, `o→q` is a target like `o` and is used without
gradient, and the accuracy gate (`projection.accuracy_gate`) restricts
that loss to the positions where argmax `o→q` is the label. `q→o` keeps its
gradient everywhere.

Token weights and scheduled coefficients work as in `kdsl.lower`. A token
weight is evaluated at the positions of its term, so `t` and `T` count that
side's tokens. A term over `o` or `q→o` may read `o(w_t)`, and a term over
`q` or `o→q` may read `q(w_t)`: each is the probability of that side's own
label.

Sequence weights ρ(w) are one number per row: row b is the same text in
both tokenizations, so `log o(w)` sums the teacher's log-probabilities of
its own labels, `log q(w)` and `log ref(w)` the student's (the reference
model reads the student's tokens), and `T` in ρ(w) counts the student's
scored tokens. The weight multiplies the term at every position of the row,
on either side.

NOTE: this path evaluates whole [B, L, V] tensors with ordinary autograd,
without the chunking of `kdsl.lower`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdsl import numerics, scalars
from kdsl.errors import KdslError
from kdsl.ir import Graph, Node
from kdsl.objective import ALL_ROLES, Objective
from kdsl.projection import DualSpaceProjector
from kdsl.settings import defaults

__all__ = ["ProjectedObjective", "has_projection"]

IGNORE_INDEX = -100

_ROLE_SYMBOLS = {str(symbol): symbol for symbol in ALL_ROLES}

# Ops this evaluator runs on whole [B, L, ...] tensors.
_SUPPORTED = {"input", "valid", "projection", "log_softmax", "mixture", "kl", "cross_entropy", "total_variation",
              "entropy", "token_nll", "combine", "token_mean", "sequence_mean", "sum", "schedule", "token_weight",
              "position", "length", "token_logp", "sequence_logp", "sequence_length", "sequence_weight"}

# The call arguments the projector reads, with what each one is.
_PROJECTOR_ARGUMENTS = {
    "student_hidden": "the student's last hidden layer [B, S, d_s]",
    "teacher_hidden": "the teacher's last hidden layer [B, T, d_t]",
    "student_input_ids": "the student's input token ids [B, S]",
    "teacher_input_ids": "the teacher's input token ids [B, T] (cross attention only)",
    "teacher_labels": "the teacher's labels [B, T], -100 where a position is not scored",
    "student_embedding": "the student's input embedding (nn.Embedding or a [V_s, d_s] tensor; cross attention only)",
    "teacher_embedding": "the teacher's input embedding (nn.Embedding or a [V_t, d_t] tensor; cross attention only)",
    "student_head": "the student's output head weight [V_s, d_s]",
    "student_ends": "characters of the response text read through each student position [B, S] (projection.alignment = \"text\"; kdsl.teacher_tokens.teacher_batch gives them)",
    "teacher_ends": "characters of the response text read through each teacher position [B, T] (projection.alignment = \"text\"; kdsl.teacher_tokens.teacher_batch gives them)",
    "teacher_head": "the teacher's output head weight [V_t, d_t] (needed for q→o)",
}


def has_projection(graph: Graph) -> bool:
    """Return whether some node of `graph` projects between vocabularies."""
    return any(node.op == "projection" for node in graph)


def build_projector(settings: dict[str, Any], hidden_sizes: tuple[int, int] | None,
                    projector: DualSpaceProjector | None) -> DualSpaceProjector:
    """Return the projector of a compiled objective, checked against the projection settings."""
    cross = settings["projection.attention"] == "cross"
    compat = settings["projection.compat"]
    gate = bool(settings["projection.accuracy_gate"])
    alignment = settings["projection.alignment"]
    if projector is None:
        if hidden_sizes is None:
            raise KdslError(
                "this objective projects between vocabularies (o→q, q→o), so it needs a projector: pass "
                "hidden_sizes=(student_hidden_size, teacher_hidden_size), or projector=DualSpaceProjector.for_models(student, teacher)"
            )
        student_size, teacher_size = hidden_sizes
        return DualSpaceProjector(student_size, teacher_size, cross_attention=cross, compat=compat, accuracy_gate=gate,
                                  alignment=alignment)
    if not isinstance(projector, DualSpaceProjector):
        raise KdslError(f"projector must be a kdsl.projection.DualSpaceProjector, got {type(projector).__name__}")
    expected = {"compat": (projector.compat, compat, "projection.compat"),
                "accuracy_gate": (projector.accuracy_gate, gate, "projection.accuracy_gate"),
                "alignment": (projector.alignment, alignment, "projection.alignment")}
    for name, (found, wanted, setting) in expected.items():
        if found != wanted:
            raise KdslError(f"the projector was built with {name}={found!r} but the spec sets {setting} = {wanted!r}; "
                            f"build the projector with {name}={wanted!r} or change the setting")
    if cross and not projector.cross_attention:
        raise KdslError('projection.attention is "cross" but the projector was built with cross_attention=False; '
                        'build it with cross_attention=True or set projection.attention = "aligned"')
    return projector


class ProjectedObjective(nn.Module):
    """A compiled kdsl objective with o→q or q→o terms; the projector is its submodule `projector`.

    ```
    result = objective(
        student_logits=s, labels=y,                      # [B, S, V_s], [B, S]
        teacher_logits=t, teacher_labels=y_t,            # [B, T, V_t], [B, T]
        student_hidden=h_s, teacher_hidden=h_t,          # [B, S, d_s], [B, T, d_t]
        student_input_ids=x_s, teacher_input_ids=x_t,
        student_embedding=E_s, teacher_embedding=E_t,
        student_head=W_s, teacher_head=W_t,
    )
    ```

    Logits may be left out where hidden states and a head give them
    (`student_hidden @ student_head.T`). Teacher inputs are used without
    gradient.
    """

    def __init__(self, graph: Graph, objective: Objective, *, hidden_sizes: tuple[int, int] | None = None,
                 projector: DualSpaceProjector | None = None):
        super().__init__()
        self.graph = graph
        self.objective = objective
        self.settings = {**defaults(), **objective.settings}
        self.fused = False
        for node in graph:
            if node.op not in _SUPPORTED:
                raise KdslError(f"node %{node.name} ({node.op}) is not available together with a projection (o→q, q→o); "
                                "write the objective with KL, CE, H, TV, mixtures, token and sequence weights and schedules")
        if objective.reduction != "token":
            raise KdslError(f'reduction = "{objective.reduction}" is not available together with a projection (o→q, q→o); '
                            'use reduction = "token"')
        self.aligned = self.settings["projection.attention"] == "aligned"
        self.projector = build_projector(self.settings, hidden_sizes, projector)
        self.term_keys = {node.name: node.attr("name") for node in graph.term_nodes()}

    def extra_repr(self) -> str:
        attention = "aligned" if self.aligned else "cross"
        return f"projection, attention={attention}\n{self.objective.source_text.strip()}"

    def forward(
        self,
        student_logits: Tensor | None = None,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        teacher_labels: Tensor | None = None,
        student_hidden: Tensor | None = None,
        teacher_hidden: Tensor | None = None,
        student_input_ids: Tensor | None = None,
        teacher_input_ids: Tensor | None = None,
        student_embedding: nn.Module | Tensor | None = None,
        teacher_embedding: nn.Module | Tensor | None = None,
        student_head: Tensor | None = None,
        teacher_head: Tensor | None = None,
        student_ends: Tensor | None = None,
        teacher_ends: Tensor | None = None,
        ref_logits: Tensor | None = None,
        epoch: float = 0.0,
        step: int = 0,
        progress: float = 0.0,
        num_items: int | float | Tensor | None = None,
        group: int | None = None,
    ):
        from kdsl.lower import LossResult

        arguments = {"student_hidden": student_hidden, "teacher_hidden": teacher_hidden,
                     "student_input_ids": student_input_ids, "teacher_input_ids": teacher_input_ids,
                     "teacher_labels": teacher_labels, "student_embedding": student_embedding,
                     "teacher_embedding": teacher_embedding, "student_head": student_head, "teacher_head": teacher_head,
                     "student_ends": student_ends, "teacher_ends": teacher_ends}
        terms = self._select_terms(group)
        needed = self._needed_nodes(terms)
        self._check_arguments(arguments, labels, needed)
        projection = self._project(arguments, labels, needed)

        call = _Evaluation(
            settings=self.settings,
            schedule={"epoch": float(epoch), "step": float(step), "progress": float(progress)},
            labels={"student": labels.long(), "teacher": teacher_labels.long() if teacher_labels is not None else None},
            logits={"student": _logits(student_logits, student_hidden, student_head, "student"),
                    "teacher": _logits(teacher_logits, teacher_hidden, teacher_head, "teacher"),
                    "ref": ref_logits},
            projection=projection,
        )
        count = int(labels.ne(IGNORE_INDEX).sum())
        denominator = float(num_items) if num_items is not None else max(count, 1)
        if isinstance(num_items, Tensor):
            denominator = num_items.detach()
        loss = None
        values = {}
        for term in terms:
            value = call.term(self.graph, term) / denominator
            values[self.term_keys[term.name]] = value.detach()
            loss = value if loss is None else loss + value
        return LossResult(loss, values, num_items if num_items is not None else count,
                          sequence_weights=call.applied_weights(self.graph, terms))

    def _select_terms(self, group: int | None) -> list[Node]:
        if group is None:
            return self.graph.term_nodes()
        groups = sorted({node.group for node in self.graph.term_nodes()})
        if isinstance(group, bool) or not isinstance(group, int) or group not in groups:
            raise KdslError(f"group={group!r} is not a sampling group of this objective; expected one of {groups} or None")
        return self.graph.term_nodes(group)

    def _needed_nodes(self, terms: list[Node]) -> list[Node]:
        seen: dict[str, Node] = {}
        for term in terms:
            for node in self.graph.ancestors(term.name):
                seen[node.name] = node
        return list(seen.values())

    def _check_arguments(self, arguments: dict[str, Any], labels: Tensor | None, needed: list[Node]) -> None:
        if labels is None or not isinstance(labels, Tensor) or labels.dim() != 2:
            raise KdslError("labels are required: student token ids [B, S] aligned with the student logits, -100 where a "
                            "position is not scored")
        sources = {node.attr("source") for node in needed if node.op == "projection"}
        if not sources:
            return
        required = ["student_hidden", "teacher_hidden", "teacher_labels", "student_head"]
        if not self.aligned:
            required += ["student_input_ids", "teacher_input_ids", "student_embedding", "teacher_embedding"]
            if self.projector.alignment == "text":
                required += ["student_ends", "teacher_ends"]
        if "q" in sources:
            required.append("teacher_head")
        for name in required:
            if arguments[name] is None:
                arrows = " and ".join(f"{s}→{'q' if s == 'o' else 'o'}" for s in sorted(sources))
                raise KdslError(f"the projection {arrows} needs {name}: {_PROJECTOR_ARGUMENTS[name]}; pass {name}=...")

    def _project(self, arguments: dict[str, Any], labels: Tensor, needed: list[Node]):
        sources = {node.attr("source") for node in needed if node.op == "projection"}
        if not sources:
            return None
        teacher_head = arguments["teacher_head"] if "q" in sources else None
        if self.aligned:
            return self.projector.project_aligned(
                arguments["student_hidden"], arguments["teacher_hidden"],
                student_labels=labels, teacher_labels=arguments["teacher_labels"],
                student_head=arguments["student_head"], teacher_head=teacher_head,
            )
        return self.projector(
            arguments["student_hidden"], arguments["teacher_hidden"],
            student_input_ids=arguments["student_input_ids"], student_labels=labels,
            teacher_input_ids=arguments["teacher_input_ids"], teacher_labels=arguments["teacher_labels"],
            student_embedding=arguments["student_embedding"], teacher_embedding=arguments["teacher_embedding"],
            student_head=arguments["student_head"], teacher_head=teacher_head,
            student_ends=arguments["student_ends"], teacher_ends=arguments["teacher_ends"],
        )


def _logits(logits: Tensor | None, hidden: Tensor | None, head: Tensor | None, side: str) -> Tensor | None:
    if logits is not None:
        return logits
    if hidden is not None and head is not None:
        return hidden @ head.T
    return None


class _Evaluation:
    """The values of one call: each node on whole [B, L, ...] tensors, cached per gradient mode."""

    def __init__(self, *, settings, schedule, labels, logits, projection):
        self.settings = settings
        self.schedule = schedule
        self.labels = labels
        self.logits = logits
        self.projection = projection
        self.cache: dict[tuple[str, bool], Tensor] = {}
        self.unclipped: dict[str, Tensor] = {}  # float64 [B] per sequence_weight node, before rho.clip

    def term(self, graph: Graph, term: Node) -> Tensor:
        loss_node = graph.node(term.inputs[0])
        # o→q is a trainable prediction only in CE(o→q); in every other loss it is a target.
        as_target = loss_node.op != "token_nll"
        side = self.side(graph, loss_node)
        per_position = self.value(graph, loss_node, as_target)
        mask = self.labels[side].ne(IGNORE_INDEX)
        if side == "student" and as_target and self.reads_o_to_q(graph, loss_node):
            mask = self.projection.kd_mask
        constant = term.attr("coef")  # a sympy number built by the checker, or None for 1
        coefficient = 1.0 if constant is None else scalars.evaluate_schedule(constant, **self.schedule)
        for key, name in term.named:
            if key == "coef":
                coefficient *= scalars.evaluate_schedule(graph.node(name).attr("expr"), **self.schedule)
            elif key == "weight":
                weight = self.token_weight(graph, graph.node(name), side, term.attr("name"))
                # A zero weight removes the position even where the loss is +inf (0·inf would be NaN).
                per_position = torch.where(weight == 0, 0.0, weight * per_position)
            elif key == "seq_weight":
                weight = self.sequence_value(graph, graph.node(name)).float().unsqueeze(-1)  # [B, 1]
                per_position = torch.where(weight == 0, 0.0, weight * per_position)
        return coefficient * torch.where(mask, per_position, 0.0).sum()

    def sequence_value(self, graph: Graph, node: Node) -> Tensor:
        """Evaluate a per-row node of a sequence weight, [B] in float64 and without gradient."""
        key = (node.name, True)
        if key in self.cache:
            return self.cache[key]
        if node.op == "sequence_logp":
            value = self.sequence_logp(graph, graph.node(node.inputs[0]))
        elif node.op == "sequence_length":
            value = self.labels["student"].ne(IGNORE_INDEX).sum(dim=1).double()
        elif node.op == "sequence_weight":
            bindings = {_ROLE_SYMBOLS[name]: float(v) for name, v in self.schedule.items()}
            for role, name in node.named:
                bindings[_ROLE_SYMBOLS[role]] = self.sequence_value(graph, graph.node(name))
            with torch.no_grad():
                value = scalars.evaluate(node.attr("expr"), bindings, dtype=torch.float64)
            rows = self.labels["student"].shape[0]
            value = value.expand(rows) if value.dim() == 0 else value
            self.unclipped[node.name] = value
            clip = node.attr("clip")
            value = value.clamp(max=clip) if clip is not None else value
        else:
            raise KdslError(f"node %{node.name} ({node.op}) is not a per-sequence value")
        self.cache[key] = value
        return value

    def sequence_logp(self, graph: Graph, logp_node: Node) -> Tensor:
        """Sum each row's log-probabilities of its own side's labels, [B] in float64 and detached."""
        # The log-probabilities come from the shared cache with their gradient path, because a later term may read
        # the same log_softmax as its loss. Evaluated under no_grad they would reach that term without one.
        logp = self.value(graph, logp_node, True).detach()
        labels = self.labels[self.side(graph, logp_node)]
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        # Sums of hundreds of log-probabilities are kept in float64, as in kdsl.lower.
        return torch.where(labels.ne(IGNORE_INDEX), picked.double(), 0.0).sum(dim=1)

    def applied_weights(self, graph: Graph, terms: list[Node]) -> dict:
        """Return the sequence weights each term applied, keyed by term name, as kdsl.lower reports them."""
        from kdsl.lower import SequenceWeights

        applied = {}
        for term in terms:
            name = term.named_input("seq_weight")
            if name is None:
                continue
            loss_node = graph.node(term.inputs[0])
            side = self.side(graph, loss_node)
            applied[term.attr("name")] = SequenceWeights(
                applied=self.cache[(name, True)], unclipped=self.unclipped[name],
                scored=self.labels[side].ne(IGNORE_INDEX).any(dim=1), clip=graph.node(name).attr("clip"),
            )
        return applied

    def token_weight(self, graph: Graph, node: Node, side: str, term_name: str) -> Tensor:
        """Evaluate a per-token weight [B, L] at the positions of `side`, without gradient."""
        labels = self.labels[side]
        valid = labels.ne(IGNORE_INDEX)
        bindings = {_ROLE_SYMBOLS[name]: value for name, value in self.schedule.items()}
        for key, name in node.named:
            role = graph.node(name)
            if role.op == "position":
                value = valid.cumsum(dim=1)  # 1-based t among the scored tokens of the row
            elif role.op == "length":
                value = valid.sum(dim=1, keepdim=True).expand_as(labels)
            elif role.op == "token_logp":
                logp_node = graph.node(role.inputs[0])
                if self.side(graph, logp_node) != side:
                    model = "o" if side == "student" else "q"
                    raise KdslError(
                        f"the weight of term '{term_name}' reads {model}(w_t) at the {side}'s positions, but {model} "
                        f"predicts the other tokenizer's tokens there; in a term over the {side}'s positions use "
                        f"{'q' if side == 'student' else 'o'}(w_t), t or T"
                    )
                logp = self.value(graph, logp_node, True)
                value = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            else:
                raise KdslError(f"node %{role.name} ({role.op}) is not available as a weight input with a projection")
            bindings[_ROLE_SYMBOLS[key]] = value
        weight = scalars.evaluate_weight(node.attr("expr"), bindings)
        return weight.expand(labels.shape) if weight.dim() == 0 else weight

    @staticmethod
    def reads_o_to_q(graph: Graph, node: Node) -> bool:
        return any(n.op == "projection" and n.attr("source") == "o" for n in graph.ancestors(node.name))

    @staticmethod
    def side(graph: Graph, node: Node) -> str:
        """Return whose positions ("student" or "teacher") a loss or distribution lives at, from its logits.

        The student's logits and `o→q` live at student positions, the
        teacher's logits and `q→o` at teacher positions. Labels and masks are
        not followed, because they belong to the term rather than to a side.
        """
        sides = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if current.op == "projection":
                sides.add("student" if current.attr("source") == "o" else "teacher")
            elif current.op == "input" and current.attr("role") in ("student_logits", "teacher_logits"):
                sides.add(current.attr("role").split("_")[0])
            elif current.op == "input" and current.attr("role") == "ref_logits":
                sides.add("student")  # the reference model reads the student's tokens
            elif current.op not in ("input", "valid", "position", "length"):
                stack.extend(graph.node(name) for name in current.inputs)
        if len(sides) > 1:
            raise KdslError(f"node %{node.name} ({node.op}) mixes the student's and the teacher's positions; "
                            "project one side into the other's vocabulary first")
        return sides.pop() if sides else "student"

    def value(self, graph: Graph, node: Node, as_target: bool) -> Tensor:
        key = (node.name, as_target)
        if key not in self.cache:
            self.cache[key] = self.emit(graph, node, as_target)
        return self.cache[key]

    def emit(self, graph: Graph, node: Node, as_target: bool) -> Tensor:
        inputs = [self.value(graph, graph.node(name), as_target) for name in node.inputs]
        op = node.op
        if op == "input":
            return self.input(node)
        if op == "valid":
            return inputs[0].ne(IGNORE_INDEX)
        if op == "projection":
            if node.attr("source") == "o":
                logits = self.projection.o_to_q
                return logits.detach() if as_target else logits
            return self.projection.q_to_o
        if op == "log_softmax":
            temperature = node.attr("temperature")
            if temperature is not None:
                temperature = scalars.evaluate_schedule(temperature, **self.schedule)
            return numerics.log_softmax(inputs[0], temperature=temperature, top_k=node.attr("top_k"))
        if op == "mixture":
            weights = tuple(scalars.evaluate_schedule(w, **self.schedule) for w in node.attr("weights"))
            return numerics.log_mixture(inputs, weights)
        if op in ("kl", "cross_entropy", "total_variation"):
            return getattr(numerics, op)(*inputs)
        if op == "entropy":
            return numerics.entropy(inputs[0])
        if op == "token_nll":
            logp = inputs[0]
            labels = self.labels["student" if graph.node(node.inputs[0]).type.shape[2] != "Vt" else "teacher"]
            return numerics.token_nll(logp, labels)
        if op == "combine":
            weights = [scalars.evaluate_schedule(w, **self.schedule) for w in node.attr("weights")]
            return sum(w * part for w, part in zip(weights, inputs) if w != 0)
        raise KdslError(f"node %{node.name} ({op}) is not available together with a projection (o→q, q→o)")

    def input(self, node: Node) -> Tensor:
        role = node.attr("role")
        if role == "labels":
            return self.labels["student"]
        if role in ("student_logits", "teacher_logits"):
            side = role.split("_")[0]
            logits = self.logits[side]
            if logits is None:
                raise KdslError(f"this objective needs {side}_logits, or {side}_hidden with {side}_head")
            return logits.detach() if side == "teacher" else logits
        if role == "ref_logits":
            if self.logits["ref"] is None:
                raise KdslError("this objective reads ref(w): pass ref_logits, the reference model's logits on the "
                                "student's tokens [B, S, V_s]")
            return self.logits["ref"].detach()
        raise KdslError(f"the input {role} is not available together with a projection (o→q, q→o)")
