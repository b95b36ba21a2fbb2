"""Allow `python -m kdsl ...` (used by `accelerate launch -m kdsl run SPEC`)."""

import sys

from kdsl.cli import main

sys.exit(main())
