"""``python -m bench.fleet``: see run.py."""
import sys

from .run import main

sys.exit(main())
