"""The Redis client of the fleet cache: one asyncio client on the daemon's loop, for the topology
``[l2]`` names (standalone ``url``, ``sentinels``, or ``cluster``), with its TLS and AUTH settings.

Why asyncio on the loop rather than a thread with the sync client: a pipelined MGET over loopback
costs about 50 us of loop time with hiredis, about what a thread hop each way costs alone
(bench/fleet/run.py measures the hit path), and the loop keeps all bookkeeping on one thread.

Nothing here retries: a failed command fails at once (``Retry(NoBackoff(), 0)``) and the caller
counts it and lets the device compute, which is always cheaper for a waiting request than a retry;
the breaker (daemon/caching/fleet/breaker.py) decides when to try again. ``socket_timeout`` (``l2.timeout_ms``)
bounds a command against a hung server; requests stop waiting long before, at ``l2.budget_ms``.
"""
from __future__ import annotations

from .codec import read_secret


def _common(cfg) -> dict:
    """Keyword arguments every topology's connections take."""
    # redis is an optional dependency (the fleet extra): imported only when l2.enabled
    from redis.backoff import NoBackoff
    from redis.asyncio.retry import Retry

    seconds = cfg.timeout_ms / 1000.0
    kwargs = {"socket_timeout": seconds, "socket_connect_timeout": seconds,
              "retry": Retry(NoBackoff(), 0), "client_name": "inferd"}
    if cfg.username:
        kwargs["username"] = cfg.username
    if cfg.password_file:
        kwargs["password"] = read_secret("l2.password_file", cfg.password_file).strip().decode()
    if cfg.tls or cfg.url.startswith("rediss://"):
        kwargs["ssl"] = True
        if cfg.tls_ca_file:
            kwargs["ssl_ca_certs"] = cfg.tls_ca_file
        if cfg.tls_cert_file:
            kwargs["ssl_certfile"], kwargs["ssl_keyfile"] = cfg.tls_cert_file, cfg.tls_key_file
    return kwargs


def make_client(cfg):
    """A redis.asyncio client (Redis, a Sentinel master, or RedisCluster) for ``cfg`` (an L2Config
    checked by config.check_l2_config). Connects lazily: nothing blocks here."""
    from redis import asyncio as aredis     # optional dependency: see _common

    kwargs = _common(cfg)
    if cfg.sentinels:
        from redis.asyncio.sentinel import Sentinel

        nodes = [(host, int(port)) for host, _, port in (a.rpartition(":") for a in cfg.sentinels)]
        # the sentinels get the timeouts and TLS, not the data nodes' ACL user and password
        sentinel_kwargs = {k: v for k, v in kwargs.items() if k not in ("client_name", "username", "password")}
        sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_kwargs, **kwargs)
        return sentinel.master_for(cfg.sentinel_service, db=cfg.db)
    if cfg.cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(cfg.url, **kwargs)       # retry: none, as for the others
    return aredis.Redis.from_url(cfg.url, db=cfg.db, **kwargs)   # a db in the url wins


async def mget(client, cluster: bool, keys: list) -> list:
    """Values of ``keys`` (None where absent) in one round trip per node."""
    if cluster:
        return await client.mget_nonatomic(keys)
    return await client.mget(keys)


async def write(client, items: list, ttl_s: int) -> None:
    """``SET key value EX ttl_s`` for each (key, value), pipelined, no transaction."""
    pipe = client.pipeline(transaction=False)
    for key, value in items:
        pipe.set(key, value, ex=ttl_s)
    await pipe.execute()
