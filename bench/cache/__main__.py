"""``python -m bench.cache``: see run.py."""
import sys

from .run import main

sys.exit(main())
