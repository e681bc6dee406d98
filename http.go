package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"expvar"
	"fmt"
	"io"
	"log/slog"
	"math"
	"mime"
	"net/http"
	"net/url"
	"os"
	"reflect"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// newServer is the HTTP handler of the service: every route, wrapped in
// request logging, panic recovery and JSON answers for unknown routes and
// wrong methods, and counted for GET /metrics. Of cfg it reads
// REQUIRE_IF_MATCH.
func newServer(cfg Config, log *slog.Logger, items *Items) http.Handler {
	mux := http.NewServeMux()
	m := newMetrics(items)
	mux.Handle("GET /metrics", handleMetrics(m))
	addRoutes(mux, items, cfg.RequireIfMatch)
	return logRequests(log, m, mux)
}

// addRoutes lists every route of the API. requireIfMatch makes If-Match
// required on writes (REQUIRE_IF_MATCH).
func addRoutes(mux *http.ServeMux, items *Items, requireIfMatch bool) {
	mux.Handle("GET /health", handleHealth())
	mux.Handle("GET /ready", handleReady(items))
	mux.Handle("GET /debug/vars", handleVars(items.Vars()))
	mux.Handle("GET /items", handleListItems(items))
	mux.Handle("POST /items", handleCreateItem(items))
	mux.Handle("GET /items/{id}", handleGetItem(items))
	mux.Handle("PUT /items/{id}", handleUpdateItem(items.Replace, requireIfMatch))
	mux.Handle("PATCH /items/{id}", handleUpdateItem(items.Patch, requireIfMatch))
	mux.Handle("DELETE /items/{id}", handleDeleteItem(items, requireIfMatch))
}

// handleHealth is liveness: the process serves HTTP. It touches neither
// PostgreSQL nor Redis, so an outage of either never gets the container
// restarted.
func handleHealth() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, []byte(`{"status":"ok"}`))
	})
}

type readiness struct {
	Status   string `json:"status"`          // "ok" or "unavailable"
	Postgres string `json:"postgres"`        // "up", "read-only" or "down"; "unknown" while leaving
	Redis    string `json:"redis"`           // "up" or "down"; "unknown" while leaving
	Error    string `json:"error,omitempty"` // why not ready, as in every error body
	// RedisError says why Redis is down (the service is still ready): a
	// connection refused, or the permissions its user lacks.
	RedisError string `json:"redis_error,omitempty"`
}

// handleReady is readiness: 200 when PostgreSQL answers and accepts
// writes, whatever Redis does (the service works without it, and "redis"
// says how it is); 503 when PostgreSQL does not answer, or is read-only (a
// standby, or a primary during a failover), so that a load balancer sends
// writes to replicas that can make them; 503 while the replica is leaving
// (SHUTDOWN_DELAY).
func handleReady(items *Items) http.Handler {
	upDown := func(err error) string {
		if err != nil {
			return "down"
		}
		return "up"
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if leavingReplica(r) {
			w.Header().Set("Retry-After", "1")
			encode(w, r, http.StatusServiceUnavailable, readiness{Status: "unavailable", Postgres: "unknown", Redis: "unknown",
				Error: "this replica is shutting down (SHUTDOWN_DELAY); send requests to another"})
			return
		}
		pgErr, redisErr := items.Ready(r.Context())
		if pgErr != nil && r.Context().Err() != nil {
			writeError(w, r, pgErr) // the client is gone
			return
		}
		res := readiness{Status: "ok", Postgres: upDown(pgErr), Redis: upDown(redisErr)}
		if redisErr != nil {
			res.RedisError = redisErr.Error()
		}
		status := http.StatusOK
		if pgErr != nil {
			noteError(w, pgErr)
			w.Header().Set("Retry-After", "1")
			res.Status, status = "unavailable", http.StatusServiceUnavailable
			res.Error = "PostgreSQL is not answering; the service cannot serve requests that need it"
			if errors.Is(pgErr, ErrReadOnly) {
				res.Postgres = "read-only"
				res.Error = "PostgreSQL answers but accepts no writes (a standby, or a failover in progress)"
			}
		}
		encode(w, r, status, res)
	})
}

// handleVars answers GET /debug/vars as the standard library's expvar
// handler does (cmdline, memstats and any other published variable), with
// the service's counters (Items.Vars) under "items".
func handleVars(vars *expvar.Map) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var b strings.Builder
		b.WriteString("{\n")
		expvar.Do(func(kv expvar.KeyValue) {
			fmt.Fprintf(&b, "%q: %s,\n", kv.Key, kv.Value)
		})
		fmt.Fprintf(&b, "%q: %s\n}", "items", vars)
		writeJSON(w, http.StatusOK, []byte(b.String()))
	})
}

// handleGetItem answers GET /items/{id} by cache-aside (Items.Get). X-Cache
// says what the cache did (HIT, MISS or BYPASS), and the body is the same
// bytes either way, with its ETag. With If-None-Match listing that ETag
// (weak comparison, RFC 9110 section 13.1.2) or "*", the answer is 304 Not
// Modified with the ETag and no body; with an If-Match that does not
// (strong comparison), 412. 400 for a malformed If-None-Match or If-Match;
// 404 if there is no such item; 503 if it is not cached and PostgreSQL is
// unavailable.
func handleGetItem(items *Items) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := parseID(r.PathValue("id"))
		if err != nil {
			writeError(w, r, err)
			return
		}
		ifMatch, matchGiven, err := parseETags(r.Header, "If-Match")
		if err != nil {
			writeError(w, r, err)
			return
		}
		noneMatch, noneMatchGiven, err := parseETags(r.Header, "If-None-Match")
		if err != nil {
			writeError(w, r, err)
			return
		}
		body, version, outcome, err := items.Get(r.Context(), id)
		w.Header().Set("X-Cache", string(outcome))
		if err != nil {
			writeError(w, r, itemError(err, id))
			return
		}
		w.Header().Set("ETag", etag(version))
		switch { // in the order of RFC 9110 section 13.2.2
		case matchGiven && !ifMatch.match(version, false):
			writeError(w, r, &PreconditionError{Version: version})
			return
		case noneMatchGiven && noneMatch.match(version, true):
			w.WriteHeader(http.StatusNotModified)
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

// handleCreateItem answers POST /items: 201 with the stored item, its ETag
// and a Location header; 400, 408, 413 or 415 for a bad request; 503 if
// PostgreSQL is unavailable. With an Idempotency-Key header
// (draft-ietf-httpapi-idempotency-key-header), a retry of the same request
// with the same key gets the first one's response again, with
// Idempotent-Replayed: true, and creates nothing (Items.CreateOnce); 409
// with Retry-After while the first is still running; 422 for the key with
// another body; 400 for a malformed key.
func handleCreateItem(items *Items) http.Handler {
	respond := func(it Item) (Response, error) {
		body, err := json.Marshal(it)
		return Response{Status: http.StatusCreated, Location: "/items/" + strconv.FormatInt(it.ID, 10),
			ETag: etag(it.Version), Body: body}, err
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key, err := idempotencyKey(r.Header)
		if err != nil {
			writeError(w, r, err)
			return
		}
		var in Input
		if err := decode(w, r, &in); err != nil {
			writeError(w, r, err)
			return
		}
		var res Response
		var replayed bool
		if key == "" {
			var it Item
			if it, err = items.Create(r.Context(), in); err == nil {
				res, err = respond(it)
			}
		} else {
			res, replayed, err = items.CreateOnce(r.Context(), in, key, respond)
		}
		if err != nil {
			writeError(w, r, err)
			return
		}
		w.Header().Set("Location", res.Location)
		w.Header().Set("ETag", res.ETag)
		if replayed {
			w.Header().Set("Idempotent-Replayed", "true")
		}
		writeJSON(w, res.Status, res.Body)
	})
}

// handleUpdateItem answers PUT /items/{id} with Items.Replace (the fields
// as sent; one left out becomes null) and PATCH /items/{id} with
// Items.Patch (a JSON merge patch, RFC 7396, sent as
// application/merge-patch+json or application/json: fields left out are
// kept, null clears one): 200 with the item and its ETag; 404 if there is
// no such item; 412 if If-Match lists none of its versions (see
// writePrecondition); 400, 408, 413, 415 or 428 for a bad request; 503 if
// PostgreSQL is unavailable.
func handleUpdateItem(update func(context.Context, int64, Input, []int64) (Item, error), requireIfMatch bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := parseID(r.PathValue("id"))
		if err != nil {
			writeError(w, r, err)
			return
		}
		ifMatch, err := writePrecondition(r.Header, requireIfMatch)
		if err != nil {
			writeError(w, r, err)
			return
		}
		var in Input
		if err := decode(w, r, &in); err != nil {
			writeError(w, r, err)
			return
		}
		it, err := update(r.Context(), id, in, ifMatch)
		if err != nil {
			writeError(w, r, itemError(err, id))
			return
		}
		w.Header().Set("ETag", etag(it.Version))
		encode(w, r, http.StatusOK, it)
	})
}

// handleDeleteItem answers DELETE /items/{id}: 204 with no body; 404 if
// there is no such item; 412 and 428 as for PUT; 503 if PostgreSQL is
// unavailable.
func handleDeleteItem(items *Items, requireIfMatch bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := parseID(r.PathValue("id"))
		if err != nil {
			writeError(w, r, err)
			return
		}
		ifMatch, err := writePrecondition(r.Header, requireIfMatch)
		if err != nil {
			writeError(w, r, err)
			return
		}
		if err := items.Delete(r.Context(), id, ifMatch); err != nil {
			writeError(w, r, itemError(err, id))
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
}

// itemError names item id in a not-found error.
func itemError(err error, id int64) error {
	if errors.Is(err, ErrNotFound) {
		return &apiError{Status: http.StatusNotFound, Message: fmt.Sprintf("item %d not found", id)}
	}
	return err
}

// parseID reads a path id: a positive decimal integer. Anything else is a
// 400; a number too large for the id column's type cannot name a row, so it
// is a 404.
func parseID(s string) (int64, error) {
	id, err := strconv.ParseInt(s, 10, 64)
	switch {
	case s == "" || strings.TrimLeft(s, "0123456789") != "" || err == nil && id <= 0:
		return 0, badRequest("item id must be a positive integer, got %q", truncate(s))
	case err != nil: // only digits, so out of range
		return 0, &apiError{Status: http.StatusNotFound, Message: "item not found: no item has an id that large"}
	}
	return id, nil
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

// etag is the entity tag of an item at version (RFC 9110 section 8.8.3),
// "<version>": strong, since an item's body is the same bytes at a version,
// from Redis or PostgreSQL.
func etag(version int64) string {
	return `"` + strconv.FormatInt(version, 10) + `"`
}

// entityTags is an If-Match or If-None-Match field: "*" (any), or a list of
// entity tags, each weak (W/"...") or strong, with its opaque tag (what is
// between the quotes).
type entityTags struct {
	any  bool
	tags []entityTag
}

type entityTag struct {
	weak   bool
	opaque string
}

// parseETags parses the header name of h (If-Match or If-None-Match),
// all its field lines as one list: "*", or entity tags separated by commas
// and optional white space, empty elements allowed (RFC 9110 sections
// 13.1.1, 13.1.2, 8.8.3 and 5.6.1), or an empty list, which nothing
// matches. present is false if the header is absent. A malformed one is a
// 400 saying what is wrong.
func parseETags(h http.Header, name string) (tags entityTags, present bool, err error) {
	lines := h.Values(name)
	if len(lines) == 0 {
		return entityTags{}, false, nil
	}
	field := strings.Join(lines, ",")
	if strings.Trim(field, " \t") == "*" {
		return entityTags{any: true}, true, nil
	}
	bad := func(problem string) error {
		return badRequest(`%s must be * or a list of entity tags, such as "3" or "3", "4": %s, in %q`, name, problem, truncate(field))
	}
	ows := func(i int) int {
		for i < len(field) && (field[i] == ' ' || field[i] == '\t') {
			i++
		}
		return i
	}
	for i := 0; ; {
		for i = ows(i); i < len(field) && field[i] == ','; i = ows(i + 1) {
		}
		if i == len(field) {
			break
		}
		var t entityTag
		if strings.HasPrefix(field[i:], "W/") {
			t.weak, i = true, i+2
		}
		if i == len(field) || field[i] != '"' {
			return entityTags{}, true, bad("an entity tag is in double quotes")
		}
		end := i + 1
		for ; end < len(field) && field[end] != '"'; end++ {
			if c := field[end]; c < 0x21 || c == 0x7f { // etagc: visible characters and obs-text
				return entityTags{}, true, bad("an entity tag holds no spaces or control characters")
			}
		}
		if end == len(field) {
			return entityTags{}, true, bad("a quote is not closed")
		}
		t.opaque, i = field[i+1:end], ows(end+1)
		if i < len(field) && field[i] != ',' {
			return entityTags{}, true, bad("entity tags are separated by commas")
		}
		tags.tags = append(tags.tags, t)
	}
	return tags, true, nil // perhaps none: an empty list, which nothing matches
}

// match reports whether tags match an item at version: by weak
// comparison (If-None-Match: W/"3" matches "3") or by strong (If-Match: a
// weak tag never matches; RFC 9110 section 8.8.3.2).
func (tags entityTags) match(version int64, weak bool) bool {
	if tags.any {
		return true
	}
	v := strconv.FormatInt(version, 10)
	for _, t := range tags.tags {
		if t.opaque == v && (weak || !t.weak) {
			return true
		}
	}
	return false
}

// versions is what If-Match tags let a write change, for the Store: nil
// for "*" (any version; the item must exist, as it must for every write
// here); else the versions its strong tags name, by strong comparison: a
// weak tag never matches, nor a tag this service never sends ("03", "x").
// That may leave none (an empty, non-nil slice), which no version matches.
func (tags entityTags) versions() []int64 {
	if tags.any {
		return nil
	}
	vs := []int64{}
	for _, t := range tags.tags {
		if n, err := strconv.ParseInt(t.opaque, 10, 64); !t.weak && err == nil && n > 0 && strconv.FormatInt(n, 10) == t.opaque {
			vs = append(vs, n)
		}
	}
	return vs
}

// writePrecondition reads the preconditions of a PUT, PATCH or DELETE from
// its headers: the versions that If-Match lets it change (nil for none
// given, or "*"). 400 for a malformed If-Match, or for If-None-Match, which
// only GET takes here (PUT never creates, so "If-None-Match: *" cannot ask
// for a create); 428 (RFC 6585 section 3) when requireIfMatch and there is
// no If-Match.
func writePrecondition(h http.Header, requireIfMatch bool) ([]int64, error) {
	if len(h.Values("If-None-Match")) > 0 {
		return nil, badRequest(`If-None-Match is for GET here; to change an item only if it has not changed since you read it, send If-Match with its ETag (If-Match: "3"); to create one, POST /items`)
	}
	tags, present, err := parseETags(h, "If-Match")
	switch {
	case err != nil:
		return nil, err
	case !present && requireIfMatch:
		return nil, &apiError{Status: http.StatusPreconditionRequired,
			Message: `this service takes writes only with If-Match: send the ETag of the item as you last read it (such as If-Match: "3"), so that a change made since is not overwritten; If-Match: * writes whatever its version`}
	case !present:
		return nil, nil
	}
	return tags.versions(), nil
}

// maxKeyLength is the longest Idempotency-Key, in characters.
const maxKeyLength = 255

// idempotencyKey reads the Idempotency-Key header of a POST: "" if there is
// none; 400 unless it is given once, as 1 to maxKeyLength visible ASCII
// characters (a UUID, say; the draft's quoted form, "...", is taken as it
// is, quotes included).
func idempotencyKey(h http.Header) (string, error) {
	lines := h.Values("Idempotency-Key")
	switch {
	case len(lines) == 0:
		return "", nil
	case len(lines) > 1:
		return "", badRequest("Idempotency-Key is given %d times; give it once", len(lines))
	}
	key := strings.Trim(lines[0], " \t")
	if key == "" || len(key) > maxKeyLength || strings.ContainsFunc(key, func(r rune) bool { return r < 0x21 || r > 0x7e }) {
		return "", badRequest("Idempotency-Key must be 1 to %d visible ASCII characters, no spaces (a UUID, say), got %q", maxKeyLength, truncate(key))
	}
	return key, nil
}

// truncate shortens client input quoted in an error message to 40 bytes.
func truncate(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}

// writeJSON sends body, which must be JSON, and a newline, with its length,
// so that no answer is chunked. net/http sets Content-Length itself for a
// body it holds whole, up to 2 KiB (bufferBeforeChunkingSize in its
// server.go); setting it for those too costs 3% of a hit's CPU.
func writeJSON(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	if len(body)+1 > 2048 {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)+1))
	}
	w.WriteHeader(status)
	w.Write(body)
	w.Write([]byte("\n"))
}

// encode sends v as JSON with the given status.
func encode(w http.ResponseWriter, r *http.Request, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		writeError(w, r, fmt.Errorf("encode %T: %w", v, err))
		return
	}
	writeJSON(w, status, body)
}

// maxBodyBytes bounds a request body: 1 MiB.
const maxBodyBytes = 1 << 20

var tooLarge = &apiError{Status: http.StatusRequestEntityTooLarge,
	Message: fmt.Sprintf("the request body must not be larger than %d bytes (1 MiB)", maxBodyBytes)}

// decode reads a JSON object from the request body into v, a pointer to a
// struct, strictly: the Content-Type must be JSON in UTF-8 (for PATCH, a
// JSON merge patch may say application/merge-patch+json), the body at most
// maxBodyBytes holding one object whose keys match v's json tags exactly
// (case included) and at most once, with nothing after it. Its errors are
// *apiError with a message that says what to fix.
func decode(w http.ResponseWriter, r *http.Request, v any) error {
	mt, params, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if r.Method == http.MethodPatch {
		// RFC 5789 section 3.1: say which patch formats are accepted.
		w.Header().Set("Accept-Patch", "application/merge-patch+json, application/json")
		if err == nil && mt == "application/merge-patch+json" {
			mt = "application/json"
		}
	}
	switch {
	case err == nil && mt == "application/json":
	case r.Method == http.MethodPatch:
		return &apiError{Status: http.StatusUnsupportedMediaType,
			Message: "PATCH takes a JSON merge patch (RFC 7396): send the header Content-Type: application/merge-patch+json or application/json"}
	default:
		return &apiError{Status: http.StatusUnsupportedMediaType,
			Message: "the request body must be JSON: send the header Content-Type: application/json"}
	}
	if cs, ok := params["charset"]; ok && !strings.EqualFold(cs, "utf-8") && !strings.EqualFold(cs, "utf8") {
		return &apiError{Status: http.StatusUnsupportedMediaType,
			Message: "JSON must be UTF-8 (RFC 8259): send Content-Type: application/json without another charset"}
	}
	if ce := r.Header.Get("Content-Encoding"); ce != "" && !strings.EqualFold(ce, "identity") {
		return &apiError{Status: http.StatusUnsupportedMediaType,
			Message: fmt.Sprintf("Content-Encoding %q is not supported: send the body uncompressed", ce)}
	}
	if r.ContentLength > maxBodyBytes {
		return tooLarge
	}
	// Once the server is shutting down, a body still arriving (slowly)
	// gets drainGrace more, rather than holding the shutdown until
	// ReadTimeout; then it is a 408.
	if d, ok := r.Context().Value(drainingKey{}).(*drainer); ok {
		defer d.reading(http.NewResponseController(w))()
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	switch {
	case errors.As(err, new(*http.MaxBytesError)):
		return tooLarge
	case errors.Is(err, os.ErrDeadlineExceeded):
		return &apiError{Status: http.StatusRequestTimeout,
			Message: "the request body did not arrive in time; send it whole, with a correct Content-Length"}
	case err != nil:
		return badRequest("the request body could not be read whole; check its Content-Length")
	}
	// RFC 8259 section 8.1 lets a parser ignore a byte order mark.
	body = bytes.TrimPrefix(body, []byte("\xef\xbb\xbf"))
	if !utf8.Valid(body) {
		return badRequest("the request body must be UTF-8 text")
	}
	switch trimmed := bytes.TrimSpace(body); {
	case len(trimmed) == 0:
		return badRequest("the request body is empty; send a JSON object")
	case bytes.Equal(trimmed, []byte("null")):
		return badRequest("the request body must be a JSON object")
	}
	if err := json.Unmarshal(body, v); err != nil {
		return decodeError(err)
	}
	if err := checkKeys(body, v); err != nil {
		return err
	}
	if hasLoneSurrogate(body) {
		return badRequest(`the request body has a \u escape of half a UTF-16 surrogate pair, which is not a character; it cannot be stored as sent`)
	}
	return nil
}

// checkKeys rejects a key that is not the json tag of a field of v exactly
// (encoding/json ignores unknown keys, and matches "NAME" to name), and a
// key given twice. body must already have decoded into v, a pointer to a
// struct of at most 64 fields, so it is one valid JSON object: checkKeys
// only finds its top-level keys.
func checkKeys(body []byte, v any) error {
	t := reflect.TypeOf(v).Elem()
	var seen uint64 // bit i: field i was given
	depth := 0
	for i := 0; i < len(body); i++ {
		switch body[i] {
		case '{', '[':
			depth++
		case '}', ']':
			depth--
		case '"':
			end := i + 1
			for ; body[end] != '"'; end++ {
				if body[end] == '\\' {
					end++
				}
			}
			raw := body[i : end+1]
			i = end
			if depth != 1 || !isKey(body[end+1:]) {
				continue
			}
			var key string
			json.Unmarshal(raw, &key) // valid: body decoded
			field := fieldIndex(t, key)
			switch {
			case field < 0:
				return badRequest("unknown field %q (field names are case-sensitive)", key)
			case seen&(1<<field) != 0:
				return badRequest("field %q is given twice", key)
			}
			seen |= 1 << field
		}
	}
	return nil
}

// isKey reports whether the JSON text after a string starts with a colon,
// past any white space: whether the string is an object's key.
func isKey(after []byte) bool {
	after = bytes.TrimLeft(after, " \t\r\n")
	return len(after) > 0 && after[0] == ':'
}

// fieldIndex returns the index of the field of struct type t whose json tag
// names key, or -1.
func fieldIndex(t reflect.Type, key string) int {
	for i := range t.NumField() {
		if name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ","); name == key {
			return i
		}
	}
	return -1
}

// hasLoneSurrogate reports whether JSON text holds a \u escape of a UTF-16
// surrogate that is not part of a high-low pair. encoding/json turns such an
// escape into U+FFFD, which would store something other than what was sent.
func hasLoneSurrogate(b []byte) bool {
	esc := func(i int) (rune, bool) { // the \uXXXX escape at b[i:], if any
		if i+6 > len(b) || b[i] != '\\' || b[i+1] != 'u' {
			return 0, false
		}
		n, err := strconv.ParseUint(string(b[i+2:i+6]), 16, 32)
		return rune(n), err == nil
	}
	for i := 0; i < len(b); i++ {
		if b[i] != '\\' {
			continue
		}
		r, ok := esc(i)
		if !ok {
			i++ // an escaped character such as \\ or \"
			continue
		}
		switch {
		case r >= 0xD800 && r < 0xDC00:
			if lo, ok := esc(i + 6); ok && lo >= 0xDC00 && lo < 0xE000 {
				i += 11
				continue
			}
			return true
		case r >= 0xDC00 && r < 0xE000:
			return true
		}
		i += 5
	}
	return false
}

// decodeError turns an encoding/json error into a message a person can act on.
func decodeError(err error) error {
	var syntaxErr *json.SyntaxError
	var typeErr *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syntaxErr) && strings.HasSuffix(syntaxErr.Error(), "after top-level value"):
		return badRequest("the request body must hold a single JSON object, with nothing after it")
	case errors.As(err, &syntaxErr) && syntaxErr.Error() == "unexpected end of JSON input":
		return badRequest("the request body is not valid JSON: it ends too early")
	case errors.As(err, &syntaxErr):
		return badRequest("the request body is not valid JSON (at byte %d): %s", syntaxErr.Offset, strings.TrimPrefix(syntaxErr.Error(), "json: "))
	case errors.As(err, &typeErr) && typeErr.Field != "":
		return badRequest("field %q must be %s", typeErr.Field, jsonTypeName(typeErr.Type))
	case errors.As(err, &typeErr):
		return badRequest("the request body must be a JSON object")
	}
	return badRequest("the request body is not valid JSON: %s", strings.TrimPrefix(err.Error(), "json: "))
}

func jsonTypeName(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Int, reflect.Int64, reflect.Int32:
		return "an integer"
	case reflect.Bool:
		return "true or false"
	}
	return "a " + t.String()
}

// apiError is an error whose message is meant for the client.
type apiError struct {
	Status  int
	Message string
}

func (e *apiError) Error() string { return e.Message }

func badRequest(format string, args ...any) *apiError {
	return &apiError{Status: http.StatusBadRequest, Message: fmt.Sprintf(format, args...)}
}

// errorBody is the JSON shape of every error: {"error": "..."}, plus
// "fields" when validation found problems with particular fields.
type errorBody struct {
	Error  string            `json:"error"`
	Fields map[string]string `json:"fields,omitempty"`
}

// writeError is the one place that maps an error to a status: *apiError
// carries its own; *InvalidError is 400 with its fields; ErrNotFound is
// 404; ErrUnavailable is 503 with Retry-After; anything else is a bug,
// answered with a generic 500 that reveals nothing internal. The cause of a
// 5xx goes into the request's log line.
func writeError(w http.ResponseWriter, r *http.Request, err error) {
	var ae *apiError
	var invalid *InvalidError
	var changed *PreconditionError
	res := errorBody{Error: "internal server error"}
	status := http.StatusInternalServerError
	switch {
	case errors.As(err, &ae):
		status, res.Error = ae.Status, ae.Message
	case errors.As(err, &invalid):
		status, res.Error, res.Fields = http.StatusBadRequest, invalid.Error(), invalid.Fields
	case errors.Is(err, ErrNotFound):
		status, res.Error = http.StatusNotFound, "not found"
	case r.Context().Err() != nil:
		// The client went away (or gave up): nothing is wrong with the
		// database, and nobody reads this answer. 499 as in nginx's logs.
		status, res.Error = statusClientClosedRequest, "client closed the request"
	case r.Method != http.MethodGet && (errors.Is(err, ErrOutcomeUnknown) || errors.Is(err, ErrUnavailable) && !Unchanged(err)):
		// Before the answers below: a retry's 412 or 409 may come of the
		// first try having committed.
		noteError(w, err)
		w.Header().Set("Retry-After", "1")
		status, res.Error = http.StatusServiceUnavailable, "the write reached the database but its answer did not come back "+
			"(a timeout or a lost connection), so whether it was applied is unknown; read the item before trying again"
		if r.Method == http.MethodPost {
			res.Error = "the create reached the database but its answer did not come back (a timeout or a lost connection), " +
				"so whether it was applied is unknown; send it again with the same Idempotency-Key, or without one read the list first"
		}
	case errors.As(err, &changed):
		tag := etag(changed.Version)
		w.Header().Set("ETag", tag)
		status, res.Error = http.StatusPreconditionFailed, fmt.Sprintf("the item has changed since it was read: its ETag is now %s, which If-Match "+
			"does not list; GET it, redo your change on it and send If-Match: %s", tag, tag)
		if tags, _, _ := parseETags(r.Header, "If-Match"); tags.match(changed.Version, true) {
			res.Error = fmt.Sprintf("If-Match names the item's version only by a weak tag, W/%s, which never matches (strong comparison); send If-Match: %s", tag, tag)
		}
	case errors.Is(err, ErrKeyInUse):
		w.Header().Set("Retry-After", "1")
		status, res.Error = http.StatusConflict, "a request with this Idempotency-Key is still being processed; "+
			"send it again shortly, with the same key, to get its response"
	case errors.Is(err, ErrKeyReused):
		status, res.Error = http.StatusUnprocessableEntity, "this Idempotency-Key was first used with a different request body; "+
			"a retry must send the same body, and a new item needs a new key"
	case errors.Is(err, ErrReadOnly):
		noteError(w, err)
		w.Header().Set("Retry-After", "1")
		status, res.Error = http.StatusServiceUnavailable, "the database accepts no writes now (a failover may be in progress); try again shortly"
	case errors.Is(err, ErrUnavailable):
		noteError(w, err)
		w.Header().Set("Retry-After", "1")
		status, res.Error = http.StatusServiceUnavailable, "the database is unavailable; try again shortly"
	case errors.Is(err, ErrConflict):
		noteError(w, err)
		status, res.Error = http.StatusConflict, "the item conflicts with a rule of the database: "+pgMessage(err)
	case errors.Is(err, ErrRejected):
		noteError(w, err)
		status, res.Error = http.StatusUnprocessableEntity, "the database cannot store this item: "+pgMessage(err)
	default:
		noteError(w, err)
	}
	body, _ := json.Marshal(res)
	writeJSON(w, status, body)
}

// statusClientClosedRequest is nginx's 499, logged for a request whose
// client hung up before its answer. It is meant for the log; only a client
// that half-closed its connection, and so still reads, receives it.
const statusClientClosedRequest = 499

// noteError attaches the cause of a failed request to its log line.
func noteError(w http.ResponseWriter, err error) {
	if rec, ok := w.(*recorder); ok {
		rec.err = err
	}
}

// logRequests logs one line per request (method, route pattern, path,
// status, duration, cache outcome, and the cause of a 5xx: a warning for a
// 503, an error for a 500) and counts it in m, turns a panic into a logged
// 500, and replaces the mux's plain-text 404 and 405 answers with JSON
// ones.
func logRequests(log *slog.Logger, m *Metrics, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		rec := &recorder{ResponseWriter: w, r: r}
		if body := r.Body; body != nil && body != http.NoBody {
			rec.body = &trackedBody{ReadCloser: body}
			r.Body = rec.body
			// Go's server looks at the body's own type after the handler
			// returns, to decide how to finish the request with it.
			defer func() { r.Body = body }()
		}
		defer func() {
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				err := fmt.Errorf("panic: %v\n%s", p, debug.Stack())
				if rec.status == 0 {
					writeError(rec, r, err)
				}
				rec.err = err
			}
			elapsed := time.Since(start)
			level := slog.LevelInfo
			switch {
			case rec.err == nil:
			case rec.status >= 500 && rec.status != http.StatusServiceUnavailable:
				level = slog.LevelError
			default:
				level = slog.LevelWarn
			}
			attrs := []slog.Attr{
				slog.String("method", r.Method),
				slog.String("route", r.Pattern),
				slog.String("path", r.URL.EscapedPath()),
				slog.Int("status", rec.status),
				slog.Duration("duration", elapsed),
				slog.String("cache", w.Header().Get("X-Cache")),
			}
			if rec.err != nil {
				attrs = append(attrs, slog.Any("err", rec.err))
			}
			log.LogAttrs(r.Context(), level, "request", attrs...)
			m.observe(r.Pattern, rec.status, elapsed)
		}()
		if leavingReplica(r) {
			w.Header().Set("Connection", "close")
		}
		next.ServeHTTP(rec, r)
		switch {
		case r.Context().Err() != nil && rec.err == nil && rec.status < 400:
			// The client went away before its answer (which is written
			// out only after the handler returns): 499, as nginx logs it.
			// An error the handler answered stands: Go's server also ends
			// the context when a body cannot be read, and that 408 or 413
			// was the answer.
			rec.status = statusClientClosedRequest
		case rec.status == 0:
			rec.status = http.StatusOK
		}
	})
}

// recorder remembers the status and error for the request log, and swaps
// the mux's own answers (the only ones written with no route pattern
// matched: 404 and 405; and its redirects to a cleaned path) for JSON ones.
type recorder struct {
	http.ResponseWriter
	r        *http.Request
	body     *trackedBody // the request body, if any
	status   int
	replaced bool
	err      error // cause of a 5xx, for the log line
}

// trackedBody notes whether a request body was read to its end.
type trackedBody struct {
	io.ReadCloser
	done bool
}

func (b *trackedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.done = true
	}
	return n, err
}

func (rec *recorder) WriteHeader(status int) {
	if rec.status != 0 {
		return
	}
	rec.status = status
	if rec.body != nil && !rec.body.done {
		// An answer given before the body was read (an error, or a route
		// that takes no body): Go's server reads the rest of the body (up
		// to 256 KiB) before answering, so that the connection can be
		// reused, or closes the connection after the answer if there is
		// more. A body that arrives slowly would hold that read, the answer
		// and any shutdown until ReadTimeout; it gets drainGrace (none once
		// the server is shutting down), and then the connection is closed.
		deadline := time.Now().Add(drainGrace)
		if d, ok := rec.r.Context().Value(drainingKey{}).(*drainer); ok && d.draining() {
			deadline = time.Now()
		}
		http.NewResponseController(rec.ResponseWriter).SetReadDeadline(deadline)
	}
	// The handlers never redirect (their only 3xx is a 304), so every other
	// 3xx is the mux's.
	if !(status >= 300 && status < 400 && status != http.StatusNotModified || rec.r.Pattern == "" && status >= 400) {
		rec.ResponseWriter.WriteHeader(status)
		return
	}
	rec.replaced = true
	var msg string
	switch h := rec.Header(); {
	case status == http.StatusNotFound:
		msg = fmt.Sprintf("no such endpoint: %s %s (the API is listed in README.md)", rec.r.Method, rec.r.RequestURI)
	case status == http.StatusMethodNotAllowed:
		msg = fmt.Sprintf("method %s is not allowed on %s; allowed: %s", rec.r.Method, rec.r.RequestURI, h.Get("Allow"))
	case h.Get("Location") != "":
		msg = "this path is served at " + h.Get("Location")
	default:
		msg = http.StatusText(status)
	}
	rec.Header().Del("X-Content-Type-Options")
	body, _ := json.Marshal(errorBody{Error: msg})
	writeJSON(rec.ResponseWriter, status, body)
}

func (rec *recorder) Write(b []byte) (int, error) {
	if rec.replaced {
		return len(b), nil
	}
	if rec.status == 0 {
		rec.WriteHeader(http.StatusOK)
	}
	return rec.ResponseWriter.Write(b)
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (rec *recorder) Unwrap() http.ResponseWriter { return rec.ResponseWriter }

// drainGrace is how long a request body still arriving at shutdown may take.
const drainGrace = time.Second

// drainingKey is the request context key of the server's *drainer.
type drainingKey struct{}

// drainer tells request handlers that the server is shutting down, and cuts
// the request bodies still being read then to drainGrace. The server's
// BaseContext carries it (main.go).
type drainer struct {
	ctx     context.Context // done once shutdown begins
	cancel  context.CancelFunc
	readers sync.Map    // *http.ResponseController -> struct{}: bodies being read
	leaving atomic.Bool // SIGTERM came: SHUTDOWN_DELAY before the shutdown
}

func newDrainer() *drainer {
	d := &drainer{}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	return d
}

// draining reports whether shutdown has begun.
func (d *drainer) draining() bool { return d.ctx.Err() != nil }

// leave marks the replica as leaving, for SHUTDOWN_DELAY before shutdown
// begins: it still serves every request, but each answer carries
// "Connection: close", so that a client holding a kept-alive connection
// (one kube-proxy or a load balancer sent here before it dropped this
// replica) makes a new one, to a replica that stays, and /ready is 503.
// Shutdown then finds few idle connections left to close, each a race
// with a client sending on it, whose request a client may resend only
// when that is safe (Go's resends a GET or HEAD, or a request with an
// Idempotency-Key).
func (d *drainer) leave() { d.leaving.Store(true) }

// leavingReplica reports whether r's server is leaving.
func leavingReplica(r *http.Request) bool {
	d, ok := r.Context().Value(drainingKey{}).(*drainer)
	return ok && d.leaving.Load()
}

// start begins draining: every body being read gets drainGrace more.
func (d *drainer) start() {
	d.cancel()
	d.readers.Range(func(rc, _ any) bool {
		rc.(*http.ResponseController).SetReadDeadline(time.Now().Add(drainGrace))
		return true
	})
}

// reading registers a body being read through rc until done is called. A
// sync.Map costs a tenth of what a context.AfterFunc on a context shared by
// every request did, whose lock each write then contended for.
func (d *drainer) reading(rc *http.ResponseController) (done func()) {
	d.readers.Store(rc, struct{}{})
	// After Store: start either finds rc, or has begun before this check.
	if d.draining() {
		rc.SetReadDeadline(time.Now().Add(drainGrace))
	}
	return func() { d.readers.Delete(rc) }
}
