package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"hash/crc32"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// Outcome is what the cache contributed to a read; it is sent to clients
// as the X-Cache header and logged with each request.
type Outcome string

const (
	Hit    Outcome = "HIT"    // served from Redis.
	Miss   Outcome = "MISS"   // Redis had nothing; read from PostgreSQL, then Redis filled.
	Bypass Outcome = "BYPASS" // Redis could not be asked (down, slow or failing); read from PostgreSQL.
)

// The X-Cache header's values, shared by every response (see
// jsonContentType).
var (
	hitHeader    = []string{string(Hit)}
	missHeader   = []string{string(Miss)}
	bypassHeader = []string{string(Bypass)}
)

// header is o as the value of an X-Cache header.
func (o Outcome) header() []string {
	switch o {
	case Hit:
		return hitHeader
	case Miss:
		return missHeader
	}
	return bypassHeader
}

// Cache is the cache-aside layer: item JSON bodies in Redis under
// prefix+id, each with a TTL. Redis is optional. Every Redis error is
// logged and then skipped: it never fails a request. After a failure the
// cache is bypassed for the retry interval; then a single request probes
// Redis again, so a hung Redis costs one timeout per interval rather than
// one per request (the circuit-breaker pattern). An outage is logged once
// when it starts and once when it ends.
//
// Cached values carry the row's version, "<version>:<crc>:<json>", and writes
// leave a tombstone, "<version>:", that outlives any read still in flight.
// A fill (Fill) only replaces a value or tombstone of a lower or equal
// version, so a reader that fetched a row before a write committed can never
// put it back after the write's invalidation. This is the "stale set" race of
// cache-aside, which Facebook's memcache closes with leases (Nishtala et al.,
// "Scaling Memcache at Facebook", NSDI 2013, section 3.2.1); the row version
// plays the lease token's part here, and needs no extra round trip.
//
// An invalidation that cannot reach Redis is remembered, and the remembered
// keys are invalidated before Redis is read again, so an entry that a write
// could not remove is never served later.
type Cache struct {
	rdb    *redis.Client
	prefix string
	ttl    time.Duration
	retry  time.Duration
	log    *slog.Logger

	// fillWindow bounds the time from the start of a PostgreSQL read to its
	// fill; tombstoneTTL is long enough that a tombstone outlives it (see
	// newCache).
	fillWindow   time.Duration
	tombstoneTTL time.Duration

	// downUntil is zero while Redis is healthy; otherwise the Unix time in
	// nanoseconds before which Redis is not asked.
	downUntil atomic.Int64
	// lastRareLog is when warnRarely last logged (Unix ns).
	lastRareLog atomic.Int64
	// errors counts Redis commands that failed or were refused.
	errors atomic.Int64

	// pending holds the invalidations that did not reach Redis: item id ->
	// the version below which its cached value is stale. npending is its
	// length, read without the lock on every Get. If more than maxPending
	// pile up, they are dropped and overflowed is set: then, once Redis is
	// back, it is not read for a whole TTL (quarantineUntil, Unix ns), after
	// which every entry written before the outage has expired.
	mu              sync.Mutex
	runID           string // of the Redis server last connected to
	pending         map[int64]int64
	overflowed      bool
	npending        atomic.Int64
	flushing        atomic.Bool
	maxPending      int
	quarantineUntil atomic.Int64
}

// newCache makes a Redis client that fails fast: REDIS_TIMEOUT for dial,
// read and write and pool wait, one dial attempt and no command retries.
// It does not connect; Redis may be absent at startup and appear later.
func newCache(cfg Config, log *slog.Logger) *Cache {
	quietRedisOnce.Do(func() { redis.SetLogger(discardLogger{}) })
	// A read is bounded by DB_QUERY_TIMEOUT and a fill by REDIS_TIMEOUT
	// (or it fails and is remembered), so a fill lands within fillWindow of
	// its read's start, and Fill drops any later one. A tombstone is written
	// after the commit that made that read stale, so it must live at least
	// fillWindow plus the fill's own round trip; it lives twice that, and at
	// least 10 s.
	fillWindow := cfg.DBQueryTimeout + cfg.RedisTimeout
	c := &Cache{prefix: cfg.CacheKeyPrefix, ttl: cfg.CacheTTL, retry: cfg.RedisRetry, log: log,
		fillWindow:   fillWindow,
		tombstoneTTL: max(10*time.Second, 2*(fillWindow+2*cfg.RedisTimeout)),
		pending:      map[int64]int64{},
		maxPending:   100_000,
	}
	c.rdb = redis.NewClient(&redis.Options{
		Addr:            cfg.redisAddr(),
		Password:        cfg.RedisPassword,
		DB:              cfg.RedisDB,
		DialTimeout:     cfg.RedisTimeout,
		ReadTimeout:     cfg.RedisTimeout,
		WriteTimeout:    cfg.RedisTimeout,
		PoolTimeout:     cfg.RedisTimeout,
		DialerRetries:   1,
		MaxRetries:      -1, // -1 disables retries (go-redis Options docs).
		DisableIdentity: true,
		// Cluster maintenance notifications do not apply to a single cache
		// server; "auto" would send an extra command on every new connection.
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
		OnConnect:                c.onConnect,
	})
	return c
}

// onConnect runs on every new connection to Redis. A Redis that restarted
// (its run_id changed) and holds keys has reloaded them from disk or from
// another server: they may predate invalidations it had received, so it is
// not read until they have expired. go-redis drops dead pooled connections
// quietly, so this is how a restart between two requests is noticed.
func (c *Cache) onConnect(ctx context.Context, cn *redis.Conn) error {
	info, err := cn.Info(ctx, "server").Result()
	if err != nil {
		return err
	}
	_, runID, _ := strings.Cut(info, "run_id:")
	runID, _, _ = strings.Cut(runID, "\r\n")
	c.mu.Lock()
	previous := c.runID
	c.mu.Unlock()
	if previous == "" || previous == runID {
		c.mu.Lock()
		c.runID = runID
		c.mu.Unlock()
		return nil
	}
	// Decide before any command runs on this connection; other new
	// connections decide the same until runID is updated below. Reads that
	// began before now may have been overtaken by writes whose tombstones
	// the restart lost: the mark stops their fills (fillScript).
	keys, err := cn.DBSize(ctx).Result()
	if err != nil {
		return err
	}
	if marked, err := cn.Exists(ctx, c.restartKey()).Result(); err != nil {
		return err
	} else {
		keys -= marked // another replica's mark is not data
	}
	if err := cn.Set(ctx, c.restartKey(), time.Now().UnixMilli(), c.tombstoneTTL).Err(); err != nil {
		return err
	}
	if keys > 0 {
		c.quarantineUntil.Store(time.Now().Add(c.ttl + c.retry).UnixNano())
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.runID != runID {
		c.runID = runID
		if keys > 0 {
			c.log.Warn("redis restarted with data it may have reloaded from before invalidations; not read until it has expired",
				"addr", c.rdb.Options().Addr, "keys", keys, "for", c.ttl+c.retry)
		}
	}
	return nil
}

// unknownOutcomeTTL is how long the tombstone of a write whose outcome is
// unknown lasts. Such a write may still reach PostgreSQL and commit after
// the client gave up: a closed socket's data is retransmitted for up to
// about 15 minutes (Linux's default net.ipv4.tcp_retries2 = 15, "a
// hypothetical timeout of 924.6 seconds", kernel ip-sysctl documentation),
// and the tombstone must outlive that so no older row is cached meanwhile.
const unknownOutcomeTTL = 20 * time.Minute

// restartKey is the key of the restart mark, beside the items' keys.
func (c *Cache) restartKey() string { return c.prefix + "restarted" }

// Key is the Redis key of item id.
func (c *Cache) Key(id int64) string {
	return c.prefix + strconv.FormatInt(id, 10)
}

// Get returns the cached body of item id with Hit, or nil with Miss (no
// such key, a tombstone, a value this service did not write, or a key of
// another type, WRONGTYPE, which the next Fill replaces) or Bypass (Redis
// not asked, or it failed). Invalidations that failed earlier are retried
// first; until they succeed, Redis is not read.
func (c *Cache) Get(ctx context.Context, id int64) ([]byte, Outcome) {
	if c.quarantined() || !c.allow() || !c.flushPending(ctx) {
		return nil, Bypass
	}
	b, err := c.rdb.Get(ctx, c.Key(id)).Bytes()
	switch {
	case err == nil && c.quarantined():
		// The GET was the first on a new connection to a restarted Redis.
		return nil, Bypass
	case err == nil:
		c.ok()
		body, ok, tombstone := cachedBody(b, id)
		if ok {
			return body, Hit
		}
		if !tombstone {
			c.warnRarely("a cached value is not what this service caches for its item (written by another program, cut short, or another item's); reading PostgreSQL and replacing it",
				"key", c.Key(id))
		}
		return nil, Miss
	case errors.Is(err, redis.Nil):
		c.ok()
		return nil, Miss
	case redis.HasErrorPrefix(err, "WRONGTYPE"):
		c.rejected("GET", c.Key(id), err)
		return nil, Miss
	}
	c.failed(ctx, "GET", err)
	return nil, Bypass
}

// A cached value is "<version>:<crc>:<json>": the row's version, the
// CRC-32C (Castagnoli) of "<version>:" and the JSON together, in 8
// lowercase hex digits, and the item's JSON exactly as a miss sends it. The
// checksum lets a hit be checked in about a hundred nanoseconds instead of
// parsing and re-encoding the JSON, and covers the version so that an
// edited version (which the scripts would trust) does not pass either; the
// Lua scripts below read only the version. A tombstone is "<version>:".
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// cacheValue builds the cached value of body, the JSON of an item at version.
func cacheValue(version int64, body []byte) []byte {
	v := make([]byte, 0, 30+len(body))
	v = strconv.AppendInt(v, version, 10)
	v = append(v, ':')
	sum := checksum(v, body)
	v = append(v, sum[:]...)
	v = append(v, ':')
	return append(v, body...)
}

// checksum is the CRC-32C of version ("<version>:") followed by body, in 8
// lowercase hex digits.
func checksum(version, body []byte) [8]byte {
	var sum [4]byte
	var digits [8]byte
	binary.BigEndian.PutUint32(sum[:], crc32.Update(crc32.Checksum(version, castagnoli), castagnoli, body))
	hex.Encode(digits[:], sum[:])
	return digits
}

// cachedBody returns the JSON in v, a cached value of item id, with ok true
// if v is what cacheValue writes for that item: a version, the checksum of
// it and the JSON, and JSON that begins {"id":<id>,. tombstone reports a
// "<version>:" left by a write. Anything else (a value written by another
// program, cut short, or copied from another item's key) is neither.
func cachedBody(v []byte, id int64) (body []byte, ok, tombstone bool) {
	i := bytes.IndexByte(v, ':')
	if i < 1 || i > 19 || !allDigits(v[:i]) {
		return nil, false, false
	}
	rest := v[i+1:]
	if len(rest) == 0 {
		return nil, false, true
	}
	if len(rest) < 9 || rest[8] != ':' {
		return nil, false, false
	}
	body = rest[9:]
	sum := checksum(v[:i+1], body)
	var prefix [32]byte
	want := strconv.AppendInt(append(prefix[:0], `{"id":`...), id, 10)
	if !bytes.Equal(rest[:8], sum[:]) || !bytes.HasPrefix(body, append(want, ',')) {
		return nil, false, false
	}
	return body, true, false
}

func allDigits(b []byte) bool {
	for _, c := range b {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// fillScript caches a value unless the key holds a newer one, or the read
// it comes from began before this Redis server was found restarted (its
// tombstones may have been lost with the restart).
// KEYS[1]: the item's key; KEYS[2]: the restart mark (see onConnect).
// ARGV[1]: the version read from PostgreSQL; ARGV[2]: the value
// (cacheValue); ARGV[3]: its TTL in ms; ARGV[4]: when the read began,
// in Unix ms. A key of another type (pcall returns an error table) is
// replaced.
var fillScript = redis.NewScript(`
local restarted = redis.pcall('GET', KEYS[2])
if type(restarted) == 'string' and tonumber(restarted) and tonumber(restarted) > tonumber(ARGV[4]) then return 0 end
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'string' then
  local v = tonumber(string.match(cur, '^(%d+):'))
  if v and v > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1`)

// invalidateScript replaces the key with a tombstone unless it already
// holds a value or tombstone at least as new. KEYS[1]: the item's key.
// ARGV[1]: the lowest version that is not stale; ARGV[2]: the tombstone's
// TTL in ms.
var invalidateScript = redis.NewScript(`
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'string' then
  local v = tonumber(string.match(cur, '^(%d+):'))
  if v and v >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ':', 'PX', ARGV[2])
return 1`)

// Fill caches body, the JSON of it, with the TTL, unless Redis holds a
// newer version of the item. readStart is when the PostgreSQL read of it
// began: a fill later than fillWindow after that is dropped, since a
// tombstone that would stop it may have expired. A fill whose outcome is
// unknown (a timeout) is remembered as an invalidation, since it may still
// land.
func (c *Cache) Fill(ctx context.Context, it Item, body []byte, readStart time.Time) {
	if time.Since(readStart) > c.fillWindow || c.quarantined() || !c.allow() {
		return
	}
	err := fillScript.Run(ctx, c.rdb, []string{c.Key(it.ID), c.restartKey()}, it.Version, cacheValue(it.Version, body),
		c.ttl.Milliseconds(), readStart.UnixMilli()).Err()
	switch {
	case err == nil:
		c.ok()
	case isReplyError(err):
		c.rejected("fill", c.Key(it.ID), err) // nothing written, e.g. OOM
	default:
		c.remember(it.ID, it.Version+1)
		c.failed(ctx, "fill", err)
	}
}

// Invalidate marks item id's cached value stale: every cached version below
// floor (the version a write just committed, or one more than a deleted
// row's) is replaced by a tombstone. Use a context that outlives the
// request: an invalidation must not be cancelled by a client hanging up.
// If Redis cannot be reached, the invalidation is remembered and done
// before Redis is read again.
func (c *Cache) Invalidate(ctx context.Context, id, floor int64) {
	if !c.allow() {
		c.remember(id, floor)
		return
	}
	if err := c.invalidate(ctx, map[int64]int64{id: floor}); err != nil {
		c.remember(id, floor)
		c.failed(ctx, "invalidate", err)
		return
	}
	c.ok()
}

// invalidate runs invalidateScript for each id and floor in one pipeline
// and forgets those remembered at or below the floor. A full Redis
// (noeviction) refuses scripts that write, so refused keys are deleted with
// DEL, which it still accepts. The error is nil only if every key was
// invalidated.
func (c *Cache) invalidate(ctx context.Context, floors map[int64]int64) error {
	pipe := c.rdb.Pipeline()
	cmds := make(map[int64]*redis.Cmd, len(floors))
	for id, floor := range floors {
		ttl := c.tombstoneTTL
		if floor >= unknownVersion {
			ttl = unknownOutcomeTTL
		}
		cmds[id] = invalidateScript.Eval(ctx, pipe, []string{c.Key(id)}, floor, ttl.Milliseconds())
	}
	if _, err := pipe.Exec(ctx); err != nil && !isReplyError(err) {
		return err
	}
	var refused []string
	var refusedIDs []int64
	for id, cmd := range cmds {
		if err := cmd.Err(); err != nil {
			c.rejected("invalidate", c.Key(id), err)
			refused, refusedIDs = append(refused, c.Key(id)), append(refusedIDs, id)
			continue
		}
		c.forget(id, floors[id])
	}
	if len(refused) > 0 {
		if err := c.rdb.Del(ctx, refused...).Err(); err != nil {
			return err
		}
		for _, id := range refusedIDs {
			c.forget(id, floors[id])
		}
	}
	return nil
}

// remember records an invalidation to do before Redis is read again.
func (c *Cache) remember(id, floor int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.overflowed {
		return
	}
	if _, ok := c.pending[id]; !ok && len(c.pending) >= c.maxPending {
		c.log.Warn("too many invalidations missed while Redis was unreachable; once it is back it will not be read for one CACHE_TTL",
			"max", c.maxPending, "cache_ttl", c.ttl)
		c.overflowed = true
		c.pending = map[int64]int64{}
		c.npending.Store(1)
		return
	}
	c.pending[id] = max(c.pending[id], floor)
	c.npending.Store(int64(len(c.pending)))
}

// forget drops a remembered invalidation that one at floor has covered.
func (c *Cache) forget(id, floor int64) {
	if c.npending.Load() == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if f, ok := c.pending[id]; ok && f <= floor {
		delete(c.pending, id)
		c.npending.Store(int64(len(c.pending)))
	}
}

// flushPending does the remembered invalidations, and reports whether none
// is left, so that Redis may be read. Only one request flushes at a time;
// the others bypass Redis meanwhile.
func (c *Cache) flushPending(ctx context.Context) bool {
	if c.npending.Load() == 0 {
		return true
	}
	if !c.flushing.CompareAndSwap(false, true) {
		return false
	}
	defer c.flushing.Store(false)
	c.mu.Lock()
	overflowed := c.overflowed
	const maxBatch = 1000 // keys per pipeline
	batch := make(map[int64]int64, min(len(c.pending), maxBatch))
	for id, floor := range c.pending {
		if len(batch) == maxBatch {
			break
		}
		batch[id] = floor
	}
	c.mu.Unlock()

	if overflowed {
		if err := c.rdb.Ping(ctx).Err(); err != nil {
			c.failed(ctx, "PING", err)
			return false
		}
		c.mu.Lock()
		c.overflowed = false
		c.npending.Store(int64(len(c.pending)))
		c.mu.Unlock()
		c.quarantineUntil.Store(time.Now().Add(c.ttl + c.retry).UnixNano())
		c.log.Warn("redis is back, but not read until every entry from before the outage has expired",
			"for", c.ttl+c.retry)
		return false
	}
	if err := c.invalidate(ctx, batch); err != nil {
		c.failed(ctx, "invalidate", err)
		return false
	}
	c.ok()
	return c.npending.Load() == 0
}

// quarantined reports whether Redis must not be read or filled now, after
// an outage that missed more invalidations than could be remembered.
func (c *Cache) quarantined() bool {
	until := c.quarantineUntil.Load()
	return until != 0 && time.Now().UnixNano() < until
}

// Ping reports whether Redis answers, for readiness. While the cache is
// bypassed after a failure it reports the failure without asking.
func (c *Cache) Ping(ctx context.Context) error {
	if !c.allow() {
		return errCacheBypassed
	}
	if err := c.rdb.Ping(ctx).Err(); err != nil {
		c.failed(ctx, "PING", err)
		return err
	}
	c.ok()
	return nil
}

// quietRedisOnce silences go-redis's own (process-wide) logger, which
// prints every failed dial to stderr: a flood during an outage. Cache logs
// failures itself, once per outage.
var quietRedisOnce sync.Once

type discardLogger struct{}

func (discardLogger) Printf(context.Context, string, ...any) {}

var errCacheBypassed = errors.New("redis is being bypassed after a recent failure")

// Close closes the Redis client and its connections.
func (c *Cache) Close() error { return c.rdb.Close() }

// allow reports whether Redis may be asked now. While it is down, the first
// caller after the retry interval becomes the probe and pushes the interval
// on for everyone else, so that only it waits on a Redis that may be hung.
func (c *Cache) allow() bool {
	until := c.downUntil.Load()
	if until == 0 {
		return true
	}
	now := time.Now().UnixNano()
	if now < until {
		return false
	}
	return c.downUntil.CompareAndSwap(until, now+int64(c.retry))
}

func (c *Cache) ok() {
	if until := c.downUntil.Load(); until != 0 && c.downUntil.CompareAndSwap(until, 0) {
		c.log.Info("redis is back; cache re-enabled", "addr", c.rdb.Options().Addr)
	}
}

// isReplyError reports whether Redis answered with an error reply, such as
// OOM when it is full: it is reachable and may still serve reads, so a
// refused SET does not make the cache bypass Redis.
func isReplyError(err error) bool {
	var re redis.Error
	return errors.As(err, &re)
}

// rareLogInterval bounds the log to one line per interval about commands
// Redis refuses and values it holds that this service did not write, so
// that a full Redis (every SET refused) or a key another program keeps
// rewriting does not flood it.
const rareLogInterval = time.Minute

func (c *Cache) rejected(op, key string, err error) {
	c.errors.Add(1)
	c.warnRarely("redis refused a command; carrying on without the cache for it", "op", op, "key", key, "err", err)
}

// warnRarely logs a warning unless one was logged less than
// rareLogInterval ago.
func (c *Cache) warnRarely(msg string, args ...any) {
	now := time.Now().UnixNano()
	last := c.lastRareLog.Load()
	if now-last >= int64(rareLogInterval) && c.lastRareLog.CompareAndSwap(last, now) {
		c.log.Warn(msg+" (such warnings are logged at most once a minute)", args...)
	}
}

func (c *Cache) failed(ctx context.Context, op string, err error) {
	c.errors.Add(1)
	if ctx.Err() != nil {
		// The client went away; that says nothing about Redis.
		return
	}
	next := time.Now().Add(c.retry).UnixNano()
	for {
		until := c.downUntil.Load()
		if c.downUntil.CompareAndSwap(until, next) {
			if until == 0 {
				c.log.Warn("redis unavailable; serving from PostgreSQL and retrying", "addr", c.rdb.Options().Addr,
					"op", op, "retry_every", c.retry, "err", err)
			} else {
				c.log.Debug("redis still unavailable", "op", op, "err", err)
			}
			return
		}
	}
}
