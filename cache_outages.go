package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// outages keeps the cache's books on Redis failures, so that Get, Fill and
// Invalidate stay simple. It has four parts:
//
//   - The circuit breaker (allow, ok, failed): after a failure, Redis is
//     bypassed for REDIS_RETRY_INTERVAL; then one request probes it, so a
//     hung Redis costs one timeout per interval rather than one per
//     request. An outage is logged once when it starts and once when it ends.
//   - Remembered invalidations (remember, forget, Cache.flushMissed): an
//     invalidation that cannot reach Redis is kept, and the kept ones are
//     done before Redis is read again, so an entry that a write could not
//     remove is never served later. If more than maxMissed pile up, they are
//     dropped, and once Redis is back it is quarantined for a TTL, after
//     which every entry written before the outage has expired.
//   - The restart mark and quarantine (Cache.onConnect, quarantined): a
//     Redis that restarted with data is not read or filled until that data
//     has expired, and fills from reads that began before any restart was
//     noticed are dropped, since the restart may have lost their tombstones.
//   - A bound on warnings about commands Redis refuses and values it should
//     not hold (refused, warnRarely): one a minute.
type outages struct {
	log       *slog.Logger
	addr      string
	sentinels bool          // Redis is found through Sentinel
	master    string        // REDIS_MASTER_NAME
	retry     time.Duration // REDIS_RETRY_INTERVAL
	ttl       time.Duration // CACHE_TTL
	maxMissed int

	downUntil       atomic.Int64 // zero while Redis is healthy; else when it may be asked again, Unix ns
	quarantineUntil atomic.Int64 // Unix ns
	// heldSince is when Redis was last found possibly behind the outbox
	// (when the relay began, and when Redis came back after an outage),
	// Unix ns; zero once a whole sweep of the outbox begun later has ended.
	heldSince   atomic.Int64
	kick        chan struct{}          // asks the relay to sweep now
	lastWarning atomic.Int64           // when warnRarely last logged, Unix ns
	errors      atomic.Int64           // Redis commands that failed or were refused
	lastErr     atomic.Pointer[string] // the last failure, for /ready

	mu         sync.Mutex
	runID      string          // of the Redis server last connected to
	missed     map[int64]int64 // item id -> the version below which its cached value is stale
	overflowed bool            // more than maxMissed were missed
	nmissed    atomic.Int64    // len(missed), read without the lock by every Get
	flushing   atomic.Bool
}

func newOutages(cfg Config, log *slog.Logger) *outages {
	return &outages{log: log, addr: cfg.redisAddr(), retry: cfg.RedisRetry, ttl: cfg.CacheTTL,
		sentinels: cfg.sentinelAddrs() != nil, master: cfg.RedisMasterName,
		maxMissed: 100_000, missed: map[int64]int64{}, kick: make(chan struct{}, 1)}
}

// allow reports whether Redis may be asked now. While it is down, the first
// caller after the retry interval becomes the probe and pushes the interval
// on for everyone else, so that only it waits on a Redis that may be hung.
func (o *outages) allow() bool {
	until := o.downUntil.Load()
	if until == 0 {
		return true
	}
	now := time.Now().UnixNano()
	if now < until {
		return false
	}
	return o.downUntil.CompareAndSwap(until, now+int64(o.retry))
}

// ok records that Redis answered. After an outage, Redis is not read
// until the relay has applied the outbox, which may hold invalidations
// that no replica could deliver meanwhile.
func (o *outages) ok() {
	if until := o.downUntil.Load(); until != 0 && o.downUntil.CompareAndSwap(until, 0) {
		o.hold()
		o.log.Info("redis is back; cache re-enabled once the outbox is applied", "addr", o.addr)
	}
}

// hold keeps Redis unread until a sweep of the outbox that begins after
// now has ended (release), and asks the relay for one.
func (o *outages) hold() {
	o.heldSince.Store(time.Now().UnixNano())
	select {
	case o.kick <- struct{}{}:
	default:
	}
}

// release ends a hold that began before sweepStart, when a sweep of the
// whole outbox that began then has ended.
func (o *outages) release(sweepStart time.Time) {
	if h := o.heldSince.Load(); h != 0 && h < sweepStart.UnixNano() {
		o.heldSince.CompareAndSwap(h, 0)
	}
}

// readable reports whether a value Redis returned may be served: Redis is
// neither quarantined nor held.
func (o *outages) readable() bool { return !o.held() && !o.quarantined() }

// held reports whether Redis is held (hold) and not yet released.
func (o *outages) held() bool { return o.heldSince.Load() != 0 }

// heldLately reports whether Redis has been held for less than a second:
// just back after an outage, rather than behind a backlog.
func (o *outages) heldLately() bool {
	h := o.heldSince.Load()
	return h != 0 && time.Now().UnixNano()-h < int64(time.Second)
}

// down reports whether Redis failed and has not answered since.
func (o *outages) down() bool { return o.downUntil.Load() != 0 }

// failed records that Redis did not answer op: it is bypassed for the retry
// interval, unless the client went away, which says nothing about Redis.
func (o *outages) failed(ctx context.Context, op string, err error) {
	o.errors.Add(1)
	if o.sentinels && errors.Is(err, redis.Nil) {
		// go-redis's "all sentinels specified in configuration are
		// unreachable: redis: nil": they answered, and know no such master.
		err = fmt.Errorf("the Sentinels answer but name no master %q: check REDIS_MASTER_NAME (%w)", o.master, err)
	}
	msg := err.Error()
	o.lastErr.Store(&msg)
	if ctx.Err() != nil {
		return
	}
	next := time.Now().Add(o.retry).UnixNano()
	for {
		until := o.downUntil.Load()
		if o.downUntil.CompareAndSwap(until, next) {
			if until == 0 {
				o.log.Warn("redis unavailable; serving from PostgreSQL and retrying", "addr", o.addr,
					"op", op, "retry_every", o.retry, "err", err)
			} else {
				o.log.Debug("redis still unavailable", "op", op, "err", err)
			}
			return
		}
	}
}

// refused records that Redis answered op on key with an error reply (OOM
// when full, WRONGTYPE): it is up, and only this command failed.
func (o *outages) refused(op, key string, err error) {
	o.errors.Add(1)
	o.warnRarely("redis refused a command; carrying on without the cache for it", "op", op, "key", key, "err", err)
}

// warnRarely logs a warning unless one was logged less than a minute ago,
// so that a full Redis (every SET refused) or a key another program keeps
// rewriting does not flood the log.
func (o *outages) warnRarely(msg string, args ...any) {
	now := time.Now().UnixNano()
	last := o.lastWarning.Load()
	if now-last >= int64(time.Minute) && o.lastWarning.CompareAndSwap(last, now) {
		o.log.Warn(msg+" (such warnings are logged at most once a minute)", args...)
	}
}

// usable reports whether Redis may be read or filled now.
func (o *outages) usable() bool { return !o.quarantined() && o.allow() }

// quarantined reports whether Redis must not be read or filled now: after
// a restart with data, or an outage that missed more invalidations than
// could be remembered.
func (o *outages) quarantined() bool {
	until := o.quarantineUntil.Load()
	return until != 0 && time.Now().UnixNano() < until
}

// quarantine keeps Redis unread until everything in it now has expired.
func (o *outages) quarantine() {
	o.quarantineUntil.Store(time.Now().Add(o.ttl + o.retry).UnixNano())
}

// remember records an invalidation to do before Redis is read again.
func (o *outages) remember(id, floor int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.overflowed {
		return
	}
	if _, ok := o.missed[id]; !ok && len(o.missed) >= o.maxMissed {
		o.log.Warn("too many invalidations missed while Redis was unreachable; once it is back it will not be read for one CACHE_TTL",
			"max", o.maxMissed, "cache_ttl", o.ttl)
		o.overflowed = true
		o.missed = map[int64]int64{}
		o.nmissed.Store(1)
		return
	}
	o.missed[id] = max(o.missed[id], floor)
	o.nmissed.Store(int64(len(o.missed)))
}

// forget drops a remembered invalidation that one at floor has covered.
func (o *outages) forget(id, floor int64) {
	if o.nmissed.Load() == 0 {
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if f, ok := o.missed[id]; ok && f <= floor {
		delete(o.missed, id)
		o.nmissed.Store(int64(len(o.missed)))
	}
}

// flushMissed does the remembered invalidations, and reports whether none
// is left, so that Redis may be read. Only one request flushes at a time;
// the others bypass Redis meanwhile.
func (c *Cache) flushMissed(ctx context.Context) bool {
	o := c.outages
	if o.nmissed.Load() == 0 {
		return true
	}
	if !o.flushing.CompareAndSwap(false, true) {
		return false
	}
	defer o.flushing.Store(false)
	o.mu.Lock()
	overflowed := o.overflowed
	const maxBatch = 1000 // keys per pipeline
	batch := make(map[int64]int64, min(len(o.missed), maxBatch))
	for id, floor := range o.missed {
		if len(batch) == maxBatch {
			break
		}
		batch[id] = floor
	}
	o.mu.Unlock()

	if overflowed {
		if err := c.rdb.Ping(ctx).Err(); err != nil {
			o.failed(ctx, "PING", err)
			return false
		}
		o.mu.Lock()
		o.overflowed = false
		o.nmissed.Store(int64(len(o.missed)))
		o.mu.Unlock()
		o.quarantine()
		o.log.Warn("redis is back, but not read until every entry from before the outage has expired",
			"for", o.ttl+o.retry)
		return false
	}
	if err := c.invalidate(ctx, batch); err != nil {
		o.failed(ctx, "invalidate", err)
		return false
	}
	o.ok()
	return o.nmissed.Load() == 0
}

// checkPermissions runs, in one pipeline, every command the cache uses,
// on a key of its own (prefix+"probe", deleted at the end), and returns an
// error naming those that the Redis user may not run (its ACL, or a
// managed Redis, withholds them), or nil. infoErr is INFO's. Without any
// of them the cache cannot keep its promises (INFO, DBSIZE and EXISTS
// notice a restarted Redis; the scripts need GET and SET), so the
// connection fails: Redis is bypassed, and the error is logged and shown
// by /ready until the permissions are granted, then the cache is back by
// itself within REDIS_RETRY_INTERVAL. docs/scaling.md lists the commands.
func (c *Cache) checkPermissions(ctx context.Context, cn *redis.Conn, infoErr error) error {
	key := c.prefix + "probe"
	pipe := cn.Pipeline()
	cmds := []struct {
		name string
		cmd  redis.Cmder
	}{
		{"get", pipe.Get(ctx, key)},
		{"exists", pipe.Exists(ctx, key)},
		{"dbsize", pipe.DBSize(ctx)},
		{"evalsha", invalidateScript.EvalSha(ctx, pipe, []string{key}, 0, 1000)},
		{"eval (running get and set)", invalidateScript.Eval(ctx, pipe, []string{key}, 1, 1000)},
		{"set", pipe.Set(ctx, key, "0:", time.Second)},
		{"del", pipe.Del(ctx, key)},
		{"ping", pipe.Ping(ctx)},
	}
	if _, err := pipe.Exec(ctx); err != nil && err != redis.Nil && !isReplyError(err) { // GET's nil: no such key
		return err
	}
	var missing []string
	if infoErr != nil {
		missing = append(missing, "info")
	}
	for _, cmd := range cmds {
		if denied(cmd.cmd.Err()) {
			missing = append(missing, cmd.name)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	return fmt.Errorf("the Redis user may not run %s, which the cache needs; grant them (ACL SETUSER <user> +get +set +del +exists +dbsize +eval +evalsha +info +ping ~%s*): Redis is bypassed until then",
		strings.Join(missing, ", "), c.prefix)
}

// denied reports whether err is Redis refusing a command to this user
// (ACL): NOPERM, or a script's "can't run this command" (Redis 7).
func denied(err error) bool {
	return err != nil && (redis.HasErrorPrefix(err, "NOPERM") || strings.Contains(err.Error(), "can't run this command"))
}

// restartKey is the key of the restart mark, beside the items' keys.
func (c *Cache) restartKey() string { return c.prefix + "restarted" }

// onConnect runs on every new connection to Redis. A Redis that restarted
// (its run_id changed) and holds keys has reloaded them from disk or from
// another server: they may predate invalidations it had received, so it is
// quarantined. go-redis drops dead pooled connections quietly, so this is
// how a restart between two requests is noticed.
func (c *Cache) onConnect(ctx context.Context, cn *redis.Conn) error {
	o := c.outages
	info, err := cn.Info(ctx, "server").Result()
	if err != nil && !denied(err) {
		return err
	}
	if strings.Contains(info, "redis_mode:sentinel") {
		// go-redis's failover client runs OnConnect on its connections to
		// the Sentinels too (FailoverOptions.sentinelOptions); only the
		// master's run_id says whether the cache restarted.
		return nil
	}
	if err := c.checkPermissions(ctx, cn, err); err != nil {
		return err
	}
	_, runID, _ := strings.Cut(info, "run_id:")
	runID, _, _ = strings.Cut(runID, "\r\n")
	o.mu.Lock()
	previous := o.runID
	if previous == "" {
		o.runID = runID
	}
	o.mu.Unlock()
	if previous == runID {
		return nil
	}
	// Decide before any command runs on this connection; other new
	// connections decide the same until runID is updated below. Reads that
	// began before now may have been overtaken by writes whose tombstones
	// the restart lost: the mark stops their fills (fillScript). The first
	// replica to notice this restart decides whether it came back with
	// data, and the others take its verdict: they would find the keys it
	// has filled since. A replica's first connection (previous == "") has
	// no run_id to compare but the one this deployment last saw (in Redis);
	// it takes a verdict if there is one, and vouches for an empty server,
	// so that replicas noticing the restart later do not take its own fills
	// for data from before.
	first := "0"
	if previous == "" {
		first = "1"
	}
	now := time.Now()
	until, err := restartScript.Run(ctx, cn, []string{c.restartKey(), c.restartKey() + ":" + runID, c.prefix + "server"},
		now.UnixMilli(), (o.ttl + o.retry).Milliseconds(), c.tombstoneTTL.Milliseconds(), first, runID).Int64()
	if err != nil && (previous != "" || !isReplyError(err)) {
		return err // a first connection to a full Redis (OOM) only leaves no verdict
	}
	quarantined := until > now.UnixMilli()
	if quarantined {
		o.quarantineUntil.Store(time.UnixMilli(until).UnixNano())
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.runID != runID || previous == "" {
		o.runID = runID
		if quarantined {
			o.log.Warn("redis restarted with data it may have reloaded from before invalidations; not read until it has expired",
				"addr", o.addr, "until", time.UnixMilli(until))
		}
	}
	return nil
}

// restartScript records, for a Redis server found restarted, when it was
// noticed (the restart mark, which fillScript reads) and, once per server
// run, whether it holds data from before: then it is quarantined until a
// time every replica takes. It also keeps, without a TTL, the run_id of the
// server that this deployment's replicas last saw: a replica's first
// connection (which has no run_id of its own to compare) takes a different
// one for a restart, as a Redis that reloaded its data from disk or was
// promoted by Sentinel carries the old server's. KEYS[1]: the restart mark;
// KEYS[2]: the verdict for this run_id; KEYS[3]: the run_id last seen.
// ARGV[1]: now, Unix ms; ARGV[2]: the quarantine, ms; ARGV[3]: how long the
// mark lives, ms (the verdict lives as long as the quarantine, and at least
// that); ARGV[4]: "1" on a replica's first connection, else "0" (this
// replica saw the run_id change); ARGV[5]: the run_id. A verdict that has
// expired for a run_id already seen means any quarantine has ended. Returns
// the end of the quarantine, Unix ms, or 0.
var restartScript = redis.NewScript(`
local seen = redis.call('GET', KEYS[3])
local restarted = ARGV[4] == '0' or (seen and seen ~= ARGV[5])
local first = restarted and seen ~= ARGV[5] -- the first replica to notice this run
local q = redis.call('GET', KEYS[2])
if not q then
  q = 0
  local keys = redis.call('DBSIZE') - redis.call('EXISTS', KEYS[1]) - redis.call('EXISTS', KEYS[3])
  if first and keys > 0 then q = tonumber(ARGV[1]) + tonumber(ARGV[2]) end
  if first or keys == 0 then
    redis.call('SET', KEYS[2], q, 'PX', math.max(tonumber(ARGV[2]), tonumber(ARGV[3])))
  end
end
redis.call('SET', KEYS[3], ARGV[5])
if restarted then
  local at = tonumber(redis.call('GET', KEYS[1]))
  if not at or at < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3]) end
end
return tonumber(q)`)

// quietRedisOnce silences go-redis's own (process-wide) logger, which
// prints every failed dial to stderr: a flood during an outage. The cache
// logs failures itself, once per outage.
var quietRedisOnce sync.Once

type discardLogger struct{}

func (discardLogger) Printf(context.Context, string, ...any) {}
