package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The tests run against real PostgreSQL and Redis, reached through the same
// DB_* and REDIS_* variables as the service (defaults: localhost, appuser,
// appdb). Each test gets its own PostgreSQL schema and Redis key prefix and
// removes them when it ends, so a running stack on the same servers is never
// touched. `go test -short ./...` runs only the tests that need no server.

const startHint = "start them with `docker compose up -d postgres redis`, or point DB_HOST, DB_PORT, DB_USER, " +
	"DB_PASSWORD, DB_NAME and REDIS_HOST, REDIS_PORT at running servers; `go test -short ./...` skips the tests that need them"

// testConfig is the configuration from the environment, isolated for one
// test: a fresh schema and key prefix, a free port, short timeouts.
func testConfig(t testing.TB) Config {
	t.Helper()
	if testing.Short() {
		t.Skip("needs PostgreSQL and Redis; skipped with -short")
	}
	cfg, err := loadConfig(os.Getenv)
	if err != nil {
		t.Fatalf("configuration from the environment: %v", err)
	}
	suffix := randomHex(t)
	cfg.Port = 0
	cfg.DBSchema = "test_" + suffix
	cfg.CacheKeyPrefix = "test:" + suffix + ":item:"
	cfg.DBConnectTimeout = 5 * time.Second
	cfg.DBQueryTimeout = time.Second
	cfg.RedisRetry = 300 * time.Millisecond
	cfg.ShutdownTimeout = 5 * time.Second
	cfg.LogLevel = slog.LevelDebug
	return cfg
}

func randomHex(t testing.TB) string {
	t.Helper()
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// postgresUp tells, once for the whole run, whether the PostgreSQL of the
// environment answers, so that without it every test fails at once rather
// than each waiting out its own connect timeout.
var postgresUp = sync.OnceValue(func() error {
	cfg, err := loadConfig(os.Getenv)
	if err != nil {
		return err
	}
	cfg.DBConnectTimeout = 3 * time.Second
	store, err := openStore(context.Background(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		return err
	}
	return store.Close()
})

// newTestStore opens a store on cfg's schema and drops the schema when the
// test ends.
func newTestStore(t testing.TB, cfg Config, log *slog.Logger) *Store {
	t.Helper()
	err := postgresUp()
	var store *Store
	if err == nil {
		store, err = openStore(t.Context(), cfg, log)
	}
	if err != nil {
		t.Fatalf("PostgreSQL at %s:%d (database %s, user %s) is needed: %v\n%s",
			cfg.DBHost, cfg.DBPort, cfg.DBName, cfg.DBUser, err, startHint)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := store.db.ExecContext(ctx, "DROP SCHEMA IF EXISTS "+cfg.DBSchema+" CASCADE"); err != nil {
			t.Errorf("drop test schema %s: %v", cfg.DBSchema, err)
		}
		store.Close()
	})
	return store
}

// newTestCache opens a cache on cfg's Redis and deletes the test's keys when
// the test ends. It fails the test if that Redis does not answer.
func newTestCache(t testing.TB, cfg Config, log *slog.Logger) *Cache {
	t.Helper()
	cache := newCache(cfg, log)
	if err := cache.rdb.Ping(t.Context()).Err(); err != nil {
		t.Fatalf("Redis at %s is needed: %v\n%s", cfg.redisAddr(), err, startHint)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		keys, err := cache.rdb.Keys(ctx, cfg.CacheKeyPrefix+"*").Result()
		if err == nil && len(keys) > 0 {
			err = cache.rdb.Del(ctx, keys...).Err()
		}
		if err != nil {
			t.Errorf("delete test keys %s*: %v", cfg.CacheKeyPrefix, err)
		}
		cache.Close()
	})
	return cache
}

// logBuffer is a goroutine-safe log destination that tests can search.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
	t  testing.TB
}

func newLogBuffer(t testing.TB) *logBuffer { return &logBuffer{t: t} }

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.t.Output().Write(p)
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuffer) count(s string) int { return strings.Count(l.String(), s) }

func (l *logBuffer) logger() *slog.Logger {
	return newLogger(Config{LogLevel: slog.LevelDebug}, l)
}

// testServer serves the API over real HTTP and returns its base URL.
func testServer(t testing.TB, log *slog.Logger, store *Store, cache *Cache) string {
	t.Helper()
	return serveItems(t, log, newItems(store, cache))
}

// serveItems is testServer for a test that looks into items.
func serveItems(t testing.TB, log *slog.Logger, items *Items) string {
	t.Helper()
	srv := &http.Server{Handler: newServer(log, items)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String()
}

// response is a finished HTTP exchange.
type response struct {
	status  int
	header  http.Header
	body    []byte
	elapsed time.Duration
}

// do sends one request; a body implies Content-Type: application/json unless
// headers say otherwise (pairs of name, value).
func do(t testing.TB, method, url, body string, headers ...string) response {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(t.Context(), method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	start := time.Now()
	resp, err := noRedirects.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, url, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: b, elapsed: time.Since(start)}
}

// noRedirects is a client that shows redirects instead of following them.
var noRedirects = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// createItem posts an item and returns it as the API answered it.
func createItem(t testing.TB, base, body string) Item {
	t.Helper()
	res := do(t, "POST", base+"/items", body)
	if res.status != http.StatusCreated {
		t.Fatalf("POST /items %s: got %d %s; want 201", body, res.status, res.body)
	}
	var it Item
	if err := json.Unmarshal(res.body, &it); err != nil {
		t.Fatalf("POST /items: body %s: %v", res.body, err)
	}
	return it
}

// errorMessage checks that body is a JSON error object and returns its message.
func errorMessage(t testing.TB, res response) string {
	t.Helper()
	if ct := res.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type: got %q; want application/json", ct)
	}
	var e errorBody
	if err := json.Unmarshal(res.body, &e); err != nil || e.Error == "" {
		t.Errorf("body %q: want {\"error\": \"...\"}", res.body)
	}
	return e.Error
}

// proxy is a TCP proxy in front of a server that a test can cut (every
// connection closed, new ones dropped at once) or stall (bytes held, nothing
// answered), to break PostgreSQL or Redis without touching the real server.
type proxy struct {
	ln     net.Listener
	target string
	held   atomic.Int64 // chunks that arrived while stalled
	delay  atomic.Int64 // added before each chunk of the server's replies, in ns

	mu          sync.Mutex
	cut         bool
	gate        chan struct{} // closed while traffic flows
	repliesOnly bool          // the stall holds only the server's bytes
	conns       map[net.Conn]bool
	frozen      map[net.Conn]bool // connections held by freezeExisting
	thaw        chan struct{}     // closed when they are let go
}

func newProxy(t *testing.T, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target, gate: make(chan struct{}), conns: map[net.Conn]bool{}}
	close(p.gate)
	go p.serve()
	t.Cleanup(func() {
		p.ln.Close()
		p.resume()
		p.setCut(true)
	})
	return p
}

// port is the proxy's port on 127.0.0.1.
func (p *proxy) port() int { return p.ln.Addr().(*net.TCPAddr).Port }

func (p *proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		cut := p.cut
		if !cut {
			p.conns[c] = true
		}
		p.mu.Unlock()
		if cut {
			c.Close()
			continue
		}
		go func() {
			up, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				return
			}
			p.mu.Lock()
			p.conns[up] = true
			p.mu.Unlock()
			go p.pipe(up, c, false)
			p.pipe(c, up, true)
		}()
	}
}

func (p *proxy) pipe(dst, src net.Conn, replies bool) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			gate := p.gate
			if p.repliesOnly && !replies {
				gate = nil
			}
			if p.frozen[src] || p.frozen[dst] {
				gate = p.thaw
			}
			p.mu.Unlock()
			if gate != nil {
				select {
				case <-gate:
				default:
					p.held.Add(1)
					<-gate
				}
			}
			if d := p.delay.Load(); replies && d > 0 {
				time.Sleep(time.Duration(d))
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// setCut closes every connection and drops new ones (true), or lets
// connections through again (false).
func (p *proxy) setCut(cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = cut
	if cut {
		for c := range p.conns {
			c.Close()
		}
		clear(p.conns)
	}
}

// stall holds every byte in both directions until resume.
func (p *proxy) stall() { p.stallWith(false) }

// stallReplies holds the server's bytes until resume, and lets the
// client's through: the server does what it is asked, and nobody hears.
func (p *proxy) stallReplies() { p.stallWith(true) }

func (p *proxy) stallWith(repliesOnly bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.repliesOnly = repliesOnly
	select {
	case <-p.gate:
		p.gate = make(chan struct{})
	default:
	}
}

// freezeExisting holds every byte of the connections open now, and lets
// new ones through: a server whose old connections hung.
func (p *proxy) freezeExisting() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.frozen = maps.Clone(p.conns)
	p.thaw = make(chan struct{})
}

func (p *proxy) resume() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.thaw != nil {
		close(p.thaw)
		p.thaw, p.frozen = nil, nil
	}
	select {
	case <-p.gate:
	default:
		close(p.gate)
	}
}

// dropHeld ends a stall by closing every connection: the bytes held are
// never delivered.
func (p *proxy) dropHeld() {
	p.setCut(true)
	p.resume()
	p.setCut(false)
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startRedis runs a private redis-server on port, with extra arguments,
// until stop is called or the test ends. It returns stop.
func startRedis(t *testing.T, port int, args ...string) (stop func()) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		// CI installs it (.ci/run); on a laptop with only Docker, skip.
		if os.Getenv("CI") != "" {
			t.Fatalf("redis-server is needed to test Redis outages (apt-get install redis-server): %v", err)
		}
		t.Skipf("redis-server is not installed, so this test cannot start and stop a private Redis: %v", err)
	}
	cmd := exec.Command(bin, append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--protected-mode", "no"}, args...)...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cmd.Process.Kill()
			cmd.Wait()
		})
	}
	t.Cleanup(stop)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	for i := 0; i < 100; i++ {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return stop
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("redis-server on %s did not start", addr)
	return nil
}

// hungListener accepts connections and never answers: a hung server.
func hungListener(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			go io.Copy(io.Discard, c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return ln.Addr().(*net.TCPAddr).Port
}

// envFrom is a getenv for run: cfg's test settings over the real environment.
func envFrom(cfg Config, extra ...string) func(string) string {
	m := map[string]string{
		"PORT":                 strconv.Itoa(cfg.Port),
		"DB_HOST":              cfg.DBHost,
		"DB_PORT":              strconv.Itoa(cfg.DBPort),
		"DB_SCHEMA":            cfg.DBSchema,
		"DB_CONNECT_TIMEOUT":   cfg.DBConnectTimeout.String(),
		"DB_QUERY_TIMEOUT":     cfg.DBQueryTimeout.String(),
		"REDIS_HOST":           cfg.RedisHost,
		"REDIS_PORT":           strconv.Itoa(cfg.RedisPort),
		"REDIS_RETRY_INTERVAL": cfg.RedisRetry.String(),
		"CACHE_KEY_PREFIX":     cfg.CacheKeyPrefix,
		"SHUTDOWN_TIMEOUT":     cfg.ShutdownTimeout.String(),
		"LOG_FORMAT":           "json",
		"LOG_LEVEL":            "debug",
	}
	for i := 0; i+1 < len(extra); i += 2 {
		m[extra[i]] = extra[i+1]
	}
	return func(k string) string {
		if v, ok := m[k]; ok {
			return v
		}
		return os.Getenv(k)
	}
}

// scanLog copies the service's JSON log from r to the test's output and
// sends the address of its "listening" line to addr, until r ends.
func scanLog(t testing.TB, r io.Reader, addr chan<- string) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		t.Output().Write(append(sc.Bytes(), '\n'))
		var line struct{ Msg, Addr string }
		if json.Unmarshal(sc.Bytes(), &line) == nil && line.Msg == "listening" {
			addr <- line.Addr
		}
	}
	io.Copy(io.Discard, r) // past a line too long for the scanner
}

// startRun runs the service as main does, with a JSON log, and returns its
// base URL once it is listening, and a channel with run's result.
func startRun(t *testing.T, ctx context.Context, getenv func(string) string) (string, <-chan error) {
	t.Helper()
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"items"}, getenv, pw)
		pw.Close()
	}()
	addr := make(chan string, 1)
	go scanLog(t, pr, addr)
	select {
	case a := <-addr:
		_, port, _ := net.SplitHostPort(a)
		return "http://127.0.0.1:" + port, done
	case err := <-done:
		t.Fatalf("run returned before listening: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("run did not start listening within 30 s")
	}
	return "", nil
}

// TestRunEndToEnd starts the whole service with run on a free port, as main
// does, uses it over HTTP, checks its health-check mode, and stops it.
func TestRunEndToEnd(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	newTestStore(t, cfg, log)
	newTestCache(t, cfg, log)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	base, done := startRun(t, ctx, envFrom(cfg))

	it := createItem(t, base, `{"name":"end to end"}`)
	if got := do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "").header.Get("X-Cache"); got != "MISS" {
		t.Errorf("first GET: X-Cache %q; want MISS", got)
	}
	if got := do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "").header.Get("X-Cache"); got != "HIT" {
		t.Errorf("second GET: X-Cache %q; want HIT", got)
	}

	_, port, _ := net.SplitHostPort(strings.TrimPrefix(base, "http://"))
	if err := run(t.Context(), []string{"items", "healthcheck"}, envFrom(cfg, "PORT", port), io.Discard); err != nil {
		t.Errorf("healthcheck against a running service: %v; want nil", err)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run after cancel: %v; want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return within 10 s of cancel")
	}
	if err := run(t.Context(), []string{"items", "healthcheck"}, envFrom(cfg, "PORT", port), io.Discard); err == nil {
		t.Error("healthcheck against a stopped service: nil; want an error")
	}
}

// TestGracefulShutdown cancels run while a request is in flight: the request
// must finish with its real answer, new connections must be refused, and run
// must return nil.
func TestGracefulShutdown(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	store := newTestStore(t, cfg, log)
	newTestCache(t, cfg, log)
	it, err := store.CreateItem(t.Context(), "in flight", nil)
	if err != nil {
		t.Fatal(err)
	}
	pg := newProxy(t, net.JoinHostPort(cfg.DBHost, strconv.Itoa(cfg.DBPort)))
	cfg.DBHost, cfg.DBPort = "127.0.0.1", pg.port()
	cfg.DBQueryTimeout = 10 * time.Second

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	base, done := startRun(t, ctx, envFrom(cfg))

	pg.stall()
	inflight := make(chan response, 1)
	go func() { inflight <- do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "") }()
	waitFor(t, "the request to reach PostgreSQL", func() bool { return pg.held.Load() > 0 })

	cancel()
	waitFor(t, "the listener to close", func() bool {
		c, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	select {
	case err := <-done:
		t.Fatalf("run returned (%v) while a request was in flight", err)
	default:
	}
	pg.resume()

	res := <-inflight
	if res.status != http.StatusOK || !strings.Contains(string(res.body), "in flight") {
		t.Errorf("in-flight request: got %d %s; want 200 with the item", res.status, res.body)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run: %v; want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("run did not return within 10 s of the last request")
	}
}

// TestRunConfigError: an invalid variable stops the service at startup with
// a message that names it.
func TestRunConfigError(t *testing.T) {
	getenv := func(k string) string {
		return map[string]string{"CACHE_TTL": "soon", "DB_PASSWORD": "hunter2"}[k]
	}
	err := run(t.Context(), []string{"items"}, getenv, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "CACHE_TTL") {
		t.Fatalf("run with CACHE_TTL=soon: %v; want an error naming CACHE_TTL", err)
	}
	if strings.Contains(err.Error(), "hunter2") {
		t.Errorf("error %q shows the password", err)
	}
	if err := run(t.Context(), []string{"items", "serve-please"}, func(string) string { return "" }, io.Discard); err == nil {
		t.Error("run with an unknown command: nil; want an error")
	}
}

// TestStartupWaitsForPostgres: run waits while PostgreSQL is unreachable and
// starts as soon as it answers; with no PostgreSQL at all it gives up after
// DB_CONNECT_TIMEOUT with a message that says so.
func TestStartupWaitsForPostgres(t *testing.T) {
	cfg := testConfig(t)
	logs := newLogBuffer(t)
	newTestStore(t, cfg, logs.logger())
	newTestCache(t, cfg, logs.logger())
	pg := newProxy(t, net.JoinHostPort(cfg.DBHost, strconv.Itoa(cfg.DBPort)))
	pg.setCut(true)
	cfg.DBHost, cfg.DBPort = "127.0.0.1", pg.port()
	cfg.DBConnectTimeout = 20 * time.Second

	go func() {
		time.Sleep(1500 * time.Millisecond)
		pg.setCut(false)
	}()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	start := time.Now()
	base, done := startRun(t, ctx, envFrom(cfg))
	waited := time.Since(start)
	if waited < time.Second {
		t.Errorf("run listened after %v, before PostgreSQL was reachable", waited)
	}
	t.Logf("PostgreSQL reachable after 1.5 s: listening after %v", waited.Round(time.Millisecond))
	if res := do(t, "GET", base+"/ready", ""); res.status != http.StatusOK {
		t.Errorf("GET /ready after startup: %d %s; want 200", res.status, res.body)
	}
	cancel()
	<-done

	cfg.DBPort = freePort(t)
	cfg.DBConnectTimeout = 1500 * time.Millisecond
	start = time.Now()
	err := run(t.Context(), []string{"items"}, envFrom(cfg), io.Discard)
	if err == nil || !strings.Contains(err.Error(), "DB_CONNECT_TIMEOUT") {
		t.Errorf("run with no PostgreSQL: %v; want an error naming DB_CONNECT_TIMEOUT", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("run with no PostgreSQL took %v to give up; want about DB_CONNECT_TIMEOUT (1.5 s)", took)
	} else {
		t.Logf("no PostgreSQL, DB_CONNECT_TIMEOUT=1.5s: gave up after %v: %v", took.Round(time.Millisecond), err)
	}
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestInternalErrorsStayInternal: a panic or an unexpected error becomes a
// 500 with a generic JSON message; the detail goes only to the log.
func TestInternalErrorsStayInternal(t *testing.T) {
	logs := newLogBuffer(t)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /panic", func(http.ResponseWriter, *http.Request) { panic("secret detail") })
	mux.HandleFunc("GET /fail", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, r, errors.New("pq: secret detail"))
	})
	h := logRequests(logs.logger(), mux)
	for _, path := range []string{"/panic", "/fail"} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		res := response{status: rec.Code, header: rec.Header(), body: rec.Body.Bytes()}
		if res.status != 500 {
			t.Errorf("GET %s: got %d; want 500", path, res.status)
		}
		if msg := errorMessage(t, res); msg != "internal server error" {
			t.Errorf("GET %s: message %q; want the generic one", path, msg)
		}
	}
	if n := logs.count("level=ERROR msg=request"); n != 2 || logs.count("secret detail") != 2 {
		t.Errorf("log: want 2 error lines with the detail; got:\n%s", logs)
	}
}

// TestMain lets a test run this test binary as the service itself (main,
// with the real signal handling) by setting ITEMS_TEST_RUN_MAIN=1.
func TestMain(m *testing.M) {
	if os.Getenv("ITEMS_TEST_RUN_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// startProcess runs the service as a process of its own with cfg: the
// program bin, or if bin is "", this test binary through TestMain. It
// returns its URL, the process, and a channel with its exit.
func startProcess(t *testing.T, cfg Config, bin string) (string, *exec.Cmd, <-chan error) {
	t.Helper()
	getenv := envFrom(cfg)
	cmd := exec.Command(bin)
	cmd.Env = os.Environ()
	if bin == "" {
		cmd = exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), "ITEMS_TEST_RUN_MAIN=1")
	}
	for _, k := range []string{"PORT", "DB_HOST", "DB_PORT", "DB_SCHEMA", "DB_QUERY_TIMEOUT", "REDIS_HOST", "REDIS_PORT",
		"CACHE_KEY_PREFIX", "SHUTDOWN_TIMEOUT", "LOG_FORMAT", "LOG_LEVEL"} {
		cmd.Env = append(cmd.Env, k+"="+getenv(k))
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = t.Output()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	addr := make(chan string, 1)
	go func() {
		scanLog(t, stdout, addr)
		exited <- cmd.Wait()
	}()
	t.Cleanup(func() { cmd.Process.Kill() })
	select {
	case a := <-addr:
		_, port, _ := net.SplitHostPort(a)
		return "http://127.0.0.1:" + port, cmd, exited
	case <-time.After(30 * time.Second):
		t.Fatal("the service did not start listening within 30 s")
	}
	return "", nil, nil
}

// TestSIGTERMUnderLoad runs the service as a process, loads it with reads
// and writes, holds some requests in flight (PostgreSQL stalled behind a
// proxy) and sends SIGTERM. The requests in flight must finish with their
// real answers, new connections must be refused, no request may get a 5xx,
// every 201 must be stored, and the process must exit 0 within
// SHUTDOWN_TIMEOUT.
func TestSIGTERMUnderLoad(t *testing.T) {
	cfg := testConfig(t)
	logs := newLogBuffer(t)
	store := newTestStore(t, cfg, logs.logger())
	newTestCache(t, cfg, logs.logger())
	cached, err := store.CreateItem(t.Context(), "cached", nil)
	if err != nil {
		t.Fatal(err)
	}
	pg := newProxy(t, net.JoinHostPort(cfg.DBHost, strconv.Itoa(cfg.DBPort)))
	cfg.DBHost, cfg.DBPort = "127.0.0.1", pg.port()
	cfg.DBQueryTimeout = 10 * time.Second
	cfg.ShutdownTimeout = 5 * time.Second

	base, cmd, exited := startProcess(t, cfg, "")
	if res := do(t, "GET", fmt.Sprintf("%s/items/%d", base, cached.ID), ""); res.status != 200 {
		t.Fatalf("GET: got %d %s", res.status, res.body)
	}

	// The load: readers of a cached item and writers, until told to stop.
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}, Timeout: 30 * time.Second}
	defer client.CloseIdleConnections()
	var termSent atomic.Bool
	var ok, refusedAfterTerm, inflight, finishedAfterTerm atomic.Int64
	var mu sync.Mutex
	var failures []string
	var created []Item
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				var req *http.Request
				if (w+n)%4 == 0 {
					req, _ = http.NewRequest("POST", base+"/items", strings.NewReader(fmt.Sprintf(`{"name":"load %d-%d"}`, w, n)))
					req.Header.Set("Content-Type", "application/json")
				} else {
					req, _ = http.NewRequest("GET", fmt.Sprintf("%s/items/%d", base, cached.ID), nil)
				}
				startedBeforeTerm := !termSent.Load()
				inflight.Add(1)
				resp, err := client.Do(req)
				inflight.Add(-1)
				if err != nil {
					if !startedBeforeTerm {
						refusedAfterTerm.Add(1)
						time.Sleep(5 * time.Millisecond)
						continue
					}
					mu.Lock()
					failures = append(failures, fmt.Sprintf("%s sent before SIGTERM: %v", req.Method, err))
					mu.Unlock()
					return
				}
				if startedBeforeTerm && termSent.Load() {
					finishedAfterTerm.Add(1)
				}
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				mu.Lock()
				switch {
				case err != nil:
					failures = append(failures, fmt.Sprintf("%s: reading the answer: %v", req.Method, err))
				case req.Method == "POST" && resp.StatusCode == 201:
					var it Item
					json.Unmarshal(body, &it)
					created = append(created, it)
					ok.Add(1)
				case req.Method == "GET" && resp.StatusCode == 200:
					ok.Add(1)
				default:
					failures = append(failures, fmt.Sprintf("%s: %d %s", req.Method, resp.StatusCode, body))
				}
				mu.Unlock()
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	pg.stall() // each client's next write waits in PostgreSQL: in flight at SIGTERM
	waitFor(t, "every client to wait on a write", func() bool { return inflight.Load() == 8 && pg.held.Load() >= 8 })

	termSent.Store(true)
	sent := time.Now()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "new connections to be refused", func() bool {
		c, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	time.Sleep(200 * time.Millisecond)
	pg.resume()
	var exitErr error
	select {
	case exitErr = <-exited:
	case <-time.After(cfg.ShutdownTimeout + 5*time.Second):
		t.Fatal("the service did not exit within SHUTDOWN_TIMEOUT + 5 s of SIGTERM")
	}
	took := time.Since(sent)
	close(stop)
	wg.Wait()

	if exitErr != nil {
		t.Errorf("exit: %v; want status 0", exitErr)
	}
	if took > cfg.ShutdownTimeout {
		t.Errorf("exit %v after SIGTERM; want within SHUTDOWN_TIMEOUT=%v", took, cfg.ShutdownTimeout)
	}
	for _, f := range failures {
		t.Error(f)
	}
	if n := finishedAfterTerm.Load(); n != 8 {
		t.Errorf("requests in flight at SIGTERM that got their answers: %d; want all 8", n)
	}
	for _, it := range created {
		got, err := store.GetItem(t.Context(), it.ID)
		if err != nil || got.Name != it.Name {
			t.Errorf("item %d answered 201 before shutdown: stored %+v, %v", it.ID, got, err)
		}
	}
	t.Logf("SIGTERM under load: %d answers, %d of them to the 8 requests in flight at SIGTERM; %d items created and stored; "+
		"%d attempts refused after SIGTERM; exit 0 %v after SIGTERM (PostgreSQL held for 200 ms of it)",
		ok.Load(), finishedAfterTerm.Load(), len(created), refusedAfterTerm.Load(), took.Round(time.Millisecond))
}

// rssKiB is a process's resident memory, from /proc (Linux).
func rssKiB(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Skipf("no /proc to measure memory: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	t.Fatal("no VmRSS in /proc status")
	return 0
}

// TestSlowClients attacks the service process with 200 clients that send
// their headers one byte a second and 20 that send a body that never ends,
// slowly; plus one body that never ends, fast, and headers too large. The
// server cuts each off at its limit (ReadHeaderTimeout 5 s, ReadTimeout 15 s,
// 1 MiB bodies, 64 KiB headers), keeps answering others at once, and its
// memory stays flat.
func TestSlowClients(t *testing.T) {
	if testing.Short() {
		t.Skip("takes 16 s; skipped with -short")
	}
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	newTestStore(t, cfg, log)
	newTestCache(t, cfg, log)
	// The service as built for use: a test binary built with -race uses
	// several times the memory.
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build the service: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "items")
	if out, err := exec.Command(goBin, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	base, cmd, _ := startProcess(t, cfg, bin)
	addr := strings.TrimPrefix(base, "http://")
	for range 50 { // warm up
		do(t, "GET", base+"/health", "")
	}
	before := rssKiB(t, cmd.Process.Pid)

	dial := func() net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// cutOff sends request, a byte a second, until the server closes the
	// connection; it reports when, and what the server said.
	type cut struct {
		after  time.Duration
		answer string
	}
	cutOff := func(c net.Conn, request string) <-chan cut {
		done := make(chan cut, 1)
		start := time.Now()
		go func() {
			var answer bytes.Buffer
			closed := make(chan struct{})
			go func() { io.Copy(&answer, c); close(closed) }()
			for i := 0; ; i++ {
				select {
				case <-closed:
					first, _, _ := strings.Cut(answer.String(), "\r\n")
					done <- cut{time.Since(start), first}
					return
				case <-time.After(time.Second):
				}
				if i < len(request) {
					c.Write([]byte{request[i]})
				}
			}
		}()
		return done
	}
	var slowHeaders, slowBodies []<-chan cut
	for range 200 {
		slowHeaders = append(slowHeaders, cutOff(dial(), "GET /items/1 HTTP/1.1\r\nHost: x\r\nX-Slow: "+strings.Repeat("a", 100)))
	}
	for range 20 {
		c := dial()
		fmt.Fprint(c, "POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
		slowBodies = append(slowBodies, cutOff(c, `{"name":"`+strings.Repeat("n", 1000)))
	}

	// A body that never ends, fast, in chunks: cut at 1 MiB.
	fast := dial()
	fmt.Fprint(fast, "POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
	go func() {
		chunk := fmt.Sprintf("%x\r\n%s\r\n", 64<<10, strings.Repeat("x", 64<<10))
		for {
			if _, err := io.WriteString(fast, chunk); err != nil {
				return
			}
		}
	}()
	fast.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(fast), nil)
	if err != nil || resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("a body that never ends, fast: got %v, %v; want 413", resp, err)
	}

	// Headers over 64 KiB.
	big := dial()
	fmt.Fprintf(big, "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n", strings.Repeat("b", 100<<10))
	big.SetReadDeadline(time.Now().Add(5 * time.Second))
	if resp, err := http.ReadResponse(bufio.NewReader(big), nil); err != nil || resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("headers of 100 KiB: got %v, %v; want 431", resp, err)
	}

	// Meanwhile, others are served at once, and memory stays flat.
	time.Sleep(2 * time.Second)
	var slowest time.Duration
	for range 20 {
		res := do(t, "GET", base+"/health", "")
		if res.status != 200 {
			t.Errorf("GET /health during the attack: got %d", res.status)
		}
		slowest = max(slowest, res.elapsed)
	}
	if slowest > 500*time.Millisecond {
		t.Errorf("GET /health during the attack took up to %v; want at once", slowest)
	}
	during := rssKiB(t, cmd.Process.Pid)
	if grew := during - before; grew > 20<<10 {
		t.Errorf("RSS with 221 slow clients connected: %d KiB, up %d KiB from %d; want under 20 MiB more", during, grew, before)
	}

	var lastHeader, lastBody time.Duration
	for _, c := range slowHeaders {
		got := <-c
		if got.after > 8*time.Second {
			t.Errorf("a client sending headers a byte a second was cut off after %v; want about ReadHeaderTimeout (5 s)", got.after)
		}
		lastHeader = max(lastHeader, got.after)
	}
	for _, c := range slowBodies {
		got := <-c
		if got.after > 18*time.Second || !strings.Contains(got.answer, "408") {
			t.Errorf("a client sending its body a byte a second: cut off after %v with %q; want 408 after about ReadTimeout (15 s)", got.after, got.answer)
		}
		lastBody = max(lastBody, got.after)
	}
	if res := do(t, "GET", base+"/health", ""); res.status != 200 {
		t.Errorf("GET /health after the attack: got %d", res.status)
	}
	t.Logf("RSS %d KiB before, %d KiB with 200 slow-header and 20 slow-body clients (up %d KiB); slow headers cut within %v, slow bodies within %v; /health answered within %v",
		before, during, during-before, lastHeader.Round(100*time.Millisecond), lastBody.Round(100*time.Millisecond), slowest)
}

// TestShutdownWithSlowClients: at shutdown, a connection that has sent
// nothing yet and an upload still trickling in must not hold the service
// past SHUTDOWN_TIMEOUT: the first is closed at once, the second gets
// drainGrace to finish its body, then a 408; run returns nil. A body that
// the server answers without reading never holds it either.
func TestShutdownWithSlowClients(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	newTestStore(t, cfg, log)
	newTestCache(t, cfg, log)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	base, done := startRun(t, ctx, envFrom(cfg))
	addr := strings.TrimPrefix(base, "http://")

	silent, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	upload, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer upload.Close()
	fmt.Fprint(upload, "POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\":")
	stopTrickle := make(chan struct{})
	defer close(stopTrickle)
	go func() {
		for {
			select {
			case <-stopTrickle:
				return
			case <-time.After(200 * time.Millisecond):
				upload.Write([]byte(" "))
			}
		}
	}()
	// A body the server will not read (the wrong Content-Type), still
	// arriving: the 415 comes within drainGrace and the connection is
	// closed, rather than the server waiting for the rest of the body.
	unread, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer unread.Close()
	fmt.Fprint(unread, "POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nx")
	unread.SetReadDeadline(time.Now().Add(2 * time.Second))
	br := bufio.NewReader(unread)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusUnsupportedMediaType {
		t.Fatalf("a body the server does not read: got %v, %v; want 415", resp, err)
	}
	io.Copy(io.Discard, resp.Body)
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("after the 415: read %v; want the connection closed", err)
	}

	time.Sleep(300 * time.Millisecond) // both are in: one idle, one reading a body

	start := time.Now()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run: %v; want nil", err)
		}
	case <-time.After(cfg.ShutdownTimeout + 5*time.Second):
		t.Fatal("run did not return")
	}
	took := time.Since(start)
	if took > drainGrace+time.Second {
		t.Errorf("shutdown with a silent connection and a slow upload took %v; want about drainGrace (%v)", took, drainGrace)
	}
	upload.SetReadDeadline(time.Now().Add(2 * time.Second))
	resp, err = http.ReadResponse(bufio.NewReader(upload), nil)
	if err != nil || resp.StatusCode != http.StatusRequestTimeout {
		t.Errorf("the upload in progress at shutdown: got %v, %v; want 408", resp, err)
	}
	silent.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := silent.Read(make([]byte, 1)); err == nil {
		t.Errorf("the silent connection is still open after shutdown (read %d bytes)", n)
	}
	t.Logf("shutdown with a silent connection and a slow upload: %v", took.Round(time.Millisecond))
}

// TestLogWriter: lines keep their order, reach the output within the flush
// interval without a Close, and Close writes out the rest.
func TestLogWriter(t *testing.T) {
	var mu sync.Mutex
	var out bytes.Buffer
	w := writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return out.Write(p)
	})
	lw := newLogWriter(w, 50*time.Millisecond)
	fmt.Fprintln(lw, "one")
	fmt.Fprintln(lw, "two")
	waitFor(t, "the lines to be flushed", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return out.String() == "one\ntwo\n"
	})
	fmt.Fprintln(lw, "three")
	if err := lw.Close(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if out.String() != "one\ntwo\nthree\n" {
		t.Errorf("output: %q; want the three lines in order", out.String())
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// TestDebugVars: GET /debug/vars is expvar's JSON with this server's
// counters under "items", which follow what the requests did.
func TestDebugVars(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	base := testServer(t, log, newTestStore(t, cfg, log), newTestCache(t, cfg, log))
	it := createItem(t, base, `{"name":"counted"}`)
	do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "")      // miss
	do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "")      // hit
	do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "")      // hit
	do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID+1000), "") // miss, 404
	res := do(t, "GET", base+"/debug/vars", "")
	var vars struct {
		Cmdline  []string
		Memstats struct{ HeapAlloc uint64 }
		Items    map[string]int64
	}
	if res.status != 200 || json.Unmarshal(res.body, &vars) != nil {
		t.Fatalf("GET /debug/vars: got %d %s; want 200 with JSON", res.status, res.body)
	}
	want := map[string]int64{"cache_hits": 2, "cache_misses": 2, "cache_bypasses": 0, "redis_errors": 0,
		"postgres_errors": 0, "postgres_item_reads": 2, "waiting_for_item_reads": 0}
	if !maps.Equal(vars.Items, want) {
		t.Errorf("items counters: got %v; want %v", vars.Items, want)
	}
	if len(vars.Cmdline) == 0 || vars.Memstats.HeapAlloc == 0 {
		t.Errorf("expvar's own cmdline and memstats are missing: %s", res.body)
	}
}

// requestLineBySlog is the line slog's TextHandler writes for the same
// request, for appendRequestLine to match.
func requestLineBySlog(t time.Time, method, route, path string, status int, d time.Duration, cache string) string {
	var b bytes.Buffer
	r := slog.NewRecord(t, slog.LevelInfo, "request", 0)
	r.AddAttrs(slog.String("method", method), slog.String("route", route), slog.String("path", path),
		slog.Int("status", status), slog.Duration("duration", d), slog.String("cache", cache))
	slog.NewTextHandler(&b, nil).Handle(context.Background(), r)
	return b.String()
}

// TestRequestLine: the request log line written without slog is byte for
// byte the one slog's TextHandler writes, or is left to slog.
func TestRequestLine(t *testing.T) {
	at := time.Date(2026, 11, 29, 19, 17, 46, 160_999_999, time.UTC)
	cases := []struct {
		method, route, path, cache string
		status                     int
		d                          time.Duration
		t                          time.Time
	}{
		{"GET", "GET /items/{id}", "/items/1", "HIT", 200, 180193 * time.Nanosecond, at},
		{"GET", "", "/nope", "", 404, 16 * time.Microsecond, at.Add(-160_999_999)},
		{"POST", "POST /items", "/items", "", 201, 1612313 * time.Microsecond, at.In(time.FixedZone("x", -5*3600))},
		{"GET", "GET /items/{id}", `/items/a=b"c\d`, "MISS", 400, 0, at.Add(999_999)},
		{"GET", "GET /items/{id}", "/items/%20x", "BYPASS", 200, time.Hour, at},
		{"GET", "GET /items/{id}", "/items/\x01\t", "\x7f", 400, time.Nanosecond, at},
		{"M", "r", "p", "c", 999, -time.Second, time.Unix(0, 0).UTC()},
	}
	for _, c := range cases {
		line, ok := appendRequestLine(nil, c.t, c.method, c.route, c.path, c.status, c.d, c.cache)
		want := requestLineBySlog(c.t, c.method, c.route, c.path, c.status, c.d, c.cache)
		if !ok || string(line) != want {
			t.Errorf("appendRequestLine: got %q, %v; want %q", line, ok, want)
		}
	}
	if _, ok := appendRequestLine(nil, at, "GET", "", "/é", 404, 0, ""); ok {
		t.Error("appendRequestLine wrote a path with a byte outside ASCII; want it left to slog")
	}
}

func FuzzRequestLine(f *testing.F) {
	f.Add("GET", "GET /items/{id}", "/items/1", "HIT", 200, int64(180193), int64(1795000000160999999))
	f.Add("", "", "", "", 0, int64(0), int64(0))
	f.Fuzz(func(t *testing.T, method, route, path, cache string, status int, d, unixNano int64) {
		at := time.Unix(0, unixNano).UTC()
		line, ok := appendRequestLine(nil, at, method, route, path, status, time.Duration(d), cache)
		if !ok {
			return
		}
		if want := requestLineBySlog(at, method, route, path, status, time.Duration(d), cache); string(line) != want {
			t.Fatalf("appendRequestLine: got %q; want %q", line, want)
		}
	})
}
