"""The feed rate: how many frames a second the daemon takes in, checks, hashes and stages when the
model costs nothing, at real frame sizes (``python -m bench.feed``). docs/benchmarks.md, "Feed rate".

    model.py     the uint8 no-op TorchScript model, saved at run time
    clients.py   the client processes: 16 frames in flight each, unique or 30 % repeats
    baseline.py  the bare baseline: a ring write of the frame plus a Unix-socket ping-pong
    report.py    the printed tables and the targets
    run.py       the cases, their order, the command line, results.json
"""
