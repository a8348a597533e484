"""``python -m bench.models``: see run.py."""
import sys

from .run import main

sys.exit(main())
