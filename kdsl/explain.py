"""`kdsl explain`: what a spec will cost per optimizer step, before any model is loaded.

The memory figures are estimates from tensor counts, not measurements: the
loss benchmark (benchmarks/loss_bench.py) measures the real peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdsl import objective as obj
from kdsl.check import describe_dist, describe_source

FLOAT32 = 4


@dataclass
class GroupCost:
    """Work and loss memory of one sampling group per micro-batch."""

    source: str
    samplers: list[str]
    student_generations: float  # expected generated sequences per micro-batch
    teacher_generations: float
    teacher_forward: bool
    reference_forward: bool
    projection: bool
    distributions: list[str]
    dense_bytes: int
    fused_bytes: int
    projection_bytes: int = 0


def _sampler_probabilities(source, weight: float = 1.0) -> dict[str, float]:
    if isinstance(source, obj.DataSource):
        return {"dataset": weight}
    if isinstance(source, obj.StudentSource):
        return {"student generation": weight}
    if isinstance(source, obj.TeacherSource):
        return {"teacher generation": weight}
    if isinstance(source, obj.AdaptiveSource):
        # The share of student generation moves between init_prob and max_prob during training; count the maximum.
        params = dict(source.params)
        high = float(params.get("max_prob", 0.5))
        result = {}
        for name, p in _sampler_probabilities(source.student, weight * high).items():
            result[name + " (adaptive, at most this share, with replay)"] = p
        for name, p in _sampler_probabilities(source.data, weight * (1 - high)).items():
            result[name + " (adaptive, at least this share)"] = result.get(name, 0.0) + p
        return result
    result: dict[str, float] = {}
    for coefficient, inner in source.components:
        share = coefficient.evaluate() if coefficient.is_constant else 0.5  # a schedule: its mean is not known here
        for name, p in _sampler_probabilities(inner, weight * share).items():
            result[name] = result.get(name, 0.0) + p
    return result


def _distributions(terms: list[obj.Term]) -> list:
    seen: list = []
    for term in terms:
        if term.loss.kind == "CE" and obj.ModelDist("q") not in seen:
            seen.append(obj.ModelDist("q"))
        for _, atom in term.loss.desugar():
            for dist in atom.args:
                stack = [dist]
                while stack:
                    current = stack.pop()
                    if current not in seen:
                        seen.append(current)
                    if isinstance(current, obj.MixtureDist):
                        stack.extend(d for _, d in current.components)
    return seen


def group_cost(objective: obj.Objective, group: int, *, batch: int, length: int, student_vocab: int,
               teacher_vocab: int, hidden: int | None, chunk: int) -> GroupCost:
    terms = objective.terms_of_group(group)
    source = objective.groups[group]
    probabilities = _sampler_probabilities(source)
    dists = _distributions(terms)
    uses_teacher = any(
        (isinstance(d, obj.ModelDist) and d.model == "o") or isinstance(d, obj.ProjectedDist) for d in dists
    ) or any(t.token_weight is not None and obj.LOG_O_TOKEN in t.token_weight.roles for t in terms)
    uses_reference = any(t.sequence_weight is not None and obj.LOG_REF_SEQ in t.sequence_weight.roles for t in terms)
    tokens = batch * length
    # Per distribution: its log-probabilities; per divergence atom: one product/ratio temporary; plus one gradient.
    atoms = sum(len(t.loss.desugar()) for t in terms if t.loss.kind != "CE")
    vocab = max(student_vocab, teacher_vocab)
    live_per_token = (len(dists) + atoms) * vocab * FLOAT32
    rows = min(chunk, tokens)
    if hidden:
        # Dense materialises the logits and their gradient; fused keeps one chunk of them and the hidden states' gradient.
        dense = tokens * (live_per_token + 2 * student_vocab * FLOAT32)
        fused = rows * (live_per_token + 2 * student_vocab * FLOAT32) + tokens * hidden * FLOAT32
    else:
        # From logits, both hold the logits' gradient, one full (tokens × Vs) tensor.
        dense = tokens * (live_per_token + student_vocab * FLOAT32)
        fused = rows * live_per_token + tokens * student_vocab * FLOAT32
    projection = any(isinstance(d, obj.ProjectedDist) for d in dists)
    projection_bytes = 0
    if projection:
        # Cross-model attention keeps scores and weights in both directions (4·B·S·T, with S = T = length) and
        # the projected logits o→q and q→o with their gradients. The projected path is not chunked either.
        projection_bytes = FLOAT32 * (4 * batch * length * length + 2 * tokens * (student_vocab + teacher_vocab))
        fused = dense + projection_bytes
        dense = dense + projection_bytes
    return GroupCost(
        source=describe_source(source),
        samplers=[f"{name}: {p:.2g} of the batch" for name, p in probabilities.items()],
        student_generations=sum(p for name, p in probabilities.items() if name.startswith("student")) * batch,
        teacher_generations=sum(p for name, p in probabilities.items() if name.startswith("teacher")) * batch,
        teacher_forward=uses_teacher,
        reference_forward=uses_reference,
        projection=projection,
        projection_bytes=projection_bytes,
        distributions=[describe_dist(d) for d in dists],
        dense_bytes=dense,
        fused_bytes=fused,
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def spec_shapes(objective: obj.Objective) -> dict[str, int]:
    """Return the shapes a run of the spec would have: batch, length and the vocabularies of local models.

    Batch and length come from train.batch_size and the data.* token limits.
    Vocabulary sizes come from the config.json of a builtin or local model;
    a model that only a hub has keeps explain's default.
    """
    from kdsl import models

    settings = objective.settings
    shapes = {"batch": int(settings.get("train.batch_size", 8)),
              "length": int(settings.get("data.max_prompt_tokens", 64)) + int(settings.get("data.max_response_tokens", 64))}
    trust = bool(settings.get("trust_remote_code", False))
    for role, key in (("student", "student_vocab"), ("teacher", "teacher_vocab")):
        name = settings.get(role)
        config = models.local_config(name, trust_remote_code=trust) if name else None
        vocab = getattr(config, "vocab_size", None)
        if isinstance(vocab, int) and vocab > 0:
            shapes[key] = vocab
    return shapes


def explain(objective: obj.Objective, *, batch: int = 8, length: int = 256, student_vocab: int = 32000,
            teacher_vocab: int | None = None, hidden: int | None = None) -> str:
    """Describe the forward passes, generations, samplers and estimated loss memory per micro-batch."""
    teacher_vocab = teacher_vocab or student_vocab
    chunk = int(objective.settings.get("train.chunk_size", 1024))
    lines = [f"spec: {objective.path}",
             f"shapes: B={batch} T={length} Vs={student_vocab} Vt={teacher_vocab}" + (f" H={hidden}" if hidden else "")
             + f", chunk={chunk} tokens, reduction={objective.reduction}"]
    total_dense = total_fused = 0
    for group in range(len(objective.groups)):
        cost = group_cost(objective, group, batch=batch, length=length, student_vocab=student_vocab,
                          teacher_vocab=teacher_vocab, hidden=hidden, chunk=chunk)
        total_dense = max(total_dense, cost.dense_bytes)
        total_fused = max(total_fused, cost.fused_bytes)
        names = ", ".join(t.name for t in objective.terms_of_group(group))
        lines.append(f"group {group}: E[w ~ {cost.source}]  terms: {names}")
        for sampler in cost.samplers:
            lines.append(f"  sampler  {sampler}")
        passes = ["student forward + backward"]
        if cost.teacher_forward:
            passes.append("teacher forward (no gradient)")
        if cost.reference_forward:
            passes.append("reference forward (no gradient)")
        if cost.projection:
            passes.append("projection (cross-model attention, computed once and shared)")
        lines.append("  passes   " + "; ".join(passes))
        lines.append(f"  generate {cost.student_generations:.3g} student and {cost.teacher_generations:.3g} teacher sequences "
                     "per micro-batch (expected)")
        lines.append(f"  dists    {', '.join(cost.distributions) or '(none: CE only)'}")
        if cost.projection:
            lines.append(f"  projection memory (estimate): {_size(cost.projection_bytes)} for the attention in both "
                         "directions and the o→q, q→o logits; this group's loss is evaluated unchunked")
        lines.append(f"  loss memory (estimate): dense {_size(cost.dense_bytes)}, fused {_size(cost.fused_bytes)}")
    lines.append(f"peak loss memory over groups (estimate): dense {_size(total_dense)}, fused {_size(total_fused)}")
    return "\n".join(lines)
