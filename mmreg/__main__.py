"""``python -m mmreg ...``: the ``mmreg`` command (also what ``torchrun -m mmreg train`` starts)."""
import sys

from .cli import main

sys.exit(main())
