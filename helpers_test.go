package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The tests' helpers. The tests run against real PostgreSQL and Redis,
// reached through the same DB_* and REDIS_* variables as the service
// (defaults: localhost, appuser, appdb). Each test gets its own PostgreSQL
// schema and Redis key prefix and removes them when it ends, so a running
// stack on the same servers is never touched. `go test -short ./...` runs
// only the tests that need no server.

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
	// A ping, not a Store: opening a Store would migrate the environment's
	// own schema (public, unless DB_SCHEMA says otherwise), which may be a
	// running stack's.
	db, err := sql.Open("pgx", cfg.dsn())
	if err != nil {
		return err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	return classify(db.PingContext(ctx))
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
	cache := newCache(cfg, itemShape, log)
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

// newReplica is another instance of the service on cfg's PostgreSQL schema
// and Redis, as a second process would be: its own pool, Redis client and
// shared reads. The test's first store and cache create and remove the
// schema and the keys.
func newReplica(t testing.TB, cfg Config, log *slog.Logger) *Items {
	t.Helper()
	store, err := openStore(t.Context(), cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	cache := newCache(cfg, itemShape, log)
	t.Cleanup(func() {
		cache.Close()
		store.Close()
	})
	return newItems(store, cache)
}

// testServer serves the API over real HTTP and returns its base URL.
func testServer(t testing.TB, log *slog.Logger, store *Store, cache *Cache) string {
	t.Helper()
	return serveItems(t, log, newItems(store, cache))
}

// serveWithCache serves the API with a new store and a cache of cfg's
// Redis, one the test runs itself (its keys are not deleted at the end, as
// newTestCache deletes them on the shared one), and returns its base URL
// and the cache.
func serveWithCache(t testing.TB, cfg Config, log *slog.Logger) (string, *Cache) {
	t.Helper()
	cache := newCache(cfg, itemShape, log)
	t.Cleanup(func() { cache.Close() })
	return testServer(t, log, newTestStore(t, cfg, log), cache), cache
}

// serveItems is testServer for a test that looks into items.
func serveItems(t testing.TB, log *slog.Logger, items *Items) string {
	t.Helper()
	srv := &http.Server{Handler: newServer(Config{}, log, items)}
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
	if resp.Header.Get("Content-Type") == "application/json" && method != "HEAD" && resp.ContentLength != int64(len(b)) {
		t.Errorf("%s %s: Content-Length %d for a body of %d bytes; want every JSON answer to say its length", method, url, resp.ContentLength, len(b))
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

// needTool fails the test in CI, which installs every tool (.ci/run), and
// skips it elsewhere.
func needTool(t *testing.T, name, pkg string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("%s is needed (apt-get install %s)", name, pkg)
	}
	t.Skipf("%s is not installed (apt-get install %s), so this test cannot run its own server", name, pkg)
}

// startRedis runs a private redis-server on port, with extra arguments,
// until stop is called or the test ends. It returns stop.
func startRedis(t *testing.T, port int, args ...string) (stop func()) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		needTool(t, "redis-server", "redis-server") // CI installs it (.ci/run); on a laptop with only Docker, skip
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

// seqOf is the number after the "-" in the name of the item whose JSON is
// body: the stress tests name each write "<slot>-<seq>".
func seqOf(body string) (int64, bool) {
	var it Item
	if json.Unmarshal([]byte(body), &it) != nil {
		return 0, false
	}
	_, n, ok := strings.Cut(it.Name, "-")
	seq, err := strconv.ParseInt(n, 10, 64)
	return seq, ok && err == nil
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

// runService starts the whole service with run, on a schema and a key
// prefix of its own, the variables of cfg and extra (pairs of name and
// value); stop is its SIGTERM.
func runService(t *testing.T, extra ...string) (cfg Config, base string, done <-chan error, stop context.CancelFunc) {
	t.Helper()
	cfg = testConfig(t)
	log := newLogBuffer(t).logger()
	newTestStore(t, cfg, log)
	newTestCache(t, cfg, log)
	ctx, stop := context.WithCancel(t.Context())
	t.Cleanup(stop)
	base, done = startRun(t, ctx, envFrom(cfg, extra...))
	return cfg, base, done, stop
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

// loadClients runs count clients of a load: each calls request(w, n),
// w its number and n 0, 1, ..., until stop is closed or request returns
// false. wait waits for them all to end.
func loadClients(count int, stop <-chan struct{}, request func(w, n int) bool) (wait func()) {
	var wg sync.WaitGroup
	for w := range count {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				if !request(w, n) {
					return
				}
			}
		}()
	}
	return wg.Wait
}

// step waits d, logs what, then does it: one step of a fault schedule.
func step(t *testing.T, d time.Duration, what string, do func()) {
	t.Helper()
	time.Sleep(d)
	t.Logf("%s", what)
	do()
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

// startProcess runs the service as a process of its own with cfg and the
// extra variables (name, value, ...): the program bin, or if bin is "",
// this test binary through TestMain. It returns its URL, the process, and
// a channel with its exit.
func startProcess(t *testing.T, cfg Config, bin string, extra ...string) (string, *exec.Cmd, <-chan error) {
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
	for i := 0; i+1 < len(extra); i += 2 {
		cmd.Env = append(cmd.Env, extra[i]+"="+extra[i+1])
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

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// lockItems locks cfg's items table from a session of its own, so that
// every query on it waits, until unlock is called or the test ends.
func lockItems(t *testing.T, cfg Config) (unlock func()) {
	t.Helper()
	locker, err := openStore(t.Context(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	tx, err := locker.db.BeginTx(t.Context(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(t.Context(), "LOCK TABLE items IN ACCESS EXCLUSIVE MODE"); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	unlock = func() {
		once.Do(func() {
			tx.Rollback()
			locker.Close()
		})
	}
	t.Cleanup(unlock)
	return unlock
}

// rawSQL runs statements on cfg's database outside any Store: no
// migration runs first.
func rawSQL(t *testing.T, cfg Config, statements ...string) {
	t.Helper()
	db, err := sql.Open("pgx", cfg.dsn())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, s := range statements {
		if _, err := db.ExecContext(t.Context(), s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
}
