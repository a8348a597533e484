"""``python -m bench.ann``: see run.py (the library comparison: ``python -m bench.ann.libs``)."""
import sys

from .run import main

sys.exit(main())
