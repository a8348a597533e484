"""``python -m bench.oip``: see run.py."""
import sys

from .run import main

sys.exit(main())
