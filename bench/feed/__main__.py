"""``python -m bench.feed``: see run.py."""
import sys

from .run import main

sys.exit(main())
