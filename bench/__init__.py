"""inferd's benchmarks: one package per benchmark family, run from the repository root as
``python -m bench.<family>`` (docs/benchmarks.md lists every command).

    lib/        the plumbing every family shares: child processes and clients started against one
                start time (procs), daemons in throw-away work directories (daemons), statistics,
                clocks and CPU time (measure), command lines and results files (report), figures (plots)
    load/       the request path: the daemon against the model in-process (at its fastest OpenMP
                setting), transport, CPU per frame, what statistics cost (``python -m bench.load``,
                ``python -m bench.load.metrics_cost``)
    pool/       a pool of devices of known, different speeds (``python -m bench.pool``)
    cache/      the result cache and the embedding store (``python -m bench.cache``, ``.cost``, ``.near``)
    apps/       what applications see: asyncio clients, encoded uploads (``python -m bench.apps``)
    isolation/  what one client can do to another (``python -m bench.isolation``, as root)
    fleet/      hosts sharing a result cache on Redis (``python -m bench.fleet``)
    feed/       frames a second into the daemon with a no-op model at real frame sizes: the frame
                path's own cost, against a bare ring write + socket ping-pong (``python -m bench.feed``)
    gpu.py      the prepared GPU check, run by ``bench/gpu.sh`` (``--cpu-smoke`` on a CPU)

Every figure is a ratio against a baseline measured in the same run; nothing here is a test.
"""
