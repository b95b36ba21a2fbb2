"""The compiled graph: an `Objective` as typed nodes, with sharing, a verifier and a stable text form.

`build(objective)` turns every term into nodes: inputs, log-softmax per
(model, temperature, top_k), mixtures in log space, per-position losses
(JS, SKL and SRKL are desugared into KLs over shared mixtures), token and
sequence weights, schedules and one reduction per term. Identical nodes of
a sampling group are created once (common-subexpression elimination), so
five terms over `q` share one `%logp_q`.

Every tensor node is typed with a short dtype and a symbolic shape:

- `B`, `T`: batch and sequence positions (logits are aligned with labels);
- `Vs`, `Vt`: student and teacher vocabularies. `V` is the one shared
  vocabulary of an objective that compares the two models directly. At run
  time the `head.policy` setting drops padded head rows to reach it.
- `Vr`: the reference model's vocabulary (sequence weights only);
- `Hs`, `Ht`: student and teacher hidden sizes (projections only).

`Graph.format()` prints one node per line in topological order, grouped by
sampling group (each group is one fused pass in the lowering):

    # kdsl graph v1
    reduction token
    vocab shared
    group 0 d_data:
      %o_logits: f32[B,T,Vt] = input(role="teacher_logits")
      %logp_o: f32[B,T,V] = log_softmax(%o_logits)  # 3:20
      ...
    %loss: f32[] = sum(%loss_kl_o_q)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import sympy

from kdsl.errors import InternalError, Span
from kdsl.objective import (
    LENGTH,
    LOG_O_SEQ,
    LOG_O_TOKEN,
    LOG_Q_SEQ,
    LOG_Q_TOKEN,
    LOG_REF_SEQ,
    POSITION,
    SCHEDULE_ROLES,
    AdaptiveSource,
    DataSource,
    Dist,
    Divergence,
    MixtureDist,
    MixtureSource,
    ModelDist,
    Objective,
    ProjectedDist,
    Scalar,
    Source,
    StudentSource,
    TeacherSource,
    Term,
)

__all__ = ["NodeType", "Node", "Graph", "build", "FORMAT_VERSION"]

FORMAT_VERSION = "# kdsl graph v1"

# Ops whose output is one value per position, reduced by the term nodes.
PER_POSITION_LOSS_OPS = ("kl", "cross_entropy", "entropy", "total_variation", "f_divergence", "uld", "token_nll", "combine")
REDUCTION_OPS = {"token": "token_mean", "sequence": "sequence_mean"}

# Input roles: the keyword of `CompiledObjective.__call__` each input node stands for, and its type.
INPUT_ROLES = {
    "labels": ("i64", ("B", "T")),
    "student_logits": ("f32", ("B", "T", "Vs")),
    "teacher_logits": ("f32", ("B", "T", "Vt")),
    "ref_logits": ("f32", ("B", "T", "Vr")),
    "student_hidden": ("f32", ("B", "T", "Hs")),
    "teacher_hidden": ("f32", ("B", "T", "Ht")),
}

_LOGITS_ROLE = {"q": "student_logits", "o": "teacher_logits", "ref": "ref_logits"}
_MODEL_VOCAB = {"q": "Vs", "o": "Vt", "ref": "Vr"}

_GREEK = {
    "α": "alpha", "β": "beta", "γ": "gamma", "δ": "delta", "ε": "epsilon", "η": "eta", "θ": "theta",
    "κ": "kappa", "λ": "lambda", "μ": "mu", "ν": "nu", "π": "pi", "ρ": "rho", "σ": "sigma",
    "τ": "tau", "φ": "phi", "χ": "chi", "ψ": "psi", "ω": "omega",
}


# --- Nodes and types -------------------------------------------------------------------


@dataclass(frozen=True)
class NodeType:
    """A short dtype (`f32`, `i64`, `bool`) and a symbolic shape (`("B", "T", "Vs")`)."""

    dtype: str
    shape: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(self.shape)}]"


F32_SCALAR = NodeType("f32", ())
F32_POSITIONS = NodeType("f32", ("B", "T"))
F32_SEQUENCES = NodeType("f32", ("B",))


@dataclass
class Node:
    """One operation of the graph.

    `inputs` are positional node names. `named` are (keyword, node name)
    pairs for optional or role-bound inputs. `attrs` are (key, value) pairs
    of constants: numbers, strings and sympy expressions. `group` is the
    sampling group, or None for the final sum.
    """

    name: str
    op: str
    type: NodeType
    inputs: tuple[str, ...] = ()
    named: tuple[tuple[str, str], ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()
    group: int | None = 0
    span: Span | None = None

    def attr(self, key: str, default: Any = None) -> Any:
        for name, value in self.attrs:
            if name == key:
                return value
        return default

    def named_input(self, key: str) -> str | None:
        for name, value in self.named:
            if name == key:
                return value
        return None

    @property
    def all_inputs(self) -> tuple[str, ...]:
        return self.inputs + tuple(value for _, value in self.named)

    def format(self) -> str:
        arguments = [f"%{name}" for name in self.inputs]
        arguments += [f"{key}=%{value}" for key, value in self.named]
        arguments += [f"{key}={_format_attr(value)}" for key, value in self.attrs]
        line = f"%{self.name}: {self.type} = {self.op}({', '.join(arguments)})"
        if self.span is not None:
            line += f"  # {self.span.position}"
        return line


def _format_attr(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "(" + ", ".join(_format_attr(v) for v in value) + ")"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --- The graph -------------------------------------------------------------------------


@dataclass
class Graph:
    """Typed nodes in topological order, one reduction per term and a final sum named `loss`."""

    nodes: list[Node]
    groups: dict[int, str]  # sampling group -> its source, printed
    reduction: str = "token"
    shared_vocab: bool = False
    _index: dict[str, Node] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index = {node.name: node for node in self.nodes}

    def node(self, name: str) -> Node:
        return self._index[name]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    def term_nodes(self, group: int | None = None) -> list[Node]:
        return [
            node for node in self.nodes
            if node.op in REDUCTION_OPS.values() and (group is None or node.group == group)
        ]

    def nodes_of_group(self, group: int) -> list[Node]:
        return [node for node in self.nodes if node.group == group]

    def ancestors(self, name: str) -> list[Node]:
        """Return `name` and every node it depends on, in topological order."""
        needed = {name}
        for node in reversed(self.nodes):
            if node.name in needed:
                needed.update(node.all_inputs)
        return [node for node in self.nodes if node.name in needed]

    def format(self, verify: bool = True) -> str:
        """Return the stable text form; the graph is verified first unless `verify` is False."""
        if verify:
            self.verify()
        lines = [FORMAT_VERSION, f"reduction {self.reduction}"]
        if self.shared_vocab:
            lines.append("vocab shared")
        for group, source in self.groups.items():
            members = self.nodes_of_group(group)
            if not members:
                continue
            lines.append(f"group {group} {source}:")
            lines.extend("  " + node.format() for node in members)
        lines.extend(node.format() for node in self.nodes if node.group is None)
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.format(verify=False)

    def verify(self) -> None:
        """Check names, topological order, types, vocabulary agreement and that every node is used.

        Raises InternalError with the printed graph on the first broken invariant.
        """
        _Verifier(self).run()


# --- Verifier --------------------------------------------------------------------------


class _Verifier:
    """Check the invariants of a graph; each `check_<op>` method types one kind of node."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.seen: dict[str, Node] = {}

    def fail(self, node: Node | None, message: str) -> None:
        where = f"node %{node.name} ({node.op}): " if node is not None else ""
        raise InternalError(where + message, graph_text=self.graph.format(verify=False))

    def run(self) -> None:
        graph = self.graph
        if not graph.nodes:
            self.fail(None, "the graph has no nodes")
        for node in graph.nodes:
            self.check_order(node)
            checker = getattr(self, f"check_{node.op}", None)
            if checker is None:
                self.fail(node, f"unknown op '{node.op}'")
            checker(node)
            self.seen[node.name] = node
        self.check_output()
        self.check_all_used()

    def check_order(self, node: Node) -> None:
        if node.name in self.seen:
            self.fail(node, "the name is defined twice")
        for name in node.all_inputs:
            if name not in self.seen:
                self.fail(node, f"input %{name} is not defined before this node (topological order)")
            source = self.seen[name]
            if node.group is not None and source.group != node.group:
                self.fail(node, f"input %{name} belongs to group {source.group}, not group {node.group}")
        if node.group is not None and node.group not in self.graph.groups:
            self.fail(node, f"group {node.group} is not a sampling group of the graph")

    def check_output(self) -> None:
        output = self.graph.output
        if output.op != "sum" or output.group is not None:
            self.fail(output, "the last node must be the final sum of the terms")

    def check_all_used(self) -> None:
        used = {name for node in self.graph.nodes for name in node.all_inputs}
        for node in self.graph.nodes[:-1]:
            if node.name not in used:
                self.fail(node, "the node is never used")

    # Helpers.

    def type_of(self, name: str) -> NodeType:
        return self.seen[name].type

    def expect_type(self, node: Node, name: str, dtype: str, shape: tuple[str, ...]) -> None:
        got = self.type_of(name)
        if got.dtype != dtype or got.shape != shape:
            self.fail(node, f"input %{name} has type {got}, expected {NodeType(dtype, shape)}")

    def expect_output(self, node: Node, dtype: str, shape: tuple[str, ...]) -> None:
        if node.type != NodeType(dtype, shape):
            self.fail(node, f"the node has type {node.type}, expected {NodeType(dtype, shape)}")

    def expect_arity(self, node: Node, count: int | None = None, minimum: int = 0) -> None:
        got = len(node.inputs)
        if (count is not None and got != count) or got < minimum:
            expected = count if count is not None else f"at least {minimum}"
            self.fail(node, f"the node has {got} positional inputs, expected {expected}")

    def distribution(self, node: Node, name: str) -> str:
        """Check that `name` is a distribution over (B, T, vocab) and return its vocabulary symbol."""
        got = self.type_of(name)
        if got.dtype != "f32" or len(got.shape) != 3 or got.shape[:2] != ("B", "T"):
            self.fail(node, f"input %{name} has type {got}, expected a distribution f32[B,T,V]")
        return got.shape[2]

    def same_vocabulary(self, node: Node) -> str:
        vocabs = [self.distribution(node, name) for name in node.inputs]
        if len(set(vocabs)) != 1:
            listed = ", ".join(f"%{n}: {v}" for n, v in zip(node.inputs, vocabs))
            self.fail(node, f"the inputs score different vocabularies ({listed})")
        return vocabs[0]

    def check_expression(self, node: Node, allowed: set[str]) -> None:
        expr = node.attr("expr")
        if not isinstance(expr, sympy.Basic):
            self.fail(node, "the node has no sympy expression attribute 'expr'")
        names = {str(s) for s in expr.free_symbols} - {str(s) for s in SCHEDULE_ROLES}
        unbound = names - allowed
        if unbound:
            self.fail(node, f"the expression {expr} uses {', '.join(sorted(unbound))} with no input bound to it")

    # One checker per op.

    def check_input(self, node: Node) -> None:
        role = node.attr("role")
        if role not in INPUT_ROLES:
            self.fail(node, f"unknown input role {role!r}")
        dtype, shape = INPUT_ROLES[role]
        self.expect_arity(node, 0)
        self.expect_output(node, dtype, shape)

    def check_labels_op(self, node: Node, dtype: str, shape: tuple[str, ...]) -> None:
        self.expect_arity(node, 1)
        self.expect_type(node, node.inputs[0], "i64", ("B", "T"))
        self.expect_output(node, dtype, shape)

    def check_valid(self, node: Node) -> None:
        self.check_labels_op(node, "bool", ("B", "T"))

    def check_position(self, node: Node) -> None:
        self.check_labels_op(node, "i64", ("B", "T"))

    def check_length(self, node: Node) -> None:
        self.check_labels_op(node, "i64", ("B", "T"))

    def check_sequence_length(self, node: Node) -> None:
        self.check_labels_op(node, "i64", ("B",))

    def check_log_softmax(self, node: Node) -> None:
        self.expect_arity(node, 1)
        source = self.distribution(node, node.inputs[0])
        target = node.type.shape[2] if len(node.type.shape) == 3 else None
        shared = self.graph.shared_vocab and source in ("Vs", "Vt") and target == "V"
        if target != source and not shared:
            self.fail(node, f"log_softmax over {source} cannot give a distribution over {target}")
        self.expect_output(node, "f32", ("B", "T", target))

    def check_mixture(self, node: Node) -> None:
        self.expect_arity(node, minimum=2)
        vocab = self.same_vocabulary(node)
        weights = node.attr("weights")
        if not isinstance(weights, tuple) or len(weights) != len(node.inputs):
            self.fail(node, f"the node has {len(node.inputs)} components but weights {weights}")
        self.expect_output(node, "f32", ("B", "T", vocab))

    def check_pair(self, node: Node) -> None:
        self.expect_arity(node, 2)
        self.same_vocabulary(node)
        self.expect_output(node, "f32", ("B", "T"))

    check_kl = check_cross_entropy = check_total_variation = check_pair

    def check_f_divergence(self, node: Node) -> None:
        self.check_pair(node)
        if not isinstance(node.attr("f"), sympy.Lambda):
            self.fail(node, "the node has no generator attribute 'f' (a sympy Lambda)")

    def check_entropy(self, node: Node) -> None:
        self.expect_arity(node, 1)
        self.distribution(node, node.inputs[0])
        self.expect_output(node, "f32", ("B", "T"))

    def check_uld(self, node: Node) -> None:
        # ULD compares sorted probability vectors, so the two vocabularies may differ.
        self.expect_arity(node, 2)
        for name in node.inputs:
            self.distribution(node, name)
        self.expect_output(node, "f32", ("B", "T"))

    def check_gather(self, node: Node, shape: tuple[str, ...]) -> None:
        self.expect_arity(node, 2)
        self.distribution(node, node.inputs[0])
        self.expect_type(node, node.inputs[1], "i64", ("B", "T"))
        self.expect_output(node, "f32", shape)

    def check_token_nll(self, node: Node) -> None:
        self.check_gather(node, ("B", "T"))

    def check_token_logp(self, node: Node) -> None:
        self.check_gather(node, ("B", "T"))

    def check_sequence_logp(self, node: Node) -> None:
        self.check_gather(node, ("B",))

    def check_token_weight(self, node: Node) -> None:
        self.expect_arity(node, 0)
        for key, name in node.named:
            shape = self.type_of(name).shape
            if shape not in (("B", "T"), ("B",)):
                self.fail(node, f"input {key}=%{name} has shape {self.type_of(name)}, expected [B,T] or [B]")
        self.check_expression(node, {key for key, _ in node.named})
        self.expect_output(node, "f32", ("B", "T"))

    def check_sequence_weight(self, node: Node) -> None:
        self.expect_arity(node, 0)
        for key, name in node.named:
            if self.type_of(name).shape != ("B",):
                self.fail(node, f"input {key}=%{name} has type {self.type_of(name)}, expected one value per sequence [B]")
        self.check_expression(node, {key for key, _ in node.named})
        self.expect_output(node, "f32", ("B",))

    def check_schedule(self, node: Node) -> None:
        self.expect_arity(node, 0)
        if node.named:
            self.fail(node, "a schedule takes no tensor inputs")
        self.check_expression(node, set())
        self.expect_output(node, "f32", ())

    def check_combine(self, node: Node) -> None:
        self.expect_arity(node, minimum=1)
        for name in node.inputs:
            self.expect_type(node, name, "f32", ("B", "T"))
        weights = node.attr("weights")
        if not isinstance(weights, tuple) or len(weights) != len(node.inputs):
            self.fail(node, f"the node has {len(node.inputs)} parts but weights {weights}")
        self.expect_output(node, "f32", ("B", "T"))

    def check_reduction(self, node: Node) -> None:
        if node.op != REDUCTION_OPS[self.graph.reduction]:
            self.fail(node, f"the graph's reduction is {self.graph.reduction}, so terms must use {REDUCTION_OPS[self.graph.reduction]}")
        self.expect_arity(node, 2)
        if self.seen[node.inputs[0]].op not in PER_POSITION_LOSS_OPS:
            self.fail(node, f"input %{node.inputs[0]} is a {self.seen[node.inputs[0]].op}, not a per-position loss")
        self.expect_type(node, node.inputs[0], "f32", ("B", "T"))
        self.expect_type(node, node.inputs[1], "bool", ("B", "T"))
        expected = {"weight": ("B", "T"), "seq_weight": ("B",), "coef": ()}
        for key, name in node.named:
            if key not in expected:
                self.fail(node, f"unknown named input {key}=%{name}")
            self.expect_type(node, name, "f32", expected[key])
        if not isinstance(node.attr("name"), str):
            self.fail(node, "the term has no name attribute")
        self.expect_output(node, "f32", ())

    check_token_mean = check_sequence_mean = check_reduction

    def check_projection(self, node: Node) -> None:
        self.expect_arity(node, 0)
        self.expect_type(node, node.named_input("student_hidden") or "", "f32", ("B", "T", "Hs"))
        self.expect_type(node, node.named_input("teacher_hidden") or "", "f32", ("B", "T", "Ht"))
        if node.attr("source") not in ("o", "q"):
            self.fail(node, f"unknown projection source {node.attr('source')!r}")
        if len(node.type.shape) != 3 or node.type.shape[2] not in ("Vs", "Vt"):
            self.fail(node, f"the node has type {node.type}, expected logits f32[B,T,V]")

    def check_sum(self, node: Node) -> None:
        self.expect_arity(node, minimum=1)
        for name in node.inputs:
            if self.seen[name].op not in REDUCTION_OPS.values():
                self.fail(node, f"input %{name} is not a term")
        self.expect_output(node, "f32", ())


# --- Building ---------------------------------------------------------------------------


def build(objective: Objective) -> Graph:
    """Turn a validated objective into a verified graph."""
    graph = _Builder(objective).run()
    graph.verify()
    return graph


class _Builder:
    """Create nodes term by term; identical nodes of one group are created once."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self.nodes: list[Node] = []
        self.names: set[str] = set()
        self.cse: dict[tuple, str] = {}
        self.shared_vocab = _compares_models(objective)
        self.group = 0

    def run(self) -> Graph:
        if self.objective.reduction not in REDUCTION_OPS:
            raise InternalError(f"unknown reduction {self.objective.reduction!r}; expected 'token' or 'sequence'")
        if not self.objective.terms:
            raise InternalError("the objective has no terms")

        groups = {index: _format_source(source) for index, source in enumerate(self.objective.groups)}
        term_names: list[str] = []
        for group in sorted({term.group for term in self.objective.terms}):
            if group not in groups:
                raise InternalError(f"a term refers to sampling group {group}, but the objective has {len(groups)} groups")
            self.group = group
            for term in self.objective.terms_of_group(group):
                term_names.append(self.term(term))

        self.group = None
        self.add("sum", F32_SCALAR, inputs=tuple(term_names), hint="loss")
        return Graph(self.nodes, groups, self.objective.reduction, self.shared_vocab)

    # Node creation.

    def add(
        self,
        op: str,
        type: NodeType,
        *,
        inputs: tuple[str, ...] = (),
        named: tuple[tuple[str, str], ...] = (),
        attrs: tuple[tuple[str, Any], ...] = (),
        hint: str,
        span: Span | None = None,
    ) -> str:
        key = (self.group, op, inputs, named, attrs)
        if key in self.cse:
            return self.cse[key]
        name = self.fresh_name(hint)
        self.nodes.append(Node(name, op, type, inputs, named, attrs, self.group, span))
        self.names.add(name)
        self.cse[key] = name
        return name

    def fresh_name(self, hint: str) -> str:
        base = _identifier(hint)
        if self.group:
            base += f"_g{self.group}"
        name, counter = base, 2
        while name in self.names:
            name = f"{base}_{counter}"
            counter += 1
        return name

    def vocab_of(self, model: str) -> str:
        if self.shared_vocab and model in ("o", "q"):
            return "V"
        return _MODEL_VOCAB[model]

    # Inputs and per-position context.

    def input(self, role: str, hint: str) -> str:
        dtype, shape = INPUT_ROLES[role]
        return self.add("input", NodeType(dtype, shape), attrs=(("role", role),), hint=hint)

    def labels(self) -> str:
        return self.input("labels", "labels")

    def mask(self) -> str:
        return self.add("valid", NodeType("bool", ("B", "T")), inputs=(self.labels(),), hint="mask")

    def model_logp(self, model: str, temperature: Scalar | None = None, top_k: int | None = None, span=None) -> str:
        logits = self.input(_LOGITS_ROLE[model], f"{model}_logits")
        attrs: list[tuple[str, Any]] = []
        name = model
        if temperature is not None and temperature.expr != 1:
            attrs.append(("temperature", temperature.expr))
            name += f"_tau{_short(temperature.expr)}"
        if top_k is not None:
            attrs.append(("top_k", int(top_k)))
            name += f"_top{top_k}"
        vocab = self.vocab_of(model)
        return self.add(
            "log_softmax", NodeType("f32", ("B", "T", vocab)),
            inputs=(logits,), attrs=tuple(attrs), hint=f"logp_{name}", span=span,
        )

    # Distributions.

    def dist(self, dist: Dist) -> str:
        if isinstance(dist, ModelDist):
            return self.model_logp(dist.model, dist.temperature, dist.top_k, dist.span)
        if isinstance(dist, MixtureDist):
            return self.mixture(dist)
        if isinstance(dist, ProjectedDist):
            return self.projection(dist)
        raise InternalError(f"unknown distribution {dist!r}")

    def mixture(self, dist: MixtureDist) -> str:
        parts = [self.dist(component) for _, component in dist.components]
        weights = tuple(coefficient.expr for coefficient, _ in dist.components)
        vocab = self.node_type(parts[0]).shape[2]
        return self.add(
            "mixture", NodeType("f32", ("B", "T", vocab)),
            inputs=tuple(parts), attrs=(("weights", weights),), hint=_dist_name(dist), span=dist.span,
        )

    def projection(self, dist: ProjectedDist) -> str:
        student = self.input("student_hidden", "q_hidden")
        teacher = self.input("teacher_hidden", "o_hidden")
        vocab = self.vocab_of(dist.target)
        logits = self.add(
            "projection", NodeType("f32", ("B", "T", _MODEL_VOCAB[dist.target])),
            named=(("student_hidden", student), ("teacher_hidden", teacher)),
            attrs=(("source", dist.source),), hint=f"{dist.source}_to_{dist.target}_logits", span=dist.span,
        )
        attrs = ()
        if dist.temperature is not None and dist.temperature.expr != 1:
            attrs = (("temperature", dist.temperature.expr),)
        return self.add(
            "log_softmax", NodeType("f32", ("B", "T", vocab)),
            inputs=(logits,), attrs=attrs, hint=f"logp_{_dist_name(dist)}", span=dist.span,
        )

    def node_type(self, name: str) -> NodeType:
        for node in reversed(self.nodes):
            if node.name == name:
                return node.type
        raise InternalError(f"no node named %{name}")

    # Losses.

    def divergence(self, div: Divergence) -> str:
        names = "_".join(_dist_name(arg) for arg in div.args)
        if div.kind == "CE":
            # CE scores the student; CE(o→q) scores the projection against the same labels.
            logp = self.dist(div.args[0]) if div.args else self.model_logp("q")
            return self.add(
                "token_nll", F32_POSITIONS, inputs=(logp, self.labels()), hint=f"ce_{names}" if names else "ce", span=div.span,
            )
        args = tuple(self.dist(arg) for arg in div.args)
        if div.kind == "KL":
            return self.add("kl", F32_POSITIONS, inputs=args, hint=f"kl_{names}", span=div.span)
        if div.kind == "H":
            op = "entropy" if len(args) == 1 else "cross_entropy"
            return self.add(op, F32_POSITIONS, inputs=args, hint=f"h_{names}", span=div.span)
        if div.kind == "TV":
            return self.add("total_variation", F32_POSITIONS, inputs=args, hint=f"tv_{names}", span=div.span)
        if div.kind == "ULD":
            return self.add("uld", F32_POSITIONS, inputs=args, hint=f"uld_{names}", span=div.span)
        if div.kind == "Df":
            attrs = (("f", div.generator),) + _generator_limits(div.generator)
            return self.add("f_divergence", F32_POSITIONS, inputs=args, attrs=attrs, hint=f"df_{names}", span=div.span)
        raise InternalError(f"no lowering for the divergence kind {div.kind!r} (after desugaring)")

    def loss(self, div: Divergence) -> str:
        parts = div.desugar()
        if len(parts) == 1 and parts[0][0].expr == 1:
            return self.divergence(parts[0][1])
        inputs = tuple(self.divergence(part) for _, part in parts)
        weights = tuple(coefficient.expr for coefficient, _ in parts)
        names = "_".join(_dist_name(arg) for arg in div.args)
        param = f"{_short(div.param.expr)}" if div.param is not None else ""
        return self.add(
            "combine", F32_POSITIONS, inputs=inputs, attrs=(("weights", weights),),
            hint=f"{div.kind.lower()}{param}_{names}", span=div.span,
        )

    # Weights and coefficients.

    def role_input(self, symbol: sympy.Symbol, per_sequence: bool) -> str:
        if symbol == POSITION:
            return self.add("position", NodeType("i64", ("B", "T")), inputs=(self.labels(),), hint="t")
        if symbol == LENGTH and per_sequence:
            return self.add("sequence_length", NodeType("i64", ("B",)), inputs=(self.labels(),), hint="T_w")
        if symbol == LENGTH:
            return self.add("length", NodeType("i64", ("B", "T")), inputs=(self.labels(),), hint="T")
        if symbol in (LOG_O_TOKEN, LOG_Q_TOKEN):
            model = "o" if symbol == LOG_O_TOKEN else "q"
            return self.add("token_logp", F32_POSITIONS, inputs=(self.model_logp(model), self.labels()), hint=str(symbol))
        if symbol in (LOG_O_SEQ, LOG_Q_SEQ, LOG_REF_SEQ):
            model = {LOG_O_SEQ: "o", LOG_Q_SEQ: "q", LOG_REF_SEQ: "ref"}[symbol]
            return self.add("sequence_logp", F32_SEQUENCES, inputs=(self.model_logp(model), self.labels()), hint=str(symbol))
        raise InternalError(f"no input for the role symbol {symbol}")

    def weight(self, op: str, scalar: Scalar, per_sequence: bool, fallback: str, attrs=()) -> str:
        roles = sorted((s for s in scalar.expr.free_symbols if s not in SCHEDULE_ROLES), key=str)
        named = tuple((str(symbol), self.role_input(symbol, per_sequence)) for symbol in roles)
        hint = self.definition_name(scalar) or fallback
        node_type = F32_SEQUENCES if per_sequence else F32_POSITIONS
        return self.add(op, node_type, named=named, attrs=(("expr", scalar.expr),) + attrs, hint=hint, span=scalar.span)

    def definition_name(self, scalar: Scalar) -> str | None:
        for name, definition in self.objective.definitions.items():
            if definition.body == scalar.expr:
                return name
        return None

    def term(self, term: Term) -> str:
        loss = self.loss(term.loss)
        named: list[tuple[str, str]] = []
        attrs: list[tuple[str, Any]] = [("name", term.name)]

        if term.token_weight is not None:
            named.append(("weight", self.weight("token_weight", term.token_weight, False, "weight")))
        if term.sequence_weight is not None:
            clip = float(self.objective.settings.get("rho.clip", 0.0) or 0.0)
            clip_attrs = (("clip", clip),) if clip > 0 else ()
            named.append(("seq_weight", self.weight("sequence_weight", term.sequence_weight, True, "rho", clip_attrs)))

        coefficient = term.coefficient.expr
        if coefficient.free_symbols:
            hint = self.definition_name(term.coefficient) or "coef"
            schedule = self.add("schedule", F32_SCALAR, attrs=(("expr", coefficient),), hint=hint, span=term.coefficient.span)
            named.append(("coef", schedule))
        elif coefficient != 1:
            attrs.append(("coef", coefficient))

        op = REDUCTION_OPS[self.objective.reduction]
        return self.add(
            op, F32_SCALAR, inputs=(loss, self.mask()), named=tuple(named), attrs=tuple(attrs),
            hint=f"loss_{self.base_name(loss)}", span=term.span,
        )

    def base_name(self, name: str) -> str:
        """Return a node name without the group suffix that `fresh_name` adds."""
        suffix = f"_g{self.group}"
        return name[: -len(suffix)] if self.group and name.endswith(suffix) else name


# --- Naming and helpers -----------------------------------------------------------------


def _identifier(text: str) -> str:
    """Make a node name from DSL text: Greek letters spelled out, other symbols replaced by `_`."""
    spelled = "".join(_GREEK.get(ch, ch) for ch in text)
    cleaned = re.sub(r"[^0-9A-Za-z_.]+", "_", spelled).strip("_")
    return cleaned or "node"


def _short(expr: sympy.Basic) -> str:
    """Format a coefficient as a name fragment: `0.1` for 1/10, the expression text otherwise."""
    if not expr.free_symbols:
        value = float(expr)
        if value == int(value):
            return str(int(value))
        return format(value, ".6g")
    return _identifier(str(expr))


def _dist_name(dist: Dist) -> str:
    if isinstance(dist, ModelDist):
        name = dist.model
        if dist.temperature is not None and dist.temperature.expr != 1:
            name += f"_tau{_short(dist.temperature.expr)}"
        if dist.top_k is not None:
            name += f"_top{dist.top_k}"
        return name
    if isinstance(dist, ProjectedDist):
        name = f"{dist.source}_to_{dist.target}"
        if dist.temperature is not None and dist.temperature.expr != 1:
            name += f"_tau{_short(dist.temperature.expr)}"
        return name
    if isinstance(dist, MixtureDist):
        # Constant weights are part of the name (mix_0.1o_0.9q); a schedule's weight is only in the node's attrs.
        parts = [(_short(c.expr) if c.is_constant else "") + _dist_name(d) for c, d in dist.components]
        return "mix_" + "_".join(parts)
    raise InternalError(f"unknown distribution {dist!r}")


def _format_source(source: Source) -> str:
    if isinstance(source, (DataSource, TeacherSource, StudentSource)):
        return source.name
    if isinstance(source, MixtureSource):
        text = " + ".join(f"{c.expr}*{_format_source(s)}" for c, s in source.components)
        return text if source.per == "batch" else f"{text} per {source.per}"
    if isinstance(source, AdaptiveSource):
        return f"adaptive({_format_source(source.student)}, {_format_source(source.data)})"
    raise InternalError(f"unknown sampling source {source!r}")


def _model_sides(dist: Dist) -> set[str]:
    """Return the models ('o', 'q') whose own distributions `dist` is built from (projections excluded)."""
    if isinstance(dist, ModelDist):
        return {dist.model}
    if isinstance(dist, MixtureDist):
        return set().union(*(_model_sides(d) for _, d in dist.components))
    return set()


def _projects(dist: Dist) -> bool:
    if isinstance(dist, ProjectedDist):
        return True
    return isinstance(dist, MixtureDist) and any(_projects(d) for _, d in dist.components)


def _vocabularies(dist: Dist) -> set[str]:
    """Return whose vocabulary ('o', 'q') `dist` lives in; a projection lives in its target's."""
    if isinstance(dist, ProjectedDist):
        return {dist.target}
    if isinstance(dist, MixtureDist):
        return set().union(*(_vocabularies(d) for _, d in dist.components))
    return _model_sides(dist)


def _compares_models(objective: Objective) -> bool:
    """Return whether teacher and student meet on one vocabulary, through a divergence over both or a weight.

    Without projections a weight reading o(w_t) or o(w) scores the student's
    tokens with the teacher. With projections each term has its own side: such
    a weight compares the models only on a term over the student's vocabulary
    (CE, q, o→q), and q(w_t) only on a term over the teacher's (o, q→o).
    """
    projected = any(_projects(arg) for term in objective.terms for arg in term.loss.args)
    for term in objective.terms:
        if term.loss.kind != "ULD":
            sides = set().union(*(_model_sides(arg) for arg in term.loss.args))
            if sides == {"o", "q"}:
                return True
        # CE scores the student's labels. Without projections, every term scores the student's labels.
        space = set().union(*(_vocabularies(arg) for arg in term.loss.args)) or {"q"} if projected else {"q"}
        for weight in (term.token_weight, term.sequence_weight):
            if weight is None:
                continue
            symbols = weight.expr.free_symbols
            if symbols & {LOG_O_TOKEN, LOG_O_SEQ} and "q" in space:
                return True
            if symbols & {LOG_Q_TOKEN, LOG_Q_SEQ} and "o" in space:
                return True
    return False


def _generator_limits(generator: sympy.Lambda) -> tuple[tuple[str, float], ...]:
    """Return f(0+) and lim f(t)/t at infinity as attrs, for the boundary entries of an f-divergence."""
    (variable,) = generator.variables
    positive = sympy.Symbol("x_f", positive=True)
    body = generator.expr.subs(variable, positive)
    limits = []
    for key, expr, point in (("f_zero", body, 0), ("f_inf_slope", body / positive, sympy.oo)):
        try:
            value = sympy.limit(expr, positive, point, "+" if point == 0 else "-")
        except (NotImplementedError, ValueError, TypeError):
            continue  # without the attr, numerics.f_divergence evaluates f(0) itself or reports the missing limit
        if value.is_finite or value in (sympy.oo, -sympy.oo):
            limits.append((key, float(value)))
    return tuple(limits)
