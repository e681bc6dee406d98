package main

import (
	"context"
	"sync/atomic"
	"time"
)

// relay delivers the transactional outbox to Redis. Every UPDATE and DELETE
// of an item adds, in the same statement, a row with the invalidation it
// owes the cache (Store.Replace, Patch, Delete); the replica that wrote it
// invalidates Redis itself before answering, and the relay of every
// replica applies the rows to Redis and deletes them, every
// OUTBOX_POLL_INTERVAL. So an invalidation that its writer could not
// deliver (Redis unreachable from that replica, or the process killed
// between the commit and the invalidation) reaches Redis through any
// replica that can reach it, within about one interval, and is never lost
// with a process. Applying a row twice is harmless: an invalidation
// replaces only older versions (invalidateScript).
//
// It polls rather than LISTENs: a notification is lost while the listener
// is disconnected, does not pass PgBouncer in transaction mode, and would
// make each write's commit take NOTIFY's global lock; a poll of an outbox
// that is empty, or a page of rows, costs one short transaction
// (docs/performance.md has the figures).
//
// A relay also guards reads: while Redis may be behind the outbox (when
// the relay starts, and whenever Redis comes back after an outage), the
// cache serves no value from Redis until a sweep of the whole outbox has
// ended (outages.hold).
type relay struct {
	store    *Store
	cache    *Cache
	applied  atomic.Int64 // outbox rows this replica's relay applied to Redis
	catching atomic.Bool  // a request is sweeping (catchUp)
}

// outboxPage is the most rows one sweep transaction takes.
const outboxPage = 1000

// start holds the cache, so that no request reads Redis before a sweep,
// sweeps a page (an empty outbox, as usual, ends the hold before the
// replica listens), and then sweeps every OUTBOX_POLL_INTERVAL and whenever
// the cache asks, until the store is closed.
func (r *relay) start() {
	r.cache.outages.hold()
	r.sweep(1)
	go func() {
		tick := time.NewTicker(r.store.outboxInterval)
		defer tick.Stop()
		for {
			select {
			case <-r.store.stop.Done():
				return
			case <-tick.C:
			case <-r.cache.outages.kick:
			}
			r.sweep(0)
		}
	}()
}

// catchUp sweeps a page for a request that found the cache held within
// the last second, unless another request is doing so, and reports whether
// the hold has ended: the first request after Redis comes back reads it,
// rather than waiting for the relay's next turn, and waits for one page at
// most (a longer hold is a backlog, the relay's to drain).
func (r *relay) catchUp() bool {
	if !r.cache.outages.heldLately() || !r.catching.CompareAndSwap(false, true) {
		return false
	}
	defer r.catching.Store(false)
	r.sweep(1)
	return !r.cache.outages.held()
}

// sweep applies the outbox to Redis, at most pages pages of it (0: all),
// and if it reached the end, ends any hold on reading Redis that began
// before it. While the cache is held, it waits for rows other replicas'
// relays hold, rather than skipping them, so that reaching the end means
// that every row committed before it has been applied. While this replica
// finds Redis down it takes no rows, which the other relays would then
// skip: requests probe Redis (outages.allow), and its return asks for a
// sweep.
func (r *relay) sweep(pages int) {
	if r.cache.outages.down() {
		return
	}
	start := time.Now()
	wait := r.cache.outages.held()
	for page := 1; ; page++ {
		var redisErr error // the cache logs its own failures
		n, err := r.store.SweepOutbox(outboxPage, wait, func(ctx context.Context, floors map[int64]int64) error {
			redisErr = r.cache.Apply(ctx, floors)
			return redisErr
		})
		if err != nil {
			if redisErr == nil && r.store.stop.Err() == nil {
				r.cache.outages.warnRarely("could not sweep the cache outbox in PostgreSQL (unreachable, or its rows held by another replica's sweep); trying again", "err", err)
			}
			return
		}
		r.applied.Add(int64(n))
		if n < outboxPage {
			r.cache.outages.release(start)
			return
		}
		if page == pages {
			return
		}
	}
}
