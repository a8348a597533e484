"""What applications see: one AsyncClient against sync processes, JPEG uploads, repeated uploads
(``python -m bench.apps``, ``python -m bench.apps.encoded --large``). docs/benchmarks.md, "Applications"."""
