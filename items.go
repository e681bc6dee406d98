package main

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"expvar"
	"fmt"
	"hash/crc32"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// Items is what the handlers read and write: PostgreSQL behind the cache.
// Reads are cache-aside, with concurrent misses for one item sharing a
// PostgreSQL query (flights); every write invalidates the item's cached
// value after it commits and before it is acknowledged, and records the
// invalidation in the outbox with the change itself (see outbox.go).
type Items struct {
	store   *Store
	cache   *Cache
	flights flights // shared PostgreSQL reads of single items
	relay   *relay

	reads   atomic.Int64 // PostgreSQL queries made for single-item reads
	waiting atomic.Int64 // requests now waiting for such a query
	// outcomes counts the single-item reads by what the cache did.
	outcomes map[Outcome]*atomic.Int64
	// writing counts the writes in flight, that cache invalidation needs
	// to know of, for a shutdown that cuts them off (WaitWrites).
	writing sync.WaitGroup
}

// newItems starts the outbox relay, which runs until the store is closed;
// it returns after the relay's first sweep.
func newItems(store *Store, cache *Cache) *Items {
	s := &Items{store: store, cache: cache, flights: flights{running: map[int64]*flight{}},
		relay:    &relay{store: store, cache: cache},
		outcomes: map[Outcome]*atomic.Int64{Hit: new(atomic.Int64), Miss: new(atomic.Int64), Bypass: new(atomic.Int64)}}
	s.relay.start()
	go s.expireKeys()
	return s
}

// expireKeys deletes expired idempotency keys (Store.ExpireKeys) every
// half IDEMPOTENCY_KEY_TTL, at least once a minute, until the store is
// closed: a key lives at most one and a half TTLs.
func (s *Items) expireKeys() {
	tick := time.NewTicker(min(s.store.keyTTL/2, time.Minute))
	defer tick.Stop()
	for {
		select {
		case <-s.store.stop.Done():
			return
		case <-tick.C:
		}
		if _, err := s.store.ExpireKeys(); err != nil && s.store.stop.Err() == nil {
			s.cache.outages.warnRarely("could not delete expired idempotency keys in PostgreSQL; trying again", "err", err)
		}
	}
}

// itemShape names the JSON of an Item in cached values (see shapeOf).
var itemShape = shapeOf(reflect.TypeFor[Item]())

// shapeOf is a hash of struct type t's fields (their names, types and
// tags), in 8 hex digits. A build whose Item differs (a field added, say)
// caches values of its own shape and takes every other as a miss, so no
// body of another shape is ever served, even while old and new builds share
// one Redis in a rolling update. A change inside a field's own type, or to
// how it is encoded, is not seen: rename the field's type then.
func shapeOf(t reflect.Type) string {
	var fields []string
	for i := range t.NumField() {
		f := t.Field(i)
		fields = append(fields, fmt.Sprintf("%s %s %q", f.Name, f.Type, f.Tag))
	}
	return fmt.Sprintf("%08x", crc32.ChecksumIEEE([]byte(strings.Join(fields, "\n"))))
}

// Get returns the JSON of item id, the version it encodes (its ETag) and
// what the cache contributed: Redis first; on a miss PostgreSQL, then Redis
// is filled. Concurrent misses for the same id share queries (flights).
// Errors: ErrNotFound, ErrUnavailable.
//
// The query runs on one caller's goroutine and is not cancelled when that
// caller's client hangs up, since the others still want its answer; so
// that caller still waits for it, at most DB_QUERY_TIMEOUT.
func (s *Items) Get(ctx context.Context, id int64) ([]byte, int64, Outcome, error) {
	body, version, outcome := s.cache.Get(ctx, id)
	if outcome == Bypass && s.relay.catchUp() {
		// Redis is back after an outage: this request brought it up to
		// date with the outbox, so it may read it now.
		body, version, outcome = s.cache.Get(ctx, id)
	}
	s.outcomes[outcome].Add(1)
	if outcome == Hit {
		return body, version, Hit, nil
	}
	s.waiting.Add(1)
	defer s.waiting.Add(-1)
	shared := context.WithoutCancel(ctx)
	fl := s.flights.do(id, func(fl *flight) { fl.body, fl.version, fl.err = s.read(shared, id, outcome == Miss) })
	return fl.body, fl.version, outcome, fl.err
}

// flights shares PostgreSQL reads of an item among the requests for it,
// but a request shares only a read that began after it arrived, so that
// the read sees every write acknowledged before the request, by any
// replica. (Sharing a read already running, as singleflight does, would
// serve a request that comes after a write the row from before it: this
// replica knows of its own writes, but not of another replica's.) The
// requests that arrive while a read of the item runs wait for it to end,
// then share the next read, which the first of them runs: at most one
// query per item at a time, and a wait of at most two.
type flights struct {
	mu      sync.Mutex
	running map[int64]*flight // item id -> its read now running, or about to run
}

type flight struct {
	done    chan struct{} // closed when the read has set body, version and err
	body    []byte
	version int64
	err     error
	next    *flight // the read that requests arriving during this one share
}

// do returns a flight whose read began after do was called, shared with
// other callers for id, once read has filled it in.
func (f *flights) do(id int64, read func(*flight)) *flight {
	f.mu.Lock()
	cur := f.running[id]
	if cur == nil {
		cur = &flight{done: make(chan struct{})}
		f.running[id] = cur
		f.mu.Unlock()
		f.lead(id, cur, read)
		return cur
	}
	next, first := cur.next, cur.next == nil
	if first {
		next = &flight{done: make(chan struct{})}
		cur.next = next
	}
	f.mu.Unlock()
	if first {
		<-cur.done // lead has made next the running read
		f.lead(id, next, read)
	}
	<-next.done
	return next
}

// lead runs read for fl, the running flight of id, then makes the next
// one (if requests are waiting for it) the running one.
func (f *flights) lead(id int64, fl *flight, read func(*flight)) {
	defer close(fl.done)
	read(fl)
	f.mu.Lock()
	defer f.mu.Unlock()
	if fl.next != nil {
		f.running[id] = fl.next
	} else {
		delete(f.running, id)
	}
}

// read is one PostgreSQL read of an item, and the cache fill if asked: the
// item's JSON and version.
func (s *Items) read(ctx context.Context, id int64, fill bool) ([]byte, int64, error) {
	start := time.Now()
	s.reads.Add(1)
	it, err := s.store.Get(ctx, id)
	if err != nil {
		return nil, 0, err
	}
	body, err := json.Marshal(it)
	if err != nil {
		return nil, 0, err
	}
	if fill {
		s.cache.Fill(ctx, id, it.Version, body, start)
	}
	return body, it.Version, nil
}

// Create stores a new item from in. Nothing is cached: ids are never
// reused, so no entry can exist for it, and its first GET is a MISS.
// Errors: *InvalidError, ErrUnavailable.
func (s *Items) Create(ctx context.Context, in Input) (Item, error) {
	if err := in.check(0, true); err != nil {
		return Item{}, err
	}
	return s.store.Create(ctx, in.item(0))
}

// CreateOnce is Create under idempotency key key (see Store.CreateOnce):
// respond makes the response recorded with the key, which a retry of the
// same request gets again, with replayed set. The request is in: two
// requests are the same if they make the same item, whatever their JSON's
// spacing, key order or an explicit "description": null. Errors:
// *InvalidError, ErrKeyInUse, ErrKeyReused, ErrUnavailable.
func (s *Items) CreateOnce(ctx context.Context, in Input, key string, respond func(Item) (Response, error)) (res Response, replayed bool, err error) {
	if err := in.check(0, true); err != nil {
		return Response{}, false, err
	}
	it := in.item(0)
	canonical, err := json.Marshal(it)
	if err != nil {
		return Response{}, false, err
	}
	fingerprint := sha256.Sum256(append([]byte("POST /items\n"), canonical...))
	return s.store.CreateOnce(ctx, key, fingerprint[:], it, respond)
}

// List returns a page of items in id order, from PostgreSQL.
func (s *Items) List(ctx context.Context, after int64, limit int) ([]Item, error) {
	return s.store.List(ctx, after, limit)
}

// Replace sets every field of item id from in (one left out becomes null),
// if its version is one that ifMatch lists (nil: any). Errors:
// *InvalidError, ErrNotFound, *PreconditionError, ErrUnavailable.
func (s *Items) Replace(ctx context.Context, id int64, in Input, ifMatch []int64) (Item, error) {
	if err := in.check(id, true); err != nil {
		return Item{}, err
	}
	s.writing.Add(1)
	defer s.writing.Done()
	it, err := s.store.Replace(ctx, in.item(id), ifMatch)
	s.written(ctx, id, it.Version, err)
	return it, err
}

// Patch changes the fields that in gives (RFC 7396). Errors as Replace.
func (s *Items) Patch(ctx context.Context, id int64, in Input, ifMatch []int64) (Item, error) {
	if err := in.check(id, false); err != nil {
		return Item{}, err
	}
	s.writing.Add(1)
	defer s.writing.Done()
	it, err := s.store.Patch(ctx, id, in, ifMatch)
	s.written(ctx, id, it.Version, err)
	return it, err
}

// Delete deletes item id, under ifMatch as Replace. Errors: ErrNotFound,
// *PreconditionError, ErrUnavailable.
func (s *Items) Delete(ctx context.Context, id int64, ifMatch []int64) error {
	s.writing.Add(1)
	defer s.writing.Done()
	version, err := s.store.Delete(ctx, id, ifMatch)
	s.written(ctx, id, version+1, err)
	return err
}

// written invalidates item id after a write: its cached versions below
// floor become stale. It runs even if the client has gone: the write has
// happened. If Redis cannot be reached, the outbox row that the write
// committed with it reaches Redis through any replica's relay (outbox.go).
func (s *Items) written(ctx context.Context, id, floor int64, err error) {
	switch {
	case err == nil:
	case Unchanged(err):
		return // the cached value is still the item's
	default:
		floor = unknownVersion // it may have committed
	}
	s.cache.Invalidate(context.WithoutCancel(ctx), id, floor)
}

// WaitWrites waits, for at most d, for the writes in flight to return and
// invalidate their items: after Store.Cut, at a shutdown that ran out of
// time, so that none is left unseen when the process exits.
func (s *Items) WaitWrites(d time.Duration) {
	done := make(chan struct{})
	go func() {
		s.writing.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(d):
	}
}

// Ready reports whether PostgreSQL answers and accepts writes, and whether
// Redis answers, for readiness. postgres wraps ErrReadOnly if PostgreSQL
// answers but accepts no writes.
func (s *Items) Ready(ctx context.Context) (postgres, redis error) {
	if postgres = s.store.Writable(ctx); postgres != nil && ctx.Err() != nil {
		return postgres, nil // the client is gone
	}
	return postgres, s.cache.Ping(ctx)
}

// counter is one of the service's counters, as GET /debug/vars (under
// its name) and GET /metrics (as items_<name>, with _total unless it is a
// gauge) show it. They are kept per Items rather than published globally,
// so that several servers in one process (the tests) do not share them.
type counter struct {
	name, help string
	gauge      bool // a level that goes up and down, not a count
	value      *atomic.Int64
}

// counters lists the service's counters, in the order /metrics shows them.
func (s *Items) counters() []counter {
	return []counter{
		{name: "cache_hits", help: "Single-item reads served from Redis.", value: s.outcomes[Hit]},
		{name: "cache_misses", help: "Single-item reads that found nothing in Redis and read PostgreSQL (then filled Redis, if PostgreSQL answered).", value: s.outcomes[Miss]},
		{name: "cache_bypasses", help: "Single-item reads that skipped Redis (down, held or quarantined) and read PostgreSQL.", value: s.outcomes[Bypass]},
		{name: "redis_errors", help: "Redis commands that failed or were refused.", value: &s.cache.outages.errors},
		{name: "postgres_errors", help: "PostgreSQL queries that failed, not counting not found.", value: &s.store.errors},
		{name: "postgres_retries", help: "PostgreSQL statements run again after a stale plan or a dead connection.", value: &s.store.retries},
		// A figure that keeps growing means connections are being lost.
		{name: "postgres_connects", help: "PostgreSQL connections made, by both pools.", value: &s.store.connects},
		// Fewer than misses and bypasses when concurrent reads share a query.
		{name: "postgres_item_reads", help: "PostgreSQL queries made for single-item reads after a miss or a bypass.", value: &s.reads},
		{name: "waiting_for_item_reads", help: "Requests now waiting for a single-item PostgreSQL query.", gauge: true, value: &s.waiting},
		{name: "outbox_applied", help: "Outbox rows this replica's relay applied to Redis.", value: &s.relay.applied},
	}
}

// Vars are the counters for GET /debug/vars, by name.
func (s *Items) Vars() *expvar.Map {
	m := new(expvar.Map)
	for _, c := range s.counters() {
		m.Set(c.name, expvar.Func(func() any { return c.value.Load() }))
	}
	return m
}

// Limits on an item's fields, in characters (Unicode code points), not bytes.
const (
	maxNameChars        = 200
	maxDescriptionChars = 2000
)

// InvalidError is the error of a write whose input breaks the rules: a
// problem per field name.
type InvalidError struct{ Fields map[string]string }

func (e *InvalidError) Error() string {
	var msgs []string
	for field, problem := range e.Fields {
		msgs = append(msgs, field+" "+problem)
	}
	slices.Sort(msgs)
	return "invalid item: " + strings.Join(msgs, "; ")
}

// check returns an *InvalidError with one problem per invalid field of in,
// or nil. pathID is the id in the URL, or 0 for a POST. whole is true for a
// POST or PUT, which give every field (one left out or null is null), and
// false for a PATCH, which keeps the fields it leaves out.
func (in Input) check(pathID int64, whole bool) error {
	problems := map[string]string{}
	switch id := in.ID; {
	case id.Value == nil && (whole || !id.Set):
	case id.Value == nil:
		problems["id"] = "cannot be removed"
	case pathID == 0:
		problems["id"] = "is assigned by the server; leave it out"
	case *id.Value != pathID:
		problems["id"] = fmt.Sprintf("must be %d, the id in the URL, or left out: an item's id never changes", pathID)
	}
	switch name := in.Name; {
	case whole && name.Value == nil:
		problems["name"] = "is required"
	case name.Set && name.Value == nil:
		problems["name"] = "cannot be removed (null): an item always has a name; leave name out to keep it"
	case name.Set && strings.TrimSpace(*name.Value) == "":
		problems["name"] = "must not be blank"
	case name.Set:
		checkText(problems, "name", *name.Value, maxNameChars)
	}
	if in.Description.Value != nil {
		checkText(problems, "description", *in.Description.Value, maxDescriptionChars)
	}
	if len(problems) > 0 {
		return &InvalidError{Fields: problems}
	}
	return nil
}

// checkText records a problem if s is longer than limit characters or holds
// a NUL character, which PostgreSQL text cannot store.
func checkText(problems map[string]string, field, s string, limit int) {
	if n := utf8.RuneCountInString(s); n > limit {
		problems[field] = fmt.Sprintf("must be at most %d characters (got %d)", limit, n)
	} else if strings.ContainsRune(s, 0) {
		problems[field] = `must not contain the NUL character (\u0000)`
	}
}
