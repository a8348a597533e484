"""The mapped result cache lists nothing: another uid that maps the descriptor it gets at hello and
scans every entry recovers no class, score, count or insert order, while the victim's repeats are
still answered from its own mapping with no round trip, and a client holding the same frame reads
the same answer (shm/cache.py, "What a reader of the mapping learns").

Acts as a second uid (65534), so it needs root, as tests/test_privacy.py does.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from PIL import Image

from helpers import sample_images, short_dir, wait_until
from inferd.client import Client, decode
from inferd.shm.cache import cache_key, content_hash, encoded_key

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
NOBODY = 65534

# The attacker: uid 65534, connects with the client library's own connection code (as the red team
# did) to get the cache descriptor mapped, snapshots the mapping, and scans every entry every way it
# knows: the first format's fields (k, generation, stamp, pairs at their old offsets), today's
# layout read as if the body were plain, and layout-free searches for anything that looks like an
# answer or a counter. It holds one frame of the victim's (argv[3]) and reads that answer.
ATTACKER = r'''
import json, os, struct, sys
import numpy as np
from inferd.client.connection import Connection
from inferd.shm.cache import cache_key, content_hash
socket_path, out_dir, held_npy = sys.argv[1], sys.argv[2], sys.argv[3]
held = np.load(held_npy)
os.setgroups([]); os.setgid(65534); os.setuid(65534)
conn = Connection.open(socket_path, ring_slots=2, use_cache=True, connect_timeout=10, hello_timeout=30)
snapshot = bytes(conn.cache._mm)                        # every byte a reader can see
with open(os.path.join(out_dir, "snapshot"), "wb") as fh:
    fh.write(snapshot)
magic, version, sets, ways, entry, max_k = struct.unpack_from("<8sIIIII", snapshot)
generation = struct.unpack_from("<Q", snapshot, 64)[0]
classes = conn.model.classes or len(conn.model.labels)
n = sets * ways
table = np.frombuffer(snapshot, np.uint8, n * entry, 4096).reshape(n, entry)
u32 = lambda col: table[:, col:col + 4].copy().view("<u4").reshape(-1)
u64 = lambda col: table[:, col:col + 8].copy().view("<u8").reshape(-1)
out = {"version": version, "entries": n, "classes": classes}
# the first format: k at 24, generation at 32, stamp at 8, pairs from 72
k1 = u32(24)
out["v1_entries"] = int(np.count_nonzero((k1 > 0) & (k1 <= max_k) & (u64(32) == generation)))
# today's layout as if unmasked: k at 40
k2 = u32(40)
out["v2_plain_entries"] = int(np.count_nonzero((k2 > 0) & (k2 <= max_k)))
# anywhere: a (class, score) pair of this model, or a small counter (a stamp, a count)
body = table.reshape(-1)
pairs = 0
for start in range(0, 8):
    cells = body[start:start + (body.size - start) // 8 * 8].view("<u4").reshape(-1, 2)
    scores = cells[:, 1].copy().view("<f4")
    pairs += int(np.count_nonzero((cells[:, 0] < classes) & (scores > 0) & (scores <= 1)))
out["plausible_pairs"] = pairs
words = table.copy().view("<u8")                         # every 8-aligned word of every entry
out["small_counters"] = int(np.count_nonzero(words < 2**32))
seq = u64(0)
out["odd_seqs"] = int(np.count_nonzero(seq & 1))
out["empty_looking"] = int(np.count_nonzero(~table[:, 8:].any(axis=1)))
# the one frame it holds: its answer, read from the mapping with no request
key = cache_key(conn.model.digest, conn.preprocess_id, content_hash(held))
out["held"] = conn.cache.lookup(key)
conn.close()
print(json.dumps(out))
'''


@needs_root
@pytest.mark.timeout(180)
def test_another_uid_scanning_the_mapped_cache_learns_no_answer_count_or_order(fresh_daemon):
    workdir = short_dir()
    os.chmod(workdir, 0o755)                              # the socket reachable; the files stay 0600
    d = fresh_daemon("--set", "server.socket_mode=0o666", "--set", f"server.allow_uids=[{NOBODY}]",
                     "--set", "cache.size_mb=1", "--set", "embeddings.enabled=false", workdir=workdir)
    out_dir = tempfile.mkdtemp(prefix="inferd-scan")
    os.chown(out_dir, NOBODY, NOBODY)
    try:
        samples = sample_images()
        images = [img for _, img in samples]
        with Client(d.socket_path) as victim:
            computed = [victim.classify(img, top_k=3) for img in images]     # the daemon computes
            assert victim.cache_hits == 0
            png = io.BytesIO()                            # and an upload: an entry under its bytes' hash
            Image.fromarray(np.ascontiguousarray(images[2][::-1])).save(png, "PNG")
            upload = png.getvalue()
            uploaded = victim.classify(upload, top_k=3)
            wait_until(lambda: victim.info()["cache"]["uploads_inserted"] == 1, what="the upload's entry")
            held = os.path.join(out_dir, "held.npy")
            np.save(held, images[0])
            os.chmod(held, 0o644)
            attacker = subprocess.Popen([sys.executable, "-c", ATTACKER, d.socket_path, out_dir, held],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # meanwhile, the victim's repeats: answered from its mapping, exactly as computed
            before = victim.info()["counters"]
            for _ in range(3):
                assert [victim.classify(img, top_k=3) for img in images] == computed
                assert victim.classify(upload, top_k=3) == uploaded
            after = victim.info()["counters"]
            assert victim.cache_hits == 3 * (len(images) + 1)
            assert after["frames"] == before["frames"]                    # nothing reached a device
            assert after.get("daemon_hits", 0) == before.get("daemon_hits", 0)   # nor the daemon
            stdout, stderr = attacker.communicate(timeout=120)
            assert attacker.returncode == 0, stderr
            digest, preprocess = victim.model.digest, victim.preprocess_id
            h, w, _ = victim.model.input_shape
        scan = json.loads(stdout.strip().splitlines()[-1])
        print(json.dumps({k: v for k, v in scan.items() if k != "held"}))
        # the scan recovers no answer, no count and no order ...
        assert scan["version"] == 2 and scan["entries"] > 1000
        assert scan["v1_entries"] == 0 and scan["v2_plain_entries"] == 0, scan
        assert scan["plausible_pairs"] == 0, scan
        assert scan["small_counters"] == 0, scan                         # no stamps, no counts
        assert scan["odd_seqs"] == 0 and scan["empty_looking"] == 0, scan   # full and empty alike
        with open(os.path.join(out_dir, "snapshot"), "rb") as fh:
            snapshot = fh.read()
        keys = [cache_key(digest, preprocess, content_hash(img)) for img in images]
        keys.append(encoded_key(digest, preprocess, decode.decoder_id(h, w), decode.encoded_hash(upload)))
        assert not [key for key in keys if key in snapshot]
        for top in [*computed, uploaded]:
            for p in top:
                assert struct.pack("<If", p.index, p.score) not in snapshot, p
        # ... yet whoever holds a frame reads its answer, the victim's to the last bit
        assert [tuple(p) for p in scan["held"][:3]] == [(p.index, p.score) for p in computed[0]]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    assert d.stop() == 0
