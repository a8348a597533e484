"""``python -m bench.isolation``: see run.py."""
import sys

from .run import main

sys.exit(main())
