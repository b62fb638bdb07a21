"""The adapter store in Redis, shared by every coordinator of a cluster (`loracast coordinator serve --store URL`).

    loracast:adapter:<id>    hash: the FLOAT32 manifest, the payload, their size in bytes
    loracast:source:<key>    the id of the adapter made from one source text (see `source_key`): never the text
    loracast:recency         sorted set: adapter id -> use stamp (from loracast:clock); evicts least recent first
    loracast:bytes           the bytes of every adapter held: the LRU bound (`capacity_bytes`) applies to it
    loracast:writes          adapters written: one per hypernetwork pass of the cluster
    loracast:claim:<key>     the fencing token of the coordinator making that text's adapter (SET NX PX, renewed)
    loracast:made            pub/sub channel: a source key whose claim ended, so its waiters look again

Every write is one Lua script, atomic: an adapter, its index and the eviction it causes are never half done. Run
Redis with `maxmemory-policy noeviction` (its default): the store evicts by its own bound, and a key Redis dropped
on its own would leave the recency set stale.

A claim makes one hypernetwork pass per text run cluster-wide: a coordinator that finds another's claim waits for
its release (pub/sub, and a look every `WAIT_SLICE_S` in case a message was lost) and then finds the adapter; a
claim whose holder died expires after `claim_ttl_s` and a waiter takes it over. Only the holder of a claim's
fencing token renews or releases it.

Outage: an operation retries for a few seconds (a Redis restart is ridden through); after that the store counts as
down: `watch` callbacks hear it, operations fail fast, adapters made meanwhile are held in this process's memory
(served from there, written to Redis once it is back), and a probe looks for Redis every second.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import TypeVar
from urllib.parse import urlsplit

import redis
from google.protobuf.message import DecodeError
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import BusyLoadingError, RedisError
from redis.retry import Retry

from coordinator import metrics
from coordinator.adapter_store import Abandoned, Claim, Float16Memo, NotCached, StoreUnavailable
from loracast import adapter_wire
from loracast.adapter_format import Adapter
from loracast.adapter_wire import WireAdapter, WireError
from loracast.errors import ConfigError
from loracast.lora_spec import LoraSpec
from loracast.v1 import loracast_pb2 as pb

PREFIX = "loracast:"
ADAPTER, SOURCE, CLAIM = f"{PREFIX}adapter:", f"{PREFIX}source:", f"{PREFIX}claim:"
RECENCY, CLOCK, BYTES, WRITES, FENCE = (f"{PREFIX}{name}" for name in ("recency", "clock", "bytes", "writes", "fence"))
MADE = f"{PREFIX}made"
WAIT_SLICE_S = 0.25  # a claim's waiter looks again this often even without a message
PROBE_S = 1.0  # while Redis is down, it is looked for this often
# Ridden through before the store counts as down: about 3 s of retries, more than a Redis restart takes.
_RETRY = Retry(
    ExponentialBackoff(cap=0.5, base=0.05), retries=8, supported_errors=(redis.ConnectionError, TimeoutError)
)
T = TypeVar("T")
log = logging.getLogger(__name__)

_PUT = """
local size = tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'manifest', ARGV[2], 'payload', ARGV[3], 'size', size)
  redis.call('INCRBY', KEYS[5], size)
end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[4]), ARGV[1])
redis.call('INCR', KEYS[6])
local capacity = tonumber(ARGV[5])
local evicted = 0
while capacity > 0 and tonumber(redis.call('GET', KEYS[5]) or '0') > capacity and redis.call('ZCARD', KEYS[3]) > 1 do
  local victim = redis.call('ZPOPMIN', KEYS[3])[1]
  local key = ARGV[6] .. victim
  redis.call('DECRBY', KEYS[5], tonumber(redis.call('HGET', key, 'size') or '0'))
  redis.call('DEL', key)
  evicted = evicted + 1
end
return evicted
"""
_GET = """
local fields = redis.call('HMGET', KEYS[1], 'manifest', 'payload')
if not fields[1] then return false end
if ARGV[2] == '1' then fields[2] = '' end
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[1])
return fields
"""
_UNINDEX = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return redis.call('PUBLISH', ARGV[2], ARGV[3])
"""


def check_url(url: str) -> str:
    """`url` if it names a Redis (redis://HOST:PORT/DB, rediss:// for TLS, unix://PATH); ConfigError otherwise."""
    try:
        parts = urlsplit(url)
        redis.connection.parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"--store {url!r}: {exc}; give redis://HOST:PORT/DB") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"--store {url!r} is not a Redis URL: give redis://HOST:PORT/DB")
    if parts.scheme != "unix" and not re.fullmatch(r"/?[0-9]*", parts.path):
        raise ConfigError(f"--store {url!r}: the database is a number; give redis://HOST:PORT/DB")
    return url


def _where(url: str) -> str:
    """The URL without a password, for messages and logs."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class RedisStore:
    """Thread-safe. `capacity_bytes` bounds the adapters held in Redis (every coordinator should give the same);
    `held_bytes` bounds the adapters this process holds while Redis is down."""

    backend = "redis"

    def __init__(
        self,
        url: str,
        capacity_bytes: int | None = None,
        *,
        claim_ttl_s: float = 5.0,
        memo_bytes: int = 64 * 2**20,
        held_bytes: int = 64 * 2**20,
    ) -> None:
        self.where = _where(check_url(url))
        self.capacity_bytes = capacity_bytes
        self.claim_ttl_ms = round(claim_ttl_s * 1000)
        self.held_bytes = held_bytes
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=10.0, retry=_RETRY)
        self._probe = redis.Redis.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )
        self._put, self._get = self._redis.register_script(_PUT), self._redis.register_script(_GET)
        self._unindex, self._renew = self._redis.register_script(_UNINDEX), self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._memo = Float16Memo(memo_bytes)
        self._lock = threading.Lock()
        self._down = threading.Event()
        self._closed = threading.Event()
        self._watchers: list[Callable[[bool], None]] = []
        self._stats = (0, 0)
        # Made while Redis was down: source key -> FLOAT32 adapter, least recently made first; written once it is back
        self._held: OrderedDict[str, WireAdapter] = OrderedDict()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._claims: dict[str, str] = {}  # claim key -> fencing token, of the claims this process holds
        try:
            self._probe.ping()
        except RedisError as exc:
            self._fail(exc)
        else:
            self.stats()
        for target, name in ((self._listen, "store-listen"), (self._keep_claims, "store-claims")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._redis.close()
        self._probe.close()

    def watch(self, on_change: Callable[[bool], None]) -> None:
        with self._lock:
            self._watchers.append(on_change)
            up = not self._down.is_set()
        on_change(up)

    # -- reading ---------------------------------------------------------------------------------------------

    def find(self, key: str, dtype: int) -> WireAdapter | None:
        held = self._held_adapter(key)
        if held is not None:
            return self._memo.in_dtype(held, dtype)
        try:
            pointer = self._call(lambda: self._redis.get(SOURCE + key))
            if pointer is None:
                return None
            adapter_id = pointer.decode("ascii", "replace")
            try:
                return self.get(adapter_id, dtype)
            except (NotCached, WireError):  # evicted since, or damaged: the index entry goes, unless repointed
                self._call(lambda: self._unindex(keys=[SOURCE + key], args=[pointer]))
                return None
        except StoreUnavailable:
            return None  # a miss: the text is made here, as if for the first time

    def get(self, adapter_id: str, dtype: int) -> WireAdapter:
        adapter_wire.check_adapter_id(adapter_id)
        dtype = adapter_wire.wire_dtype(dtype)
        memoized = self._memo.cached(adapter_id) if dtype == pb.FLOAT16 else None
        keys, args = [ADAPTER + adapter_id, RECENCY, CLOCK], [adapter_id, "1" if memoized is not None else "0"]
        try:
            fields = self._call(lambda: self._get(keys=keys, args=args))
        except StoreUnavailable:
            if memoized is not None:  # the bytes are known, the recency update is lost: that is all
                return memoized
            held = self._held_by_id(adapter_id)
            if held is None:
                raise
            return self._memo.in_dtype(held, dtype)
        if fields is None:
            held = self._held_by_id(adapter_id)
            if held is None:
                self._memo.forget(adapter_id)
                raise NotCached(adapter_id)
            return self._memo.in_dtype(held, dtype)
        if memoized is not None:
            return memoized
        try:
            manifest = pb.AdapterManifest.FromString(fields[0])
            adapter_wire.check_manifest(manifest)
        except (DecodeError, WireError) as exc:
            log.error("adapter %s… in Redis has an unreadable manifest (%s)", adapter_id[:12], exc)
            raise NotCached(adapter_id) from None
        if manifest.adapter_id != adapter_id or len(fields[1]) != manifest.total_size:
            log.error("adapter %s… in Redis does not match its manifest", adapter_id[:12])
            raise NotCached(adapter_id)
        return self._memo.in_dtype(WireAdapter(manifest, fields[1]), dtype)

    def recent(self, before: int | None, limit: int) -> list[tuple[int, pb.AdapterManifest]]:
        top = "+inf" if before is None else f"({before}"

        def read() -> list[tuple[int, bytes | None]]:
            ranked = self._redis.zrevrangebyscore(RECENCY, top, "-inf", start=0, num=limit, withscores=True)
            pipe = self._redis.pipeline(transaction=False)
            for adapter_id, _ in ranked:
                pipe.hget(ADAPTER + adapter_id.decode(), "manifest")
            return [(int(stamp), manifest) for (_, stamp), manifest in zip(ranked, pipe.execute(), strict=True)]

        return [(stamp, pb.AdapterManifest.FromString(m)) for stamp, m in self._call(read) if m is not None]

    def stats(self) -> tuple[int, int]:
        if not self._down.is_set():
            try:
                count, size = self._call(lambda: self._redis.pipeline().zcard(RECENCY).get(BYTES).execute())
                self._stats = (count, int(size or 0))
            except StoreUnavailable:
                pass
        return self._stats

    def writes(self) -> int:
        """Adapters written to this Redis by every coordinator so far: the cluster's hypernetwork passes."""
        return int(self._call(lambda: self._redis.get(WRITES)) or 0)

    # -- writing ---------------------------------------------------------------------------------------------

    def put(self, key: str, adapter: Adapter, spec: LoraSpec, metadata: Mapping[str, str], dtype: int) -> WireAdapter:
        wire = adapter_wire.encode(adapter, spec, metadata, pb.FLOAT32)
        try:
            self._write(key, wire)
        except StoreUnavailable:
            self._hold(key, wire)
        return self._memo.in_dtype(wire, dtype)

    @contextmanager
    def claim(self, key: str, dtype: int, abandoned: Callable[[], bool]) -> Iterator[Claim]:
        claim_key = CLAIM + key
        try:
            token, found, waited = self._acquire(key, dtype, abandoned)
        except StoreUnavailable:  # no claim without Redis: this coordinator makes it alone
            yield Claim(self.find(key, dtype))
            return
        if token is None:
            yield Claim(found, waited)
            return
        with self._lock:
            self._claims[claim_key] = token
        try:
            # The previous holder may have released it just now, with the adapter made.
            yield Claim(self.find(key, dtype), waited)
        finally:
            with self._lock:
                del self._claims[claim_key]
            with suppress(StoreUnavailable):  # unreleased, the claim expires by itself
                self._call(lambda: self._release(keys=[claim_key], args=[token, MADE, key]))

    # -- internals -------------------------------------------------------------------------------------------

    def _call(self, operation: Callable[[], T]) -> T:
        """`operation` on Redis (retried by the client through a short outage); StoreUnavailable when it fails."""
        if self._down.is_set():
            raise StoreUnavailable(f"the Redis store at {self.where} is unreachable")
        try:
            return operation()
        except RedisError as exc:
            self._fail(exc)
            raise StoreUnavailable(f"the Redis store at {self.where} failed: {exc}") from None

    def _fail(self, exc: RedisError) -> None:
        metrics.STORE_ERRORS.labels(backend=self.backend).inc()
        if not isinstance(exc, (redis.ConnectionError, redis.TimeoutError, BusyLoadingError)):
            log.error("Redis store at %s: %s", self.where, exc)
            return
        with self._lock:
            if self._down.is_set():
                return
            self._down.set()
            watchers = list(self._watchers)
        log.warning("Redis store at %s is unreachable (%s): serving without it until it is back", self.where, exc)
        for on_change in watchers:
            on_change(False)
        threading.Thread(target=self._recover, name="store-probe", daemon=True).start()

    def _recover(self) -> None:
        """While down: look for Redis every PROBE_S; once it answers, write what was held, then count it as up."""
        while not self._closed.wait(PROBE_S):
            try:
                self._probe.ping()
                with self._lock:
                    held = list(self._held.items())
                for key, wire in held:
                    self._write(key, wire, probing=True)
            except (RedisError, StoreUnavailable):
                continue
            with self._lock:
                for key, _ in held:
                    self._held.pop(key, None)
                self._down.clear()
                watchers = list(self._watchers)
            log.warning("Redis store at %s is back (%d adapters made meanwhile written to it)", self.where, len(held))
            for on_change in watchers:
                on_change(True)
            return

    def _write(self, key: str, wire: WireAdapter, probing: bool = False) -> None:
        manifest = wire.manifest.SerializeToString()
        keys = [ADAPTER + wire.manifest.adapter_id, SOURCE + key, RECENCY, CLOCK, BYTES, WRITES]
        size = len(manifest) + len(wire.payload)
        args = [wire.manifest.adapter_id, manifest, wire.payload, size, self.capacity_bytes or 0, ADAPTER]
        if probing:  # not through _call: the store is still down for everyone else
            self._put(keys=keys, args=args, client=self._probe)
        else:
            self._call(lambda: self._put(keys=keys, args=args))

    def _hold(self, key: str, wire: WireAdapter) -> None:
        with self._lock:
            self._held[key] = wire
            total = sum(len(w.payload) for w in self._held.values())
            while total > self.held_bytes and len(self._held) > 1:
                _, dropped = self._held.popitem(last=False)
                total -= len(dropped.payload)

    def _held_adapter(self, key: str) -> WireAdapter | None:
        with self._lock:
            return self._held.get(key)

    def _held_by_id(self, adapter_id: str) -> WireAdapter | None:
        with self._lock:
            return next((w for w in self._held.values() if w.manifest.adapter_id == adapter_id), None)

    def _acquire(
        self, key: str, dtype: int, abandoned: Callable[[], bool]
    ) -> tuple[str | None, WireAdapter | None, bool]:
        """The claim's fencing token once this process holds it; or (None, the adapter, True) once another
        coordinator has made it. Raises Abandoned, or StoreUnavailable."""
        claim_key = CLAIM + key
        woken = threading.Event()
        with self._lock:  # listening before looking: a release between the look and the wait is not missed
            self._waiters.setdefault(key, set()).add(woken)
        try:
            token = str(self._call(lambda: self._redis.incr(FENCE)))
            waited = False
            while not self._call(lambda: self._redis.set(claim_key, token, nx=True, px=self.claim_ttl_ms)):
                if not waited:
                    metrics.STORE_CLAIM_WAITS.inc()
                    waited = True
                woken.wait(WAIT_SLICE_S)
                woken.clear()
                if abandoned():
                    raise Abandoned(f"nobody waits for source {key[:12]}… any more")
                found = self.find(key, dtype)
                if found is not None:
                    return None, found, True
            return token, None, waited
        finally:
            with self._lock:
                waiting = self._waiters[key]
                waiting.discard(woken)
                if not waiting:
                    del self._waiters[key]

    def _listen(self) -> None:
        """Wake the waiters of a source key whose claim was released (by any coordinator)."""
        while not self._closed.is_set():
            try:
                with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    pubsub.subscribe(MADE)
                    while not self._closed.is_set():
                        message = pubsub.get_message(timeout=1.0)
                        if message is not None:
                            with self._lock:
                                waiting = list(self._waiters.get(message["data"].decode("ascii", "replace"), ()))
                            for woken in waiting:
                                woken.set()
            except (RedisError, OSError, ValueError):  # Redis restarting, or this store closed
                self._closed.wait(PROBE_S)

    def _keep_claims(self) -> None:
        """Renew this process's claims at a third of their lifetime, while it lives."""
        while not self._closed.wait(self.claim_ttl_ms / 3000):
            with self._lock:
                held = list(self._claims.items())
            for claim_key, token in held:
                try:
                    if not self._call(lambda k=claim_key, t=token: self._renew(keys=[k], args=[t, self.claim_ttl_ms])):
                        log.warning("a claim expired before its pass ended: another coordinator may make it too")
                except StoreUnavailable:
                    pass
