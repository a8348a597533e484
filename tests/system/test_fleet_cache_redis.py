"""The fleet cache (daemon/caching/fleet/cache.py): real daemons sharing a real redis-server (tests/redis_server.py).

Covered: two daemons with their own local caches answer from L2 exactly what the other computed;
entries written with another fleet key, or by a writer without any key, are ignored and counted;
redis-server SIGKILLed under load fails no request, opens the breaker, and a restarted one closes it;
a model reload never hits an old model's entries; a bad key file stops start-up naming the key.
Budgets here are generous (a loaded 2-core machine must not turn a hit into a timeout); how fast
a hit is belongs to bench/fleet/run.py.
"""
from __future__ import annotations

import os
import secrets
import struct
import threading

import numpy as np
import pytest

from helpers import Clock, admin_path, sample_images, short_dir, spawn_daemon, wait_until
from inferd.client import AdminClient, Client
from inferd.daemon.config import ConfigError, from_dict
from inferd.daemon.caching.fleet.breaker import Breaker
from inferd.daemon.caching.fleet.codec import MAC_BYTES, decode, encode, load_fleet_key
from redis_server import redis_cluster, redis_sentinel, redis_server  # noqa: F401  (fixtures)

PREFIX = "inferd-test:"


def key_file(directory: str, data: bytes | None = None, mode: int = 0o600) -> str:
    path = os.path.join(directory, f"fleet-{secrets.token_hex(3)}.key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32) if data is None else data)
    os.chmod(path, mode)
    return path


def l2_args(server, key: str, *more: str, budget_ms: float = 1000.0) -> list[str]:
    return ["--set", "l2.enabled=true", "--set", f'l2.url="{server.url}"', "--set", f'l2.key_file="{key}"',
            "--set", f'l2.prefix="{PREFIX}"', "--set", f"l2.budget_ms={budget_ms}", *more]


def l2_stats(daemon) -> dict:
    with AdminClient(admin_path(daemon)) as admin:
        return admin.call("stats")["cache"]["l2"]


def frames_computed(daemon) -> int:
    with AdminClient(admin_path(daemon)) as admin:
        return sum(d["frames"] for d in admin.call("stats")["devices"])


def images(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [img for _, img in sample_images()] + [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                                                  for _ in range(n)]


def answers(client, imgs) -> list:
    return [[(p.index, p.score) for p in client.classify(img, top_k=3)] for img in imgs]


# units ------------------------------------------------------------------------------------------
def test_entries_pass_only_with_the_fleet_key_their_key_and_their_bytes():
    k1, k2 = os.urandom(32), os.urandom(32)
    key, other = os.urandom(32), os.urandom(32)
    top = [(3, 0.75), (1, 0.125), (0, 0.0625)]
    value = encode(k1, key, top)
    assert decode(k1, key, value, classes=4) == top
    assert decode(k2, key, value, classes=4) is None                  # another fleet's key
    assert decode(k1, other, value, classes=4) is None                # copied under another key
    flipped = bytearray(value)
    flipped[2] ^= 1                                                   # class 3 -> 2
    assert decode(k1, key, bytes(flipped), classes=4) is None
    assert decode(k1, key, value[:-1], classes=4) is None             # truncated
    assert decode(k1, key, b"\x01\x01" + struct.pack("<If", 3, 1.0) + bytes(MAC_BYTES), 4) is None
    assert decode(k1, key, value, classes=3) is None                  # a class this model lacks


def test_breaker_opens_after_failures_in_a_row_probes_once_and_closes():
    clock = Clock()
    moves = []
    b = Breaker(3, 5.0, clock, lambda old, new: moves.append(new))
    b.failure(), b.failure(), b.success(), b.failure(), b.failure()
    assert b.state == "closed"                        # a success in between resets the count
    b.failure()
    assert b.state == "open" and not b.allow() and not b.writing
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.2
    assert b.allow() and b.state == "half_open"       # the probe
    assert not b.allow()                              # only one
    b.failure()
    assert b.state == "open" and b.opened == 2
    clock.now += 5.0
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.writing
    assert moves == ["open", "half_open", "open", "half_open", "closed"]


def test_the_key_file_must_exist_be_private_and_long_enough():
    d = short_dir()
    base = {"enabled": True, "url": "unix:///tmp/x.sock"}
    with pytest.raises(ConfigError, match="l2.key_file: required"):
        from_dict({"l2": base})
    with pytest.raises(ConfigError, match="l2.key_file: .* No such file"):
        from_dict({"l2": {**base, "key_file": os.path.join(d, "missing")}})
    with pytest.raises(ConfigError, match="l2.key_file: .* mode 644"):
        from_dict({"l2": {**base, "key_file": key_file(d, mode=0o644)}})
    with pytest.raises(ConfigError, match="l2.key_file: .* holds 8 bytes"):
        from_dict({"l2": {**base, "key_file": key_file(d, b"12345678")}})
    good = key_file(d)
    assert len(load_fleet_key(good)) == 32
    with pytest.raises(ConfigError, match="exactly one Redis topology"):
        from_dict({"l2": {"enabled": True, "key_file": good}})
    with pytest.raises(ConfigError, match="needs cache.enabled"):
        from_dict({"l2": {**base, "key_file": good}, "cache": {"enabled": False}})
    assert from_dict({"l2": {**base, "key_file": good, "sentinels": [], "budget_ms": 3}}).l2.budget_ms == 3.0


@pytest.mark.timeout(60)
def test_a_daemon_with_a_readable_key_file_refuses_to_start():
    workdir = short_dir()
    d = spawn_daemon("--set", "l2.enabled=true", "--set", 'l2.url="unix:///nonexistent.sock"',
                     "--set", f'l2.key_file="{key_file(workdir, mode=0o640)}"', wait=False, workdir=workdir)
    try:
        assert d.proc.wait(60) == 78
        assert "l2.key_file" in d.log() and "chmod 600" in d.log()
    finally:
        d.cleanup()


# real daemons -----------------------------------------------------------------------------------
@pytest.mark.timeout(240)
def test_a_second_daemon_answers_from_l2_exactly_what_the_first_computed(redis_server):
    key = key_file(short_dir())
    imgs = images(12, seed=1)
    a = spawn_daemon(*l2_args(redis_server, key))
    b = spawn_daemon(*l2_args(redis_server, key))
    try:
        with Client(a.socket_path, cache=False) as ca:
            computed = answers(ca, imgs)
        wait_until(lambda: l2_stats(a)["writes"] >= len(imgs), 30, "a's answers written to Redis")
        with Client(b.socket_path, cache=False) as cb:
            from_l2 = answers(cb, imgs)
        assert from_l2 == computed                        # exactly, scores included
        stats = l2_stats(b)
        assert stats["hits"] == len(imgs) and stats["forged"] == 0, stats
        assert frames_computed(b) == 0                    # b's devices computed nothing
        with Client(b.socket_path) as cb:                 # kept locally: the client answers itself
            assert answers(cb, imgs) == computed and cb.cache_hits == len(imgs)
    finally:
        for d in (a, b):
            assert d.stop() == 0, d.log()
            d.cleanup()


@pytest.mark.timeout(240)
def test_forged_entries_are_ignored_counted_and_never_served(redis_server):
    workdir = short_dir()
    imgs = images(6, seed=2)
    a = spawn_daemon(*l2_args(redis_server, key_file(workdir)))
    b = spawn_daemon(*l2_args(redis_server, key_file(workdir)))     # another fleet key
    try:
        with Client(a.socket_path, cache=False) as ca:
            truth = answers(ca, imgs)
        wait_until(lambda: l2_stats(a)["writes"] >= len(imgs), 30, "a's answers written to Redis")
        with Client(b.socket_path, cache=False) as cb:
            assert answers(cb, imgs) == truth             # computed by b: a's entries do not pass
        stats = l2_stats(b)
        assert stats["hits"] == 0 and 1 <= stats["forged"] <= len(imgs), stats
        # every lookup found a forgery, but for one that came back past its budget on a loaded machine
        assert stats["forged"] == len(imgs) or stats["late"] + stats["timeouts"] > 0, stats
        assert frames_computed(b) == len(imgs)

        # a writer without any key: every entry rewritten to claim another class, with a made-up MAC
        r = redis_server.client()
        keys = list(r.scan_iter(match=f"{PREFIX}*".encode()))
        assert len(keys) >= len(imgs)
        for k in keys:
            value = r.get(k)
            k_pairs = value[1]
            index, score = struct.unpack_from("<If", value, 2)
            lie = struct.pack("<BB", 1, k_pairs) + struct.pack("<If", (index + 1) % 4, 0.99) + value[10:-MAC_BYTES]
            r.set(k, lie + os.urandom(MAC_BYTES))
        with AdminClient(admin_path(a)) as admin:
            admin.call("flush_cache")                         # a must ask L2 again
        before = l2_stats(a)["forged"]
        with Client(a.socket_path, cache=False) as ca:
            assert answers(ca, imgs) == truth
        assert l2_stats(a)["forged"] - before == len(imgs)
        assert "failed its MAC check" in b.log()          # logged (rate-limited: one line per 10 s)
    finally:
        for d in (a, b):
            assert d.stop() == 0, d.log()
            d.cleanup()


@pytest.mark.timeout(300)
def test_redis_killed_under_load_fails_no_request_and_the_breaker_comes_back(redis_server):
    key = key_file(short_dir())
    d = spawn_daemon(*l2_args(redis_server, key, "--set", "l2.breaker_failures=2",
                              "--set", "l2.breaker_cooldown_s=0.3", budget_ms=200.0))
    pool = images(40, seed=3)
    rng = np.random.default_rng(3)
    failures, served = [], [0]
    stop = threading.Event()

    def load():
        with Client(d.socket_path, cache=False) as c:
            while not stop.is_set():
                img = pool[int(rng.integers(len(pool)))] if rng.random() < 0.5 else \
                    rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
                try:
                    c.classify(img, top_k=1)
                    served[0] += 1
                except Exception as exc:  # every failure is the test's finding
                    failures.append(repr(exc))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_until(lambda: l2_stats(d)["writes"] >= 10, 60, "writes before the kill")
        redis_server.kill()
        at_kill = served[0]
        wait_until(lambda: l2_stats(d)["breaker_opened"] >= 1, 60, "the breaker opening")
        wait_until(lambda: served[0] >= at_kill + 30, 60, "requests served with Redis gone")
        stats = l2_stats(d)
        assert stats["errors"] + stats["timeouts"] >= 1, stats          # the kill landed
        redis_server.start()
        wait_until(lambda: l2_stats(d)["state"] == "closed", 60, "the breaker closing")
        writes = l2_stats(d)["writes"]
        wait_until(lambda: l2_stats(d)["writes"] >= writes + 10, 60, "writes to the restarted Redis")
        hits = l2_stats(d)["hits"]
        with AdminClient(admin_path(d)) as admin:
            admin.call("flush_cache")                     # repeats must ask L2 again
        wait_until(lambda: l2_stats(d)["hits"] > hits, 60, "hits from the restarted Redis")
    finally:
        stop.set()
        thread.join(60)
        rc = d.stop()
        d.cleanup()
    assert failures == [], failures[:5]
    assert rc == 0


@pytest.mark.timeout(300)
def test_after_a_model_reload_no_entry_of_the_old_model_is_hit(redis_server):
    key = key_file(short_dir())
    imgs = images(4, seed=4)
    a = spawn_daemon(*l2_args(redis_server, key))
    b = spawn_daemon(*l2_args(redis_server, key))
    try:
        with Client(a.socket_path, cache=False) as ca:
            answers(ca, imgs)
        wait_until(lambda: l2_stats(a)["writes"] >= len(imgs), 30, "shapes answers written")
        with AdminClient(admin_path(b)) as admin:
            assert admin.call("reload", model="resnet18")["model"]["name"] == "resnet18"
        with Client(b.socket_path, cache=False) as cb:
            answers(cb, imgs)
            stats = l2_stats(b)
            assert stats["hits"] == 0 and stats["misses"] == len(imgs), stats
            assert frames_computed(b) == len(imgs)
            assert all(cb.classify(img, top_k=1)[0].label.startswith("class_") for img in imgs)
    finally:
        for d in (a, b):
            assert d.stop() == 0, d.log()
            d.cleanup()


def test_each_topology_gets_its_client_with_tls_and_auth_passed_through():
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from inferd.daemon.caching.fleet.connection import make_client

    d = short_dir()
    password = key_file(d, b"s3cret\n")
    base = {"enabled": True, "key_file": key_file(d), "username": "inferd", "password_file": password}
    c = make_client(from_dict({"l2": {**base, "url": "rediss://cache.internal:6380/3"}}).l2)
    kw = c.connection_pool.connection_kwargs
    assert isinstance(c, Redis) and kw["db"] == 3 and kw["username"] == "inferd" and kw["password"] == "s3cret"
    assert c.connection_pool.connection_class.__name__ == "SSLConnection"
    c = make_client(from_dict({"l2": {**base, "sentinels": ["10.0.0.1:26379"], "sentinel_service": "m",
                                      "db": 2}}).l2)
    assert c.connection_pool.service_name == "m" and c.connection_pool.connection_kwargs["db"] == 2
    c = make_client(from_dict({"l2": {**base, "cluster": True, "url": "redis://10.0.0.2:6379"}}).l2)
    assert isinstance(c, RedisCluster)


@pytest.mark.timeout(240)
def test_through_sentinel_the_fleet_finds_the_master_and_shares_it(redis_sentinel):
    import redis

    sentinel, master_port = redis_sentinel
    key = key_file(short_dir())
    imgs = images(4, seed=5)
    args = ["--set", "l2.enabled=true", "--set", f'l2.sentinels=["{sentinel}"]',
            "--set", 'l2.sentinel_service="mymaster"', "--set", f'l2.key_file="{key}"',
            "--set", "l2.budget_ms=1000"]
    a = spawn_daemon(*args)
    b = spawn_daemon(*args)
    try:
        with Client(a.socket_path, cache=False) as ca:
            computed = answers(ca, imgs)
        wait_until(lambda: l2_stats(a)["writes"] >= len(imgs), 30, "a's answers written")
        with redis.Redis(port=master_port) as master:     # they went to the master the sentinel named
            assert len(list(master.scan_iter(match=b"inferd:*"))) == len(imgs)
        with Client(b.socket_path, cache=False) as cb:
            assert answers(cb, imgs) == computed
        assert l2_stats(b)["hits"] == len(imgs)
    finally:
        for d in (a, b):
            assert d.stop() == 0, d.log()
            d.cleanup()


@pytest.mark.timeout(240)
def test_on_a_cluster_lookups_and_writes_are_split_by_slot(redis_cluster):
    import redis

    key = key_file(short_dir())
    imgs = images(12, seed=6)
    args = ["--set", "l2.enabled=true", "--set", "l2.cluster=true",
            "--set", f'l2.url="redis://127.0.0.1:{redis_cluster[0]}"', "--set", f'l2.key_file="{key}"',
            "--set", "l2.budget_ms=1000"]
    a = spawn_daemon(*args)
    b = spawn_daemon(*args)
    try:
        with Client(a.socket_path, cache=False) as ca:
            computed = answers(ca, imgs)
        wait_until(lambda: l2_stats(a)["writes"] >= len(imgs), 30, "a's answers written")
        held = []
        for port in redis_cluster:
            with redis.Redis(port=port) as node:
                held.append(node.dbsize())
        assert sum(held) == len(imgs) and sum(n > 0 for n in held) >= 2, held   # spread over nodes
        with Client(b.socket_path, cache=False) as cb:       # pipelined: MGETs of keys on several nodes
            tops = cb.classify_many(imgs, top_k=3)
            assert [[(p.index, p.score) for p in top] for top in tops] == computed
        stats = l2_stats(b)
        assert stats["hits"] == len(imgs) and stats["errors"] == 0 and stats["batches"] < len(imgs), stats
    finally:
        for d in (a, b):
            assert d.stop() == 0, d.log()
            d.cleanup()


@pytest.mark.timeout(240)
def test_acl_user_and_password_file_are_used_and_a_wrong_password_only_costs_hits(redis_server):
    r = redis_server.client()
    r.acl_setuser("inferd", enabled=True, passwords=["+fleet-pw"], keys=[f"{PREFIX}*"],
                  commands=["+get", "+mget", "+set", "+ping", "+client"])
    r.acl_setuser("default", enabled=False)              # nobody gets in without the user
    d = short_dir()
    key = key_file(d)
    good, bad = key_file(d, b"fleet-pw\n"), key_file(d, b"wrong-pw\n")
    imgs = images(4, seed=7)
    a = spawn_daemon(*l2_args(redis_server, key, "--set", 'l2.username="inferd"',
                              "--set", f'l2.password_file="{good}"'))
    b = spawn_daemon(*l2_args(redis_server, key, "--set", 'l2.username="inferd"',
                              "--set", f'l2.password_file="{bad}"'))
    try:
        with Client(a.socket_path, cache=False) as ca:
            computed = answers(ca, imgs)
        wait_until(lambda: l2_stats(a)["writes"] >= len(imgs), 30, "a's answers written as inferd")
        with Client(b.socket_path, cache=False) as cb:
            assert answers(cb, imgs) == computed           # computed: b cannot log in
        stats = l2_stats(b)
        assert stats["hits"] == 0 and stats["errors"] + stats["skipped"] == len(imgs), stats
    finally:
        for daemon in (a, b):
            assert daemon.stop() == 0, daemon.log()
            daemon.cleanup()

