package main

import (
	"context"
	"encoding/json"
	"expvar"
	"fmt"
	"hash/crc32"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"golang.org/x/sync/singleflight"
)

// Items is what the handlers read and write: PostgreSQL behind the cache.
// Reads are cache-aside, with concurrent misses for one item sharing a
// single PostgreSQL query (singleflight); every write invalidates the
// item's cached value after it commits and before it is acknowledged.
type Items struct {
	store   *Store
	cache   *Cache
	flights singleflight.Group // shared PostgreSQL reads, keyed by flightKey
	// writes counts this replica's writes of each item (by id, modulo its
	// length: items that share a count only share reads less), for flightKey.
	writes [1024]atomic.Uint64

	reads   atomic.Int64 // PostgreSQL queries made for single-item reads
	waiting atomic.Int64 // requests now waiting for such a query
	// outcomes counts the single-item reads by what the cache did.
	outcomes map[Outcome]*atomic.Int64
	// writing counts the writes in flight, that cache invalidation needs
	// to know of, for a shutdown that cuts them off (WaitWrites).
	writing sync.WaitGroup
}

func newItems(store *Store, cache *Cache) *Items {
	return &Items{store: store, cache: cache,
		outcomes: map[Outcome]*atomic.Int64{Hit: new(atomic.Int64), Miss: new(atomic.Int64), Bypass: new(atomic.Int64)}}
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

// Get returns the JSON of item id and what the cache contributed: Redis
// first; on a miss PostgreSQL, then Redis is filled. Concurrent misses for
// the same id wait for one query. Errors: ErrNotFound, ErrUnavailable.
//
// The query runs on the first caller's goroutine and is not cancelled when
// that caller's client hangs up, since the others still want its answer; so
// that caller still waits for it, at most DB_QUERY_TIMEOUT.
func (s *Items) Get(ctx context.Context, id int64) ([]byte, Outcome, error) {
	body, outcome, seen := s.cache.Get(ctx, id)
	s.outcomes[outcome].Add(1)
	if outcome == Hit {
		return body, Hit, nil
	}
	s.waiting.Add(1)
	defer s.waiting.Add(-1)
	shared := context.WithoutCancel(ctx)
	v, err, _ := s.flights.Do(s.flightKey(id, seen), func() (any, error) {
		return s.read(shared, id, outcome == Miss)
	})
	if err != nil {
		return nil, outcome, err
	}
	return v.([]byte), outcome, nil
}

// read is one PostgreSQL read of an item, and the cache fill if asked.
func (s *Items) read(ctx context.Context, id int64, fill bool) ([]byte, error) {
	start := time.Now()
	s.reads.Add(1)
	it, err := s.store.Get(ctx, id)
	if err != nil {
		return nil, err
	}
	body, err := json.Marshal(it)
	if err != nil {
		return nil, err
	}
	if fill {
		s.cache.Fill(ctx, id, it.Version, body, start)
	}
	return body, nil
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

// List returns a page of items in id order, from PostgreSQL.
func (s *Items) List(ctx context.Context, after int64, limit int) ([]Item, error) {
	return s.store.List(ctx, after, limit)
}

// Replace sets every field of item id from in (one left out becomes null).
// Errors: *InvalidError, ErrNotFound, ErrUnavailable.
func (s *Items) Replace(ctx context.Context, id int64, in Input) (Item, error) {
	if err := in.check(id, true); err != nil {
		return Item{}, err
	}
	s.writing.Add(1)
	defer s.writing.Done()
	it, err := s.store.Replace(ctx, in.item(id))
	s.written(ctx, id, it.Version, err)
	return it, err
}

// Patch changes the fields that in gives (RFC 7396). Errors as Replace.
func (s *Items) Patch(ctx context.Context, id int64, in Input) (Item, error) {
	if err := in.check(id, false); err != nil {
		return Item{}, err
	}
	s.writing.Add(1)
	defer s.writing.Done()
	it, err := s.store.Patch(ctx, id, in)
	s.written(ctx, id, it.Version, err)
	return it, err
}

// Delete deletes item id. Errors: ErrNotFound, ErrUnavailable.
func (s *Items) Delete(ctx context.Context, id int64) error {
	s.writing.Add(1)
	defer s.writing.Done()
	version, err := s.store.Delete(ctx, id)
	s.written(ctx, id, version+1, err)
	return err
}

// written invalidates item id after a write: its cached versions below
// floor become stale. Readers that arrive later must not join a query that
// began before the write (see flightKey). It runs even if the client has
// gone: the write has happened.
func (s *Items) written(ctx context.Context, id, floor int64, err error) {
	switch {
	case err == nil:
	case Unchanged(err):
		return // the cached value is still the item's
	default:
		floor = unknownVersion // it may have committed
	}
	s.cache.Invalidate(context.WithoutCancel(ctx), id, floor)
	s.writes[uint64(id)%uint64(len(s.writes))].Add(1)
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

// flightKey names the shared read of item id by the requests that saw
// version seen of it in Redis (0: none) and the same count of this
// replica's writes of it. A request joins only a read begun after the last
// write it can know of: after every write of this replica, which bumps the
// count, and after a write of another replica whose tombstone it saw.
func (s *Items) flightKey(id, seen int64) string {
	writes := s.writes[uint64(id)%uint64(len(s.writes))].Load()
	return strconv.FormatInt(id, 10) + "@" + strconv.FormatInt(seen, 10) + "." + strconv.FormatUint(writes, 10)
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

// Vars are the counters of GET /debug/vars: cache_hits, cache_misses and
// cache_bypasses (single-item reads by what the cache did), redis_errors
// (commands that failed or were refused), postgres_errors (queries that
// failed, "not found" aside), postgres_retries (statements run again after
// a stale plan or a dead connection: see Store.withConn), postgres_connects
// (connections made: a figure that keeps growing means connections are
// being lost), postgres_item_reads (queries for single-item
// reads after a miss or a bypass: fewer than those when concurrent ones
// share a query) and waiting_for_item_reads (requests waiting on such a
// query now). They are kept per Items rather than published globally, so
// that several servers in one process (the tests) do not share them.
func (s *Items) Vars() *expvar.Map {
	m := new(expvar.Map)
	for name, n := range map[string]*atomic.Int64{
		"cache_hits": s.outcomes[Hit], "cache_misses": s.outcomes[Miss], "cache_bypasses": s.outcomes[Bypass],
		"redis_errors": &s.cache.outages.errors, "postgres_errors": &s.store.errors,
		"postgres_retries": &s.store.retries, "postgres_connects": &s.store.connects,
		"postgres_item_reads": &s.reads, "waiting_for_item_reads": &s.waiting,
	} {
		m.Set(name, expvar.Func(func() any { return n.Load() }))
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
