// Command items is a JSON API for items, stored in PostgreSQL and cached
// in Redis by cache-aside. See README.md for the API and the walkthrough.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"expvar"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"os"
	"os/signal"
	"reflect"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode/utf8"
)

// defaultGOGC is the garbage collector's target (GOGC) unless the
// environment sets one. Go's default, 100, starts a collection each time
// the heap grows by its live size, and at least every 4 MB: with the few
// MB this service keeps live, that is a collection every few thousand
// requests under load, a few percent of the CPU. 400 collects a quarter as
// often, for about 12 MB more memory: the 4 MB minimum scales with GOGC
// (defaultHeapMinimum in the runtime's mgcpacer.go; the trade-off is
// described in "A Guide to the Go Garbage Collector", go.dev/doc/gc-guide).
const defaultGOGC = 400

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "items:", err)
		os.Exit(1)
	}
}

// run is the whole program: `items` serves until ctx ends, then shuts down
// gracefully and returns nil; `items healthcheck` asks /health on this
// machine and returns an error unless it answers 200 (the container image
// has no shell or curl for a health check). Logs go to stdout.
func run(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	if len(args) > 1 {
		if args[1] == "healthcheck" {
			return healthcheck(ctx, cfg.Port)
		}
		return fmt.Errorf("unknown command %q; run with no arguments to serve, or with healthcheck", args[1])
	}
	out := newLogWriter(stdout, logFlushInterval)
	defer out.Close()
	log := newLogger(cfg, out)
	gogc := getenv("GOGC")
	if gogc == "" {
		gogc = strconv.Itoa(defaultGOGC)
		debug.SetGCPercent(defaultGOGC)
	}
	log.Info("starting", "config", cfg, "GOGC", gogc)
	if cfg.ShutdownTimeout <= cfg.DBQueryTimeout {
		log.Warn("SHUTDOWN_TIMEOUT is not above DB_QUERY_TIMEOUT: requests still waiting on PostgreSQL at shutdown may be cut off",
			"SHUTDOWN_TIMEOUT", cfg.ShutdownTimeout, "DB_QUERY_TIMEOUT", cfg.DBQueryTimeout)
	}

	store, err := openStore(ctx, cfg, log)
	if err != nil {
		if ctx.Err() != nil {
			log.Info("stopped while waiting for PostgreSQL")
			return nil
		}
		return err
	}
	defer store.Close()
	cache := newCache(cfg, log)
	defer cache.Close()
	// Redis is optional: if it is down, Ping logs so and the service starts
	// without it, probing again every REDIS_RETRY_INTERVAL.
	cache.Ping(ctx)

	ln, err := net.Listen("tcp", ":"+strconv.Itoa(cfg.Port))
	if err != nil {
		return err
	}
	// Shutdown starts draining; request bodies still arriving then get
	// drainGrace to finish (see decode).
	draining := newDrainer()
	defer draining.cancel() // releases the context if shutdown never began
	var fresh sync.Map      // connections with no request yet: net.Conn -> true
	srv := &http.Server{
		Handler:           newServer(log, newItems(store, cache)),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       15 * time.Second,
		WriteTimeout:      cfg.DBQueryTimeout + 15*time.Second,
		IdleTimeout:       90 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		BaseContext: func(net.Listener) context.Context {
			return context.WithValue(context.Background(), drainingKey{}, draining)
		},
		ConnState: func(c net.Conn, state http.ConnState) {
			switch state {
			case http.StateNew:
				fresh.Store(c, true)
			case http.StateActive, http.StateHijacked, http.StateClosed:
				// Not StateIdle: a connection is idle only after it was
				// active, so it has left fresh already; this runs twice
				// per request.
				fresh.Delete(c)
			}
		},
	}
	// Shutdown closes idle connections, but waits up to 5 s for one that
	// has sent no request yet (a browser's preconnect, say), which would
	// outlast SHUTDOWN_TIMEOUT; such connections hold no request, so they
	// are closed at once.
	srv.RegisterOnShutdown(func() {
		draining.start()
		fresh.Range(func(c, _ any) bool {
			c.(net.Conn).Close()
			return true
		})
	})
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Info("listening", "addr", ln.Addr().String())

	select {
	case err := <-serveErr:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down; finishing in-flight requests", "timeout", cfg.ShutdownTimeout)
	shutdownCtx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		srv.Close()
		return fmt.Errorf("shutdown: requests still running after SHUTDOWN_TIMEOUT=%s were cut off: %w", cfg.ShutdownTimeout, err)
	}
	if err := <-serveErr; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	log.Info("stopped")
	return nil
}

// logFlushInterval bounds how long a log line waits in logWriter's buffer.
const logFlushInterval = 100 * time.Millisecond

// logWriter buffers log lines and writes them out at least every interval
// and when the buffer fills, rather than with one write system call per
// line: under load, the request log would otherwise cost as much as a cache
// hit. Lines keep their order; Close writes out the rest.
type logWriter struct {
	mu   sync.Mutex
	buf  *bufio.Writer
	stop chan struct{}
	done chan struct{}
}

func newLogWriter(w io.Writer, interval time.Duration) *logWriter {
	lw := &logWriter{buf: bufio.NewWriterSize(w, 64<<10), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(lw.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-lw.stop:
				return
			case <-t.C:
				lw.mu.Lock()
				lw.buf.Flush()
				lw.mu.Unlock()
			}
		}
	}()
	return lw
}

func (lw *logWriter) Write(p []byte) (int, error) {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return lw.buf.Write(p)
}

// Close stops the flushing and writes out what is buffered.
func (lw *logWriter) Close() error {
	close(lw.stop)
	<-lw.done
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return lw.buf.Flush()
}

func newLogger(cfg Config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(&textHandler{TextHandler: slog.NewTextHandler(w, opts), w: w})
}

// textHandler is slog's TextHandler with the writer under it, so that
// logRequests can write its line in the same format itself (see
// appendRequestLine).
type textHandler struct {
	*slog.TextHandler
	w io.Writer
}

// healthcheck exits the container's health check: nil if GET /health on
// localhost answers 200 within 2 s.
func healthcheck(ctx context.Context, port int) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	url := "http://127.0.0.1:" + strconv.Itoa(port) + "/health"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: %s answered %s", url, resp.Status)
	}
	return nil
}

// newServer is the HTTP handler of the service: every route, wrapped in
// request logging, panic recovery and JSON answers for unknown routes and
// wrong methods.
func newServer(log *slog.Logger, items *Items) http.Handler {
	mux := http.NewServeMux()
	addRoutes(mux, items)
	return logRequests(log, mux)
}

// addRoutes lists every route of the API.
func addRoutes(mux *http.ServeMux, items *Items) {
	mux.Handle("GET /health", handleHealth())
	mux.Handle("GET /ready", handleReady(items.store, items.cache))
	mux.Handle("GET /debug/vars", handleVars(items.vars()))
	mux.Handle("GET /items", handleListItems(items))
	mux.Handle("POST /items", handleCreateItem(items))
	mux.Handle("GET /items/{id}", handleGetItem(items))
	mux.Handle("PUT /items/{id}", handleReplaceItem(items))
	mux.Handle("PATCH /items/{id}", handlePatchItem(items))
	mux.Handle("DELETE /items/{id}", handleDeleteItem(items))
}

// handleHealth is liveness: the process serves HTTP. It touches neither
// PostgreSQL nor Redis, so an outage of either never gets the container
// restarted.
func handleHealth() http.Handler {
	body := []byte(`{"status":"ok"}`)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, body)
	})
}

// handleVars answers GET /debug/vars as the standard library's expvar
// handler does (cmdline, memstats and any other published variable), with
// this server's counters under "items": cache_hits, cache_misses and
// cache_bypasses (single-item reads by what the cache did), redis_errors
// (commands that failed or were refused), postgres_errors (queries that
// failed, "not found" aside), postgres_item_reads (queries for single-item
// reads after a miss or a bypass: fewer than those when concurrent ones
// share a query) and
// waiting_for_item_reads (requests waiting on such a query now). They are
// kept per server rather than published globally, so that several servers
// in one process (the tests) do not share them.
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

type readiness struct {
	Status   string `json:"status"`          // "ok" or "unavailable"
	Postgres string `json:"postgres"`        // "up" or "down"
	Redis    string `json:"redis"`           // "up" or "down"
	Error    string `json:"error,omitempty"` // why not ready, as in every error body
}

// handleReady is readiness: 200 when PostgreSQL answers, whatever Redis
// does (the service works without it, and "redis" says how it is); 503
// when PostgreSQL does not.
func handleReady(store *Store, cache *Cache) http.Handler {
	upDown := func(err error) string {
		if err != nil {
			return "down"
		}
		return "up"
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		pgErr := store.Ping(r.Context())
		if pgErr != nil && r.Context().Err() != nil {
			writeError(w, r, pgErr) // the client is gone
			return
		}
		res := readiness{Status: "ok", Postgres: upDown(pgErr), Redis: upDown(cache.Ping(r.Context()))}
		status := http.StatusOK
		if pgErr != nil {
			noteError(w, pgErr)
			w.Header().Set("Retry-After", "1")
			res.Status, status = "unavailable", http.StatusServiceUnavailable
			res.Error = "PostgreSQL is not answering; the service cannot serve requests that need it"
		}
		encode(w, r, status, res)
	})
}

// drainingKey is the request context key of the server's *drainer.
type drainingKey struct{}

// drainer tells request handlers that the server is shutting down, and cuts
// the request bodies still being read then to drainGrace.
type drainer struct {
	ctx     context.Context // done once shutdown begins
	cancel  context.CancelFunc
	readers sync.Map // *http.ResponseController -> struct{}: bodies being read
}

func newDrainer() *drainer {
	d := &drainer{}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	return d
}

// draining reports whether shutdown has begun.
func (d *drainer) draining() bool { return d.ctx.Err() != nil }

// start begins draining: every body being read gets drainGrace more.
func (d *drainer) start() {
	d.cancel()
	d.readers.Range(func(rc, _ any) bool {
		rc.(*http.ResponseController).SetReadDeadline(time.Now().Add(drainGrace))
		return true
	})
}

// reading registers a body being read through rc until done is called. It
// costs a tenth of what a context.AfterFunc on a context shared by every
// request did, whose lock each write then contended for.
func (d *drainer) reading(rc *http.ResponseController) (done func()) {
	d.readers.Store(rc, struct{}{})
	// After Store: start either finds rc, or has begun before this check.
	if d.draining() {
		rc.SetReadDeadline(time.Now().Add(drainGrace))
	}
	return func() { d.readers.Delete(rc) }
}

// drainGrace is how long a request body still arriving at shutdown may take.
const drainGrace = time.Second

// maxBodyBytes bounds a request body: 1 MiB.
const maxBodyBytes = 1 << 20

var tooLarge = &apiError{Status: http.StatusRequestEntityTooLarge,
	Message: fmt.Sprintf("the request body must not be larger than %d bytes (1 MiB)", maxBodyBytes)}

var newline = []byte("\n")

// jsonContentType is the Content-Type header's value, shared by every
// response rather than allocated for each: net/http copies header values
// before it writes them, and nothing here changes one in place.
var jsonContentType = []string{"application/json"}

// unchunkedSize is the size up to which net/http buffers a whole response
// and sets its Content-Length itself (bufferBeforeChunkingSize in
// net/http's server.go), without allocating.
const unchunkedSize = 2048

// writeJSON sends body, which must be JSON, and a newline. A larger
// response gets its Content-Length here, so that it is not chunked.
func writeJSON(w http.ResponseWriter, status int, body []byte) {
	h := w.Header()
	h["Content-Type"] = jsonContentType
	if len(body)+1 > unchunkedSize {
		h["Content-Length"] = []string{strconv.Itoa(len(body) + 1)}
	}
	w.WriteHeader(status)
	w.Write(body)
	w.Write(newline)
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

// decode reads a JSON object from the request body into v, a pointer to a
// struct, strictly: the Content-Type must be JSON in UTF-8 (for PATCH, a
// JSON merge patch may say application/merge-patch+json), the body at most
// maxBodyBytes holding one object whose keys match v's json tags exactly
// (case included) and at most once, with nothing after it. Its errors are
// *apiError with a message that says what to fix.
func decode(w http.ResponseWriter, r *http.Request, v any) error {
	mt, params, err := "application/json", map[string]string(nil), error(nil)
	if ct := r.Header.Get("Content-Type"); ct != mt { // the usual case needs no parsing
		mt, params, err = mime.ParseMediaType(ct)
	}
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
			key := string(raw[1 : len(raw)-1])
			if bytes.IndexByte(raw, '\\') >= 0 {
				json.Unmarshal(raw, &key) // valid: body decoded
			}
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
	Fields  map[string]string // per-field problems, for 400s from validation
}

func (e *apiError) Error() string { return e.Message }

func badRequest(format string, args ...any) *apiError {
	return &apiError{Status: http.StatusBadRequest, Message: fmt.Sprintf(format, args...)}
}

// invalidFields is the 400 for a request that decoded but failed validation.
func invalidFields(problems map[string]string) *apiError {
	msgs := make([]string, 0, len(problems))
	for field, problem := range problems {
		msgs = append(msgs, field+" "+problem)
	}
	slices.Sort(msgs)
	return &apiError{Status: http.StatusBadRequest, Message: "invalid item: " + strings.Join(msgs, "; "), Fields: problems}
}

// errorBody is the JSON shape of every error: {"error": "..."}, plus
// "fields" when validation found problems with particular fields.
type errorBody struct {
	Error  string            `json:"error"`
	Fields map[string]string `json:"fields,omitempty"`
}

// writeError is the one place that maps an error to a status: *apiError
// carries its own; ErrNotFound is 404; ErrUnavailable is 503 with
// Retry-After; anything else is a bug, answered with a generic 500 that
// reveals nothing internal. The cause of a 5xx goes into the request's log
// line.
func writeError(w http.ResponseWriter, r *http.Request, err error) {
	var ae *apiError
	switch {
	case errors.As(err, &ae):
	case errors.Is(err, ErrNotFound):
		ae = &apiError{Status: http.StatusNotFound, Message: "not found"}
	case r.Context().Err() != nil:
		// The client went away (or gave up): nothing is wrong with the
		// database, and nobody reads this answer. 499 as in nginx's logs.
		ae = &apiError{Status: statusClientClosedRequest, Message: "client closed the request"}
	case errors.Is(err, ErrUnavailable):
		noteError(w, err)
		w.Header().Set("Retry-After", "1")
		ae = &apiError{Status: http.StatusServiceUnavailable, Message: "the database is unavailable; try again shortly"}
	default:
		noteError(w, err)
		ae = &apiError{Status: http.StatusInternalServerError, Message: "internal server error"}
	}
	body, _ := json.Marshal(errorBody{Error: ae.Message, Fields: ae.Fields})
	writeJSON(w, ae.Status, body)
}

// noteError attaches the cause of a failed request to its log line.
func noteError(w http.ResponseWriter, err error) {
	if rec, ok := w.(*recorder); ok {
		rec.err = err
	}
}

// logRequests logs one line per request (method, route pattern, path,
// status, duration, cache outcome, and the cause of a 5xx: a warning for a
// 503, an error for a 500), turns a panic into a logged 500, and replaces
// the mux's plain-text 404 and 405 answers with JSON ones.
func logRequests(log *slog.Logger, next http.Handler) http.Handler {
	handler := log.Handler()
	text, _ := handler.(*textHandler)
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
			level := slog.LevelInfo
			if rec.err != nil {
				level = slog.LevelWarn
				if rec.status >= 500 && rec.status != http.StatusServiceUnavailable {
					level = slog.LevelError
				}
			}
			if !handler.Enabled(r.Context(), level) {
				return
			}
			end := time.Now()
			method, path, cache := r.Method, r.URL.EscapedPath(), ""
			if v := w.Header()["X-Cache"]; len(v) > 0 {
				cache = v[0]
			}
			if text != nil && rec.err == nil {
				// The usual line, written as slog's TextHandler would
				// write it, at a third of the cost.
				bp := lineBuffers.Get().(*[]byte)
				if line, ok := appendRequestLine((*bp)[:0], end, method, r.Pattern, path, rec.status, end.Sub(start), cache); ok {
					text.w.Write(line)
					*bp = line
					lineBuffers.Put(bp)
					return
				}
				lineBuffers.Put(bp)
			}
			// The record is made here rather than by log.LogAttrs, which
			// would read the clock again and walk the stack for a source
			// location that the log does not print.
			line := slog.NewRecord(end, level, "request", 0)
			line.AddAttrs(
				slog.String("method", method),
				slog.String("route", r.Pattern),
				slog.String("path", path),
				slog.Int("status", rec.status),
				slog.Duration("duration", end.Sub(start)),
				slog.String("cache", cache),
			)
			if rec.err != nil {
				line.AddAttrs(slog.Any("err", rec.err))
			}
			handler.Handle(r.Context(), line)
		}()
		next.ServeHTTP(rec, r)
		switch {
		case r.Context().Err() != nil && rec.err == nil:
			// The client went away before its answer (which is written
			// out only after the handler returns): 499, as nginx logs it,
			// whatever the handler answered.
			rec.status = statusClientClosedRequest
		case rec.status == 0:
			rec.status = http.StatusOK
		}
	})
}

// statusClientClosedRequest is nginx's 499, logged for a request whose
// client hung up before its answer; it is never sent.
const statusClientClosedRequest = 499

// lineBuffers holds buffers for request log lines (*[]byte).
var lineBuffers = sync.Pool{New: func() any { b := make([]byte, 0, 256); return &b }}

// appendRequestLine appends the request log line of an INFO record at t
// with these attributes, in the format of slog's TextHandler with default
// options, newline included: a third of the TextHandler's cost, which is a
// tenth of a cache hit's. ok is false, and the line must be left to slog,
// if a string holds a byte outside ASCII (slog's quoting of those depends
// on Unicode classes). TestRequestLine and FuzzRequestLine hold it to
// slog's output.
func appendRequestLine(b []byte, t time.Time, method, route, path string, status int, d time.Duration, cache string) (line []byte, ok bool) {
	b = append(b, "time="...)
	b = appendRFC3339Millis(b, t)
	b = append(b, " level=INFO msg=request"...)
	if b, ok = appendTextValue(append(b, " method="...), method); !ok {
		return b, false
	}
	b = append(b, " route="...)
	if v, cached := loggedRoutes.Load(route); cached {
		b = append(b, v.(string)...)
	} else {
		n := len(b)
		if b, ok = appendTextValue(b, route); !ok {
			return b, false
		}
		loggedRoutes.Store(route, string(b[n:]))
	}
	if b, ok = appendTextValue(append(b, " path="...), path); !ok {
		return b, false
	}
	b = strconv.AppendInt(append(b, " status="...), int64(status), 10)
	b = append(append(b, " duration="...), d.String()...)
	if b, ok = appendTextValue(append(b, " cache="...), cache); !ok {
		return b, false
	}
	return append(b, '\n'), true
}

// loggedRoutes holds each route pattern as the log writes it: there are as
// many as routes, and each has a space, so quoting it every time would cost
// a tenth of the line.
var loggedRoutes sync.Map // pattern -> its text form

// appendTextValue appends s as slog's TextHandler writes a string: as it
// is, or quoted (strconv.Quote) if it is empty or holds a space, '=', '"'
// or a control character other than DEL. ok is false for a byte outside
// ASCII.
func appendTextValue(b []byte, s string) ([]byte, bool) {
	quote := s == ""
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c >= utf8.RuneSelf:
			return b, false
		case c <= ' ' || c == '=' || c == '"':
			quote = true
		}
	}
	if quote {
		return strconv.AppendQuote(b, s), true
	}
	return append(b, s...), true
}

// appendRFC3339Millis appends t as slog's TextHandler does: RFC 3339 with
// milliseconds, truncated (log/slog's appendRFC3339Millis).
func appendRFC3339Millis(b []byte, t time.Time) []byte {
	const prefixLen = len("2006-01-02T15:04:05.000")
	n := len(b)
	// RFC3339Nano drops trailing zeros: a tenth of a millisecond more keeps
	// four digits after the point, and the fourth is cut.
	t = t.Round(0).Truncate(time.Millisecond).Add(time.Millisecond / 10)
	b = t.AppendFormat(b, time.RFC3339Nano)
	return append(b[:n+prefixLen], b[n+prefixLen+1:]...)
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
	// The handlers never redirect, so every 3xx is the mux's.
	if !(status >= 300 && status < 400 || rec.r.Pattern == "" && status >= 400) {
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
