"""Where the peers' reference vectors are: the vectors computed with TRL, DistiLLM, DSKD and Liger code.

`KDSL_PEER_VECTORS` names the folder. Without it, the tests look for
`shared/reference/vectors` next to the repository, then under /work. Tests
that need the vectors skip, naming the folder they looked in, when none has
them.
"""

from __future__ import annotations

import os
from pathlib import Path

_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "shared" / "reference" / "vectors",
    Path("/work/shared/reference/vectors"),
)


def vectors_dir() -> Path:
    """Return the folder of the reference vectors (which may not exist)."""
    configured = os.environ.get("KDSL_PEER_VECTORS")
    if configured:
        return Path(configured)
    for candidate in _CANDIDATES:
        if candidate.is_dir():
            return candidate
    return _CANDIDATES[0]
