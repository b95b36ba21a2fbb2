"""kdsl: a declarative loss algebra and compiler for knowledge distillation of language models.

    import kdsl
    objective = kdsl.compile("objective = JS[0.5](o ‖ q)")
    result = objective(student_logits=s, teacher_logits=t, labels=y)
    result.loss.backward()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdsl.errors import ConfigError, Diagnostic, InternalError, KdslError, SpecError, Span

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "Diagnostic", "InternalError", "KdslError", "SpecError", "Span",
    "compile", "load", "__version__",
]


def _read(text_or_path: str | Path) -> tuple[str, str]:
    """Return (text, path label) for a spec given as text or as a path to a .kd file."""
    if isinstance(text_or_path, Path) or (
        isinstance(text_or_path, str) and "\n" not in text_or_path and text_or_path.endswith(".kd")
    ):
        path = Path(text_or_path)
        if not path.is_file():
            raise ConfigError(f"spec file not found: {str(text_or_path)!r}; pass the path of an existing .kd file or the spec text")
        from kdsl.parse import decode

        return decode(path.read_bytes(), str(text_or_path)), str(text_or_path)
    text = text_or_path
    if "objective" not in text and "=" not in text:
        # A bare objective expression such as "KL(o ‖ q)".
        text = f"objective = {text}"
    return text, "<string>"


def load(text_or_path: str | Path, overrides: dict[str, Any] | None = None, *, same_vocab: bool | None = None):
    """Parse and validate a spec; return the typed `kdsl.objective.Objective`."""
    from kdsl.check import check
    from kdsl.parse import parse

    text, label = _read(text_or_path)
    return check(parse(text, label), overrides, same_vocab=same_vocab)


def compile(text_or_path: str | Path, *, same_vocab: bool | None = None, fused: bool = True,
            hidden_sizes: tuple[int, int] | None = None, projector: Any = None, **settings: Any):
    """Compile a spec (text, a path, or a bare objective expression) into a `torch.nn.Module`.

    Keyword arguments set spec settings by their dotted names with '.' written
    as '__' (`train__chunk_size=512`) or pass them in `settings={"train.chunk_size": 512}`.
    An objective with o→q or q→o needs `hidden_sizes=(student, teacher)` to build its
    projector, or a ready `projector` (`kdsl.projection.DualSpaceProjector`).
    """
    from kdsl.ir import build
    from kdsl.lower import lower

    overrides = dict(settings.pop("settings", {}) or {})
    overrides.update({key.replace("__", "."): value for key, value in settings.items()})
    objective = load(text_or_path, overrides, same_vocab=same_vocab)
    return lower(build(objective), objective, fused=fused, hidden_sizes=hidden_sizes, projector=projector)
