"""``python -m bench.load``: see run.py."""
import sys

from .run import main

sys.exit(main())
