package main

import (
	"context"
	"encoding/json"
	"errors"
	"expvar"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgconn"
	"golang.org/x/sync/singleflight"
)

// Item is one row of the items table and the JSON shape of every item
// response: {"id":1,"name":"...","description":"..." or null}. Version counts
// the row's writes (schema.sql); it is not part of the API.
type Item struct {
	ID          int64   `json:"id"`
	Name        string  `json:"name"`
	Description *string `json:"description"`
	Version     int64   `json:"-"`
}

// Limits on an item's fields, in characters (Unicode code points), not bytes.
const (
	maxNameChars        = 200
	maxDescriptionChars = 2000
)

// Items is what the handlers read and write: PostgreSQL behind the cache.
// Reads are cache-aside, with concurrent misses for one item sharing a
// single PostgreSQL query (singleflight); every write invalidates the
// item's cached value after it commits and before it is acknowledged.
type Items struct {
	store   *Store
	cache   *Cache
	flights singleflight.Group // keyed by the id in decimal

	reads   atomic.Int64 // PostgreSQL queries made for single-item reads
	waiting atomic.Int64 // requests now waiting for such a query
	// outcomes counts the single-item reads by what the cache did.
	hits, misses, bypasses atomic.Int64
}

// vars are the service's counters, for GET /debug/vars (expvar).
func (s *Items) vars() *expvar.Map {
	m := new(expvar.Map)
	for name, n := range map[string]*atomic.Int64{
		"cache_hits": &s.hits, "cache_misses": &s.misses, "cache_bypasses": &s.bypasses,
		"redis_errors": &s.cache.errors, "postgres_errors": &s.store.errors,
		"postgres_item_reads": &s.reads, "waiting_for_item_reads": &s.waiting,
	} {
		m.Set(name, expvar.Func(func() any { return n.Load() }))
	}
	return m
}

func (s *Items) count(o Outcome) {
	switch o {
	case Hit:
		s.hits.Add(1)
	case Miss:
		s.misses.Add(1)
	default:
		s.bypasses.Add(1)
	}
}

func newItems(store *Store, cache *Cache) *Items {
	return &Items{store: store, cache: cache}
}

// Get returns the JSON of item id and what the cache contributed: Redis
// first; on a miss PostgreSQL, then Redis is filled. Concurrent misses for
// the same id wait for one query. Errors: ErrNotFound, ErrUnavailable.
//
// The query runs on the first caller's goroutine (singleflight's Do, not
// DoChan: a goroutine per query would start with a small stack and spend a
// tenth of a read's CPU growing it into pgx's). So a caller whose client
// has hung up still waits for the query, at most DB_QUERY_TIMEOUT.
func (s *Items) Get(ctx context.Context, id int64) ([]byte, Outcome, error) {
	body, outcome := s.cache.Get(ctx, id)
	s.count(outcome)
	if outcome == Hit {
		return body, Hit, nil
	}
	fill := outcome == Miss
	s.waiting.Add(1)
	defer s.waiting.Add(-1)
	// The query is shared, so one caller hanging up must not cancel it for
	// the others; it is still bounded by DB_QUERY_TIMEOUT.
	shared := context.WithoutCancel(ctx)
	v, err, _ := s.flights.Do(strconv.FormatInt(id, 10), func() (any, error) {
		return s.read(shared, id, fill)
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
	it, err := s.store.GetItem(ctx, id)
	if err != nil {
		return nil, err
	}
	body, err := json.Marshal(it)
	if err != nil {
		return nil, err
	}
	if fill {
		s.cache.Fill(ctx, it, body, start)
	}
	return body, nil
}

// Create stores a new item. Nothing is cached: ids are never reused, so no
// entry can exist for it, and its first GET is a MISS.
func (s *Items) Create(ctx context.Context, name string, description *string) (Item, error) {
	return s.store.CreateItem(ctx, name, description)
}

// List returns a page of items in id order, from PostgreSQL.
func (s *Items) List(ctx context.Context, after int64, limit int) ([]Item, error) {
	return s.store.ListItems(ctx, after, limit)
}

// Replace sets both fields of item id; errors as Store.ReplaceItem.
func (s *Items) Replace(ctx context.Context, id int64, name string, description *string) (Item, error) {
	it, err := s.store.ReplaceItem(ctx, id, name, description)
	s.written(ctx, id, it.Version, err)
	return it, err
}

// Patch changes the fields given; errors as Store.PatchItem.
func (s *Items) Patch(ctx context.Context, id int64, name *string, setDescription bool, description *string) (Item, error) {
	it, err := s.store.PatchItem(ctx, id, name, setDescription, description)
	s.written(ctx, id, it.Version, err)
	return it, err
}

// Delete deletes item id; errors as Store.DeleteItem.
func (s *Items) Delete(ctx context.Context, id int64) error {
	version, err := s.store.DeleteItem(ctx, id)
	s.written(ctx, id, version+1, err)
	return err
}

// unknownVersion is the floor of an invalidation after a write whose
// outcome is unknown (it failed, but may have committed): above any real
// version, so no fill lands until the tombstone expires. 2^53 so that the
// Lua scripts' numbers (doubles) hold it exactly.
const unknownVersion = 1 << 53

// written invalidates item id after a write: its cached versions below
// floor become stale. Readers that arrive later must not join a query that
// began before the write, so the item's flight is forgotten too. It runs
// even if the client has gone: the write has happened.
func (s *Items) written(ctx context.Context, id, floor int64, err error) {
	var pgErr *pgconn.PgError
	switch {
	case errors.Is(err, ErrNotFound):
		return // nothing was written
	case errors.As(err, &pgErr) || errors.Is(err, ErrNotSent) || errors.As(err, new(*pgconn.ConnectError)) || pgconn.SafeToRetry(err):
		// PostgreSQL refused the statement, or it was never sent (no
		// pooled connection came in time or before the client gave up, or
		// an error pgx marks as safe to retry because nothing had been
		// sent): nothing committed, and the cached value is still the
		// item's.
		return
	case err != nil:
		floor = unknownVersion
	}
	s.cache.Invalidate(context.WithoutCancel(ctx), id, floor)
	s.flights.Forget(strconv.FormatInt(id, 10))
}

// itemRequest is the body of POST /items and PUT /items/{id}. Pointers tell
// a missing or null field from an empty one. id may be given to PUT, as a
// GET returned it, if it is the id in the URL.
type itemRequest struct {
	ID          *int64  `json:"id"`
	Name        *string `json:"name"`
	Description *string `json:"description"`
}

// validate returns one message per invalid field, or nil. pathID is the id
// in the URL, or 0 for a POST.
func (in itemRequest) validate(pathID int64) map[string]string {
	problems := map[string]string{}
	checkID(problems, in.ID, pathID)
	switch {
	case in.Name == nil:
		problems["name"] = "is required"
	default:
		checkName(problems, *in.Name)
	}
	if in.Description != nil {
		checkText(problems, "description", *in.Description, maxDescriptionChars)
	}
	return orNil(problems)
}

// patchRequest is the body of PATCH /items/{id}, a JSON merge patch (RFC
// 7396): a field left out is kept, a field set to null is removed.
type patchRequest struct {
	ID          optional[int64]  `json:"id"`
	Name        optional[string] `json:"name"`
	Description optional[string] `json:"description"`
}

func (in patchRequest) validate(pathID int64) map[string]string {
	problems := map[string]string{}
	if in.ID.Set {
		if in.ID.Value == nil {
			problems["id"] = "cannot be removed"
		} else {
			checkID(problems, in.ID.Value, pathID)
		}
	}
	switch {
	case in.Name.Set && in.Name.Value == nil:
		problems["name"] = "cannot be removed (null): an item always has a name; leave name out to keep it"
	case in.Name.Set:
		checkName(problems, *in.Name.Value)
	}
	if in.Description.Value != nil {
		checkText(problems, "description", *in.Description.Value, maxDescriptionChars)
	}
	return orNil(problems)
}

// optional is a JSON field that may be absent (Set false), null (Set true,
// Value nil) or a value.
type optional[T any] struct {
	Set   bool
	Value *T
}

func (o *optional[T]) UnmarshalJSON(b []byte) error {
	o.Set = true
	if string(b) == "null" {
		o.Value = nil
		return nil
	}
	o.Value = new(T)
	return json.Unmarshal(b, o.Value)
}

func checkID(problems map[string]string, id *int64, pathID int64) {
	switch {
	case id == nil:
	case pathID == 0:
		problems["id"] = "is assigned by the server; leave it out"
	case *id != pathID:
		problems["id"] = fmt.Sprintf("must be %d, the id in the URL, or left out: an item's id never changes", pathID)
	}
}

func checkName(problems map[string]string, name string) {
	if strings.TrimSpace(name) == "" {
		problems["name"] = "must not be blank"
		return
	}
	checkText(problems, "name", name, maxNameChars)
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

func orNil(problems map[string]string) map[string]string {
	if len(problems) == 0 {
		return nil
	}
	return problems
}

func itemNotFound(id int64) error {
	return &apiError{Status: http.StatusNotFound, Message: fmt.Sprintf("item %d not found", id)}
}

// handleCreateItem answers POST /items: 201 with the stored item and a
// Location header; 400, 413 or 415 for a bad request; 503 if PostgreSQL is
// unavailable.
func handleCreateItem(items *Items) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var in itemRequest
		if !decodeValid(w, r, &in, 0) {
			return
		}
		it, err := items.Create(r.Context(), *in.Name, in.Description)
		if err != nil {
			writeError(w, r, err)
			return
		}
		w.Header().Set("Location", "/items/"+strconv.FormatInt(it.ID, 10))
		encode(w, r, http.StatusCreated, it)
	})
}

// handleGetItem answers GET /items/{id} by cache-aside. X-Cache says what
// the cache did (HIT, MISS or BYPASS), and the body is the same bytes
// either way. 404 if there is no such item; 503 if it is not cached and
// PostgreSQL is unavailable.
func handleGetItem(items *Items) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := parseID(r.PathValue("id"))
		if err != nil {
			writeError(w, r, err)
			return
		}
		body, outcome, err := items.Get(r.Context(), id)
		w.Header()["X-Cache"] = outcome.header()
		if errors.Is(err, ErrNotFound) {
			err = itemNotFound(id)
		}
		if err != nil {
			writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, body)
	})
}

// Page sizes of GET /items.
const (
	defaultPageSize = 20
	maxPageSize     = 100
)

// handleListItems answers GET /items?limit=N&after=ID: a JSON array of at
// most N items (default 20, at most 100) with ids above ID (default 0), in
// id order. When there may be more, a Link header (RFC 8288) gives the
// next page: </items?after=LAST&limit=N>; rel="next". Pages are read from
// PostgreSQL, never from the cache. 400 for any other parameter or a value
// that is not a number in range.
func handleListItems(items *Items) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		after, limit, err := parsePage(r.URL.RawQuery)
		if err != nil {
			writeError(w, r, err)
			return
		}
		// One more row than asked tells whether there is a next page.
		list, err := items.List(r.Context(), after, limit+1)
		if err != nil {
			writeError(w, r, err)
			return
		}
		if len(list) > limit {
			list = list[:limit]
			w.Header().Set("Link", fmt.Sprintf(`</items?after=%d&limit=%d>; rel="next"`, list[limit-1].ID, limit))
		}
		encode(w, r, http.StatusOK, list)
	})
}

// parsePage reads the query of GET /items. An after beyond the largest
// possible id is an empty page, not an error, as an id past the end is.
func parsePage(rawQuery string) (after int64, limit int, err error) {
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		return 0, 0, badRequest("the query string is malformed: %s", strings.TrimPrefix(err.Error(), "invalid "))
	}
	limit = defaultPageSize
	for name, values := range q {
		if len(values) > 1 {
			return 0, 0, badRequest("query parameter %q is given %d times; give it once", name, len(values))
		}
		v := values[0]
		digits := v != "" && strings.TrimLeft(v, "0123456789") == ""
		switch name {
		case "limit":
			n, err := strconv.Atoi(v)
			if !digits || err != nil || n < 1 || n > maxPageSize {
				return 0, 0, badRequest("limit must be a whole number from 1 to %d, got %q", maxPageSize, truncate(v))
			}
			limit = n
		case "after":
			if !digits {
				return 0, 0, badRequest("after must be an item id (a whole number, 0 for the first page), got %q", truncate(v))
			}
			after, err = strconv.ParseInt(v, 10, 64)
			if err != nil { // out of range: no id is larger
				after = math.MaxInt64
			}
		default:
			return 0, 0, badRequest("unknown query parameter %q; GET /items takes limit and after", truncate(name))
		}
	}
	return after, limit, nil
}

// handleReplaceItem answers PUT /items/{id}: the item's name and
// description become those sent (a description left out becomes null).
// 200 with the item; 404 if there is no such item; 400, 413 or 415 for a
// bad request; 503 if PostgreSQL is unavailable.
func handleReplaceItem(items *Items) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := parseID(r.PathValue("id"))
		if err != nil {
			writeError(w, r, err)
			return
		}
		var in itemRequest
		if !decodeValid(w, r, &in, id) {
			return
		}
		it, err := items.Replace(r.Context(), id, *in.Name, in.Description)
		writeItem(w, r, id, it, err)
	})
}

// handlePatchItem answers PATCH /items/{id} with a JSON merge patch (RFC
// 7396), sent as application/merge-patch+json or application/json: fields
// left out are kept, "description": null clears the description. Statuses
// as PUT.
func handlePatchItem(items *Items) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := parseID(r.PathValue("id"))
		if err != nil {
			writeError(w, r, err)
			return
		}
		var in patchRequest
		if !decodeValid(w, r, &in, id) {
			return
		}
		it, err := items.Patch(r.Context(), id, in.Name.Value, in.Description.Set, in.Description.Value)
		writeItem(w, r, id, it, err)
	})
}

// decodeValid decodes the request body into in and validates it against
// the id in the URL (0 for a POST). If either fails it answers the request
// (400, 408, 413 or 415) and returns false.
func decodeValid(w http.ResponseWriter, r *http.Request, in interface{ validate(int64) map[string]string }, pathID int64) bool {
	if err := decode(w, r, in); err != nil {
		writeError(w, r, err)
		return false
	}
	if problems := in.validate(pathID); problems != nil {
		writeError(w, r, invalidFields(problems))
		return false
	}
	return true
}

// writeItem answers a write of item id: 200 with it, or the error.
func writeItem(w http.ResponseWriter, r *http.Request, id int64, it Item, err error) {
	if errors.Is(err, ErrNotFound) {
		err = itemNotFound(id)
	}
	if err != nil {
		writeError(w, r, err)
		return
	}
	encode(w, r, http.StatusOK, it)
}

// handleDeleteItem answers DELETE /items/{id}: 204 with no body; 404 if
// there is no such item; 503 if PostgreSQL is unavailable.
func handleDeleteItem(items *Items) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := parseID(r.PathValue("id"))
		if err != nil {
			writeError(w, r, err)
			return
		}
		err = items.Delete(r.Context(), id)
		if errors.Is(err, ErrNotFound) {
			err = itemNotFound(id)
		}
		if err != nil {
			writeError(w, r, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
}

// parseID reads a path id: a positive decimal integer. Anything else is a
// 400; a number too large for the id column's type cannot name a row, so it
// is a 404.
func parseID(s string) (int64, error) {
	id, err := strconv.ParseInt(s, 10, 64)
	switch {
	case s == "" || strings.TrimLeft(s, "0123456789") != "" || err == nil && id <= 0:
		return 0, &apiError{Status: http.StatusBadRequest,
			Message: fmt.Sprintf("item id must be a positive integer, got %q", truncate(s))}
	case err != nil: // only digits, so out of range
		return 0, &apiError{Status: http.StatusNotFound, Message: "item not found: no item has an id that large"}
	}
	return id, nil
}

// truncate shortens client input quoted in an error message to 40 bytes.
func truncate(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}
