"""``python -m libortho.kernel_bench``: the same as ``libortho bench``."""
import sys

from . import main

sys.exit(main())
