package main

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
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

// Cache is the cache-aside layer: item JSON bodies in Redis under
// prefix+id, each with a TTL. Redis is optional. Every Redis error is
// logged and then skipped: it never fails a request. After a failure the
// cache is bypassed for the retry interval; then a single request probes
// Redis again, so a hung Redis costs one timeout per interval rather than
// one per request (the circuit-breaker pattern). An outage is logged once
// when it starts and once when it ends.
type Cache struct {
	rdb    *redis.Client
	prefix string
	ttl    time.Duration
	retry  time.Duration
	log    *slog.Logger

	// downUntil is zero while Redis is healthy; otherwise the Unix time in
	// nanoseconds before which Redis is not asked.
	downUntil atomic.Int64
	// lastRejectLog is when a refused command was last logged (Unix ns).
	lastRejectLog atomic.Int64
}

// newCache makes a Redis client that fails fast: REDIS_TIMEOUT for dial,
// read, write and pool wait, one dial attempt and no command retries.
// It does not connect; Redis may be absent at startup and appear later.
func newCache(cfg Config, log *slog.Logger) *Cache {
	quietRedisOnce.Do(func() { redis.SetLogger(discardLogger{}) })
	rdb := redis.NewClient(&redis.Options{
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
	})
	return &Cache{rdb: rdb, prefix: cfg.CacheKeyPrefix, ttl: cfg.CacheTTL, retry: cfg.RedisRetry, log: log}
}

// Key is the Redis key of item id.
func (c *Cache) Key(id int64) string {
	return c.prefix + strconv.FormatInt(id, 10)
}

// Get returns the cached body of item id with Hit, or nil with Miss (no
// such key, or a key of another type, WRONGTYPE, which the next Set
// replaces) or Bypass (Redis not asked, or it failed).
func (c *Cache) Get(ctx context.Context, id int64) ([]byte, Outcome) {
	if !c.allow() {
		return nil, Bypass
	}
	b, err := c.rdb.Get(ctx, c.Key(id)).Bytes()
	switch {
	case err == nil:
		c.ok()
		return b, Hit
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

// Set stores body as item id's cached value with the TTL, replacing
// whatever the key held. A failure is logged and skipped.
func (c *Cache) Set(ctx context.Context, id int64, body []byte) {
	if !c.allow() {
		return
	}
	err := c.rdb.Set(ctx, c.Key(id), body, c.ttl).Err()
	switch {
	case err == nil:
		c.ok()
	case isReplyError(err):
		c.rejected("SET", c.Key(id), err)
	default:
		c.failed(ctx, "SET", err)
	}
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

// rejectLogInterval bounds the log to one line per interval about commands
// Redis refuses, so that a full Redis (every SET refused) does not flood it.
const rejectLogInterval = time.Minute

func (c *Cache) rejected(op, key string, err error) {
	now := time.Now().UnixNano()
	last := c.lastRejectLog.Load()
	if now-last >= int64(rejectLogInterval) && c.lastRejectLog.CompareAndSwap(last, now) {
		c.log.Warn("redis refused a command; carrying on without the cache for it (logged at most once a minute)",
			"op", op, "key", key, "err", err)
	}
}

func (c *Cache) failed(ctx context.Context, op string, err error) {
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
