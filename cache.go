package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"net"
	"strconv"
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

// Cache is the Redis side of cache-aside: item bodies under prefix+id, each
// with a TTL. Get reads one; on a miss the caller reads PostgreSQL and calls
// Fill; after a write it calls Invalidate. Redis is optional: its errors are
// logged and skipped, never failing a request, and outages (in
// cache_outages.go) keeps the books on them: when Redis may be asked, and
// the invalidations it missed.
//
// Cached values carry the row's version, and a write leaves a tombstone that
// outlives any read still in flight. A fill replaces only a value or
// tombstone of a lower or equal version, so a reader that fetched a row
// before a write committed can never put it back after the write's
// invalidation. This is the "stale set" race of cache-aside, which
// Facebook's memcache closes with leases (Nishtala et al., "Scaling Memcache
// at Facebook", NSDI 2013, section 3.2.1); the row version plays the lease
// token's part here, with no extra round trip.
type Cache struct {
	rdb          redis.UniversalClient // one server, or the master that Sentinels name
	prefix       string                // CACHE_KEY_PREFIX
	shape        string                // names the JSON of the bodies cached (see value)
	ttl          time.Duration         // CACHE_TTL
	fillWindow   time.Duration         // the longest a fill may come after its read began
	tombstoneTTL time.Duration         // long enough to outlive fillWindow
	outages      *outages
}

// newCache makes a Redis client that fails fast: REDIS_TIMEOUT for dial,
// read and write and pool wait, one dial attempt and no command retries.
// With REDIS_SENTINEL_ADDRS it is go-redis's failover client, which finds
// the master through Sentinel; the cache code is the same for both.
// It does not connect; Redis may be absent at startup and appear later.
// shape names the JSON of the bodies the caller caches: a value of another
// shape is a miss.
func newCache(cfg Config, shape string, log *slog.Logger) *Cache {
	quietRedisOnce.Do(func() { redis.SetLogger(discardLogger{}) })
	// A read is bounded by DB_QUERY_TIMEOUT and a fill by REDIS_TIMEOUT
	// (or it fails and is remembered), so a fill lands within fillWindow of
	// its read's start, and Fill drops any later one. A tombstone is written
	// after the commit that made that read stale, so it must live at least
	// fillWindow plus the fill's own round trip; it lives twice that, and at
	// least 10 s.
	fillWindow := cfg.DBQueryTimeout + cfg.RedisTimeout
	c := &Cache{prefix: cfg.CacheKeyPrefix, shape: shape, ttl: cfg.CacheTTL,
		fillWindow:   fillWindow,
		tombstoneTTL: max(10*time.Second, 2*(fillWindow+2*cfg.RedisTimeout)),
		outages:      newOutages(cfg, log),
	}
	opts := &redis.UniversalOptions{
		Addrs:           []string{net.JoinHostPort(cfg.RedisHost, strconv.Itoa(cfg.RedisPort))},
		Username:        cfg.RedisUsername,
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
	}
	if addrs := cfg.sentinelAddrs(); addrs != nil {
		// go-redis's failover client asks the Sentinels for the master,
		// subscribes to their +switch-master events and then closes its
		// connections to the old master, so the next command reaches the
		// new one (and onConnect sees a new run_id).
		opts.Addrs, opts.MasterName = addrs, cfg.RedisMasterName
		opts.SentinelUsername, opts.SentinelPassword = cfg.RedisSentinelUsername, cfg.RedisSentinelPassword
	}
	c.rdb = redis.NewUniversalClient(opts)
	return c
}

// Key is the Redis key of item id.
func (c *Cache) Key(id int64) string {
	return c.prefix + strconv.FormatInt(id, 10)
}

// Get returns the cached body of item id and its version with Hit, or nil with Miss (no
// such key, a tombstone, a value this build did not write for this item, or
// a key of another type, WRONGTYPE, which the next Fill replaces) or Bypass
// (Redis not asked, or it failed, or it may not be read yet: see outages).
// Invalidations missed earlier are done first; until they succeed, Redis
// is not read.
func (c *Cache) Get(ctx context.Context, id int64) (body []byte, version int64, outcome Outcome) {
	if !c.outages.usable() || !c.flushMissed(ctx) {
		return nil, 0, Bypass
	}
	v, err := c.rdb.Get(ctx, c.Key(id)).Bytes()
	switch {
	case err == nil || err == redis.Nil: // not errors.Is: a failed Sentinel lookup wraps redis.Nil
		c.outages.ok()
		if !c.outages.readable() {
			// The GET was the first on a new connection to a restarted
			// Redis, or the first after an outage, before the relay has
			// brought Redis up to date with the outbox.
			return nil, 0, Bypass
		}
		if err == redis.Nil {
			return nil, 0, Miss
		}
		if body, version, ok := c.body(v, id); ok {
			return body, version, Hit
		}
		return nil, 0, Miss
	case redis.HasErrorPrefix(err, "WRONGTYPE"):
		c.outages.refused("GET", c.Key(id), err)
		return nil, 0, Miss
	}
	c.outages.failed(ctx, "GET", err)
	return nil, 0, Bypass
}

// Fill caches body, the JSON of item id at version, with the TTL, unless
// Redis holds a newer version of it. readStart is when the PostgreSQL read
// of it began: a fill later than fillWindow after that is dropped, since a
// tombstone that would stop it may have expired. A fill whose outcome is
// unknown (a timeout) is remembered as an invalidation, since it may still
// land.
func (c *Cache) Fill(ctx context.Context, id, version int64, body []byte, readStart time.Time) {
	if time.Since(readStart) > c.fillWindow || !c.outages.usable() {
		return
	}
	err := fillScript.Run(ctx, c.rdb, []string{c.Key(id), c.restartKey()}, version, c.value(version, body),
		c.ttl.Milliseconds(), readStart.UnixMilli()).Err()
	switch {
	case err == nil:
		c.outages.ok()
	case isReplyError(err):
		c.outages.refused("fill", c.Key(id), err) // nothing written, e.g. OOM
	default:
		c.outages.remember(id, version+1)
		c.outages.failed(ctx, "fill", err)
	}
}

// Invalidate marks item id's cached value stale: every cached version below
// floor (the version a write just committed, or one more than a deleted
// row's) is replaced by a tombstone. Use a context that outlives the
// request: an invalidation must not be cancelled by a client hanging up.
// If Redis cannot be reached, the invalidation is remembered and done
// before Redis is read again.
func (c *Cache) Invalidate(ctx context.Context, id, floor int64) {
	if !c.outages.allow() {
		c.outages.remember(id, floor)
		return
	}
	if err := c.invalidate(ctx, map[int64]int64{id: floor}); err != nil {
		c.outages.remember(id, floor)
		c.outages.failed(ctx, "invalidate", err)
		return
	}
	c.outages.ok()
}

// Apply does the invalidations of a sweep of the outbox (item id -> floor),
// or fails without asking Redis while it is bypassed.
func (c *Cache) Apply(ctx context.Context, floors map[int64]int64) error {
	if !c.outages.allow() {
		return errCacheBypassed
	}
	if err := c.invalidate(ctx, floors); err != nil {
		c.outages.failed(ctx, "outbox", err)
		return err
	}
	c.outages.ok()
	return nil
}

// unknownVersion is the floor of an invalidation after a write whose
// outcome is unknown (it failed, but may have committed): above any real
// version, so no fill lands until the tombstone expires. 2^53 so that the
// Lua scripts' numbers (doubles) hold it exactly.
const unknownVersion = 1 << 53

// unknownOutcomeTTL is how long the tombstone of a write whose outcome is
// unknown lasts. Such a write may still reach PostgreSQL and commit after
// the client gave up: a closed socket's data is retransmitted for up to
// about 15 minutes (Linux's default net.ipv4.tcp_retries2 = 15, "a
// hypothetical timeout of 924.6 seconds", kernel ip-sysctl documentation),
// and the tombstone must outlive that so no older row is cached meanwhile.
const unknownOutcomeTTL = 20 * time.Minute

// invalidate runs invalidateScript for each id and floor in one pipeline
// and forgets the remembered invalidations they cover. A full Redis
// (noeviction) refuses scripts that write, so refused keys are deleted with
// DEL, which it still accepts. The error is nil only if every key was
// invalidated.
func (c *Cache) invalidate(ctx context.Context, floors map[int64]int64) error {
	cmds := make(map[int64]*redis.Cmd, len(floors))
	// By the script's SHA1 (EVALSHA), and again in full (EVAL, which loads
	// it) where Redis does not know it yet: a restarted or promoted server.
	for _, byHash := range []bool{true, false} {
		pipe := c.rdb.Pipeline()
		for id, floor := range floors {
			if !byHash && !redis.HasErrorPrefix(cmds[id].Err(), "NOSCRIPT") {
				continue
			}
			ttl := c.tombstoneTTL
			if floor >= unknownVersion {
				ttl = unknownOutcomeTTL
			}
			keys, args := []string{c.Key(id)}, []any{floor, ttl.Milliseconds()}
			if byHash {
				cmds[id] = invalidateScript.EvalSha(ctx, pipe, keys, args...)
			} else {
				cmds[id] = invalidateScript.Eval(ctx, pipe, keys, args...)
			}
		}
		if pipe.Len() == 0 {
			break
		}
		if _, err := pipe.Exec(ctx); err != nil && !isReplyError(err) {
			return err
		}
	}
	var refused []string
	for id, cmd := range cmds {
		if err := cmd.Err(); err != nil {
			c.outages.refused("invalidate", c.Key(id), err)
			refused = append(refused, c.Key(id))
		}
	}
	if len(refused) > 0 {
		if err := c.rdb.Del(ctx, refused...).Err(); err != nil {
			return err
		}
	}
	for id, floor := range floors {
		c.outages.forget(id, floor)
	}
	return nil
}

// A cached value is "<version>:<shape>:<crc>:<json>": the row's version;
// the shape that newCache was given (a hash of the item's fields, so that a
// build with other fields never serves this body, nor this build one of
// theirs, even while both share one Redis); the CRC-32C (Castagnoli) of
// "<version>:<shape>:" and the JSON, in 8 lowercase hex digits; and the
// item's JSON exactly as a miss sends it. The checksum lets a hit be
// checked in about a hundred nanoseconds rather than by parsing and
// re-encoding the JSON, and covers the version, which the Lua scripts trust.
// A tombstone is "<version>:".
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// value is the cached value of body, the JSON of an item at version.
func (c *Cache) value(version int64, body []byte) []byte {
	head := fmt.Appendf(nil, "%d:%s:", version, c.shape)
	sum := checksum(head, body)
	return append(append(append(head, sum[:]...), ':'), body...)
}

// checksum is the CRC-32C of head and body, in 8 lowercase hex digits.
func checksum(head, body []byte) [8]byte {
	var sum [4]byte
	var digits [8]byte
	binary.BigEndian.PutUint32(sum[:], crc32.Update(crc32.Checksum(head, castagnoli), castagnoli, body))
	hex.Encode(digits[:], sum[:])
	return digits
}

// body returns the JSON in v, a cached value of item id, and its version, if v is what value
// writes for that item: this shape, a checksum that matches, and JSON that
// begins {"id":<id>,. Anything else but a tombstone (a value written by a
// build with another shape or by another program, cut short, or copied from
// another item's key) is warned about, at most once a minute.
func (c *Cache) body(v []byte, id int64) ([]byte, int64, bool) {
	colon := []byte(":")
	version, rest, ok := bytes.Cut(v, colon)
	if ok && len(rest) == 0 && isDigits(version) {
		return nil, 0, false // a tombstone
	}
	shape, rest, ok2 := bytes.Cut(rest, colon)
	sum, body, ok3 := bytes.Cut(rest, colon)
	if ok && ok2 && ok3 && isDigits(version) && string(shape) == c.shape {
		want := checksum(v[:len(version)+len(shape)+2], body)
		start := append(strconv.AppendInt(append(make([]byte, 0, 32), `{"id":`...), id, 10), ',')
		n, err := strconv.ParseInt(string(version), 10, 64) // no copy: strconv's errors clone their input
		if string(sum) == string(want[:]) && bytes.HasPrefix(body, start) && err == nil {
			return body, n, true
		}
	}
	c.outages.warnRarely("a cached value is not what this service caches for its item (written by a build with other item fields or by another program, cut short, or another item's); reading PostgreSQL and replacing it",
		"key", c.Key(id))
	return nil, 0, false
}

func isDigits(b []byte) bool {
	for _, c := range b {
		if c < '0' || c > '9' {
			return false
		}
	}
	return len(b) > 0
}

// fillScript caches a value unless the key holds a newer one, or the read
// it comes from began before this Redis server was found restarted (its
// tombstones may have been lost with the restart).
// KEYS[1]: the item's key; KEYS[2]: the restart mark (see onConnect).
// ARGV[1]: the version read from PostgreSQL; ARGV[2]: the value; ARGV[3]:
// its TTL in ms; ARGV[4]: when the read began, in Unix ms. A key of
// another type (pcall returns an error table) is replaced.
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

// Ping reports whether Redis answers, for readiness. While the cache is
// bypassed after a failure it reports that failure without asking.
func (c *Cache) Ping(ctx context.Context) error {
	if !c.outages.allow() {
		if last := c.outages.lastErr.Load(); last != nil {
			return fmt.Errorf("%w: %s", errCacheBypassed, *last)
		}
		return errCacheBypassed
	}
	if err := c.rdb.Ping(ctx).Err(); err != nil {
		c.outages.failed(ctx, "PING", err)
		return err
	}
	c.outages.ok()
	return nil
}

var errCacheBypassed = errors.New("redis is being bypassed after a recent failure")

// Close closes the Redis client and its connections.
func (c *Cache) Close() error { return c.rdb.Close() }

// PoolStats are the statistics of go-redis's connection pool.
func (c *Cache) PoolStats() *redis.PoolStats { return c.rdb.PoolStats() }

// isReplyError reports whether Redis answered with an error reply, such as
// OOM when it is full: it is reachable and may still serve reads, so a
// refused SET does not make the cache bypass Redis.
func isReplyError(err error) bool {
	re, ok := err.(redis.Error) // a reply itself, not an error that wraps one (as Sentinel lookups wrap redis.Nil)
	return ok && re != redis.Nil
}
