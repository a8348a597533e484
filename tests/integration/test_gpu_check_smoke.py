"""The prepared GPU check (bench/gpu.sh, bench/gpu.py) runs to the end on the CPU at toy sizes
(``--cpu-smoke``): every part (the in-process ceiling, the daemon rows with the result cache on and
off, bench.feed's rows on one and two devices) and a complete gpu-smoke.json, so the script is
known to work before a GPU's time is spent on it. Its figures are not judged."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from helpers import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_the_gpu_check_runs_every_part_to_the_end_on_the_cpu():
    out = tempfile.mkdtemp(prefix="inferd-gpu-smoke-")
    try:
        env = {**os.environ, "PYTHON": sys.executable, "BENCH_TIMEOUT": "360"}
        done = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--cpu-smoke", "--out", out], env=env,
                              capture_output=True, text=True, timeout=390)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        with open(os.path.join(out, "gpu-smoke.json")) as fh:
            r = json.load(fh)
        assert r["unfinished"] is None and r["mode"] == "smoke"
        s = r["settings"]
        assert len(r["ceiling"]["rows"]) == len(s["precisions"]) * len(s["batches"])
        head = r["daemon"][0]
        assert (head["precision"], head["cache"]) == ("bf16", True)          # the headline first
        rows = [row for d in r["daemon"] for row in d["rows"]]
        assert len(rows) == sum(len(clients) for _, _, clients in s["daemons"])
        assert all(row["img_s"] > 0 and row["ratio_best"] > 0 for row in rows)
        assert all(d["exit_code"] == 0 and not d["log_problems"] for d in r["daemon"])
        feed = r["feed"]["rows"]
        assert {(f["size"], f["cache"], f["devices"], f["frames"]) for f in feed} == \
            {(16, False, 1, "unique"), (16, False, 1, "30% rep"), (32, True, 2, "unique"), (32, True, 2, "30% rep")}
        assert all(f["frames_s"] > 0 and f["x_bare"] > 0 for f in feed)
        assert "target: bf16, cache on" in done.stdout
    finally:
        shutil.rmtree(out, ignore_errors=True)
