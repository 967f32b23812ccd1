"""``python -m mmreg.bench``: the benchmark harness (the same as ``mmreg bench``)."""
import sys

from .harness import main

sys.exit(main())
