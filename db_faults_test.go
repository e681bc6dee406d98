package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/fstest"
	"time"

	"github.com/pressly/goose/v3"
)

// PostgreSQL as a deployment meets it every month: online DDL, backends
// terminated under the service, clients hanging up mid-request, a primary
// turned read-only, a failover to a standby, a pooler in transaction mode.
// Each test runs the service under a concurrent load and counts what the
// clients see (see load).

// pgServer is a private PostgreSQL cluster made by initdb on a free port, for
// a test that stops, reconfigures or fails it over: the shared server is
// never touched. Role appuser and database appdb exist as in compose.yaml.
type pgServer struct {
	t    *testing.T
	dir  string
	port int
	bin  string
}

// pgBin finds PostgreSQL's server programs (initdb, pg_ctl), which Debian
// keeps out of PATH; CI has them (.ci/run installs postgresql).
func pgBin(t *testing.T, name string) string {
	t.Helper()
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.Reverse(dirs) // the newest first
	for _, d := range dirs {
		if p := filepath.Join(d, name); fileExists(p) {
			return p
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	needTool(t, name, "postgresql")
	return ""
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// asPostgres runs cmd as the postgres user when the tests run as root:
// initdb, postgres and pgbouncer refuse to run as root.
func asPostgres(t *testing.T, cmd *exec.Cmd, dirs ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		return
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		t.Fatalf("running as root, and no postgres user to run PostgreSQL as: %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	for _, d := range dirs {
		if err := os.Chown(d, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
}

// privateDir is a new directory that asPostgres's user can use.
func privateDir(t *testing.T, pattern string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", pattern)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func runAs(t *testing.T, dirs []string, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	asPostgres(t, cmd, dirs...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
}

// startPostgres makes and starts a cluster with settings (name=value lines
// for postgresql.conf), with streaming replication allowed.
func startPostgres(t *testing.T, settings ...string) *pgServer {
	t.Helper()
	s := &pgServer{t: t, dir: privateDir(t, "pg"), port: freePort(t), bin: filepath.Dir(pgBin(t, "initdb"))}
	data := filepath.Join(s.dir, "data")
	runAs(t, []string{s.dir}, filepath.Join(s.bin, "initdb"), "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
	s.configure(append([]string{"wal_level = replica", "max_wal_senders = 4", "hot_standby = on"}, settings...)...)
	s.start()
	s.psql("CREATE ROLE appuser LOGIN PASSWORD 'secret'")
	s.psql("CREATE DATABASE appdb OWNER appuser")
	return s
}

// startStandby makes a streaming standby of primary with pg_basebackup.
func (primary *pgServer) startStandby() *pgServer {
	t := primary.t
	t.Helper()
	s := &pgServer{t: t, dir: privateDir(t, "pg"), port: freePort(t), bin: primary.bin}
	runAs(t, []string{s.dir}, filepath.Join(s.bin, "pg_basebackup"), "-h", "127.0.0.1", "-p", strconv.Itoa(primary.port),
		"-U", "postgres", "-D", filepath.Join(s.dir, "data"), "-R", "-X", "stream", "-c", "fast", "--no-sync")
	s.start()
	return s
}

func (s *pgServer) configure(lines ...string) {
	data := filepath.Join(s.dir, "data")
	conf := fmt.Sprintf("port = %d\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\nfsync = off\n"+
		"synchronous_commit = off\nfull_page_writes = off\n%s\n", s.port, s.dir, strings.Join(lines, "\n"))
	f, err := os.OpenFile(filepath.Join(data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err == nil {
		_, err = f.WriteString(conf)
		f.Close()
	}
	if err != nil {
		s.t.Fatal(err)
	}
}

func (s *pgServer) start() {
	s.t.Helper()
	data := filepath.Join(s.dir, "data")
	if !strings.Contains(readFile(s.t, filepath.Join(data, "postgresql.conf")), fmt.Sprintf("port = %d\n", s.port)) {
		s.configure()
	}
	s.pgctl("start", "-w", "-l", filepath.Join(s.dir, "log"))
	s.t.Cleanup(func() { s.stop("immediate") })
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// stop stops the server (mode: smart, fast or immediate); once stopped, it
// is a no-op.
func (s *pgServer) stop(mode string) {
	cmd := exec.Command(filepath.Join(s.bin, "pg_ctl"), "stop", "-D", filepath.Join(s.dir, "data"), "-m", mode, "-w")
	asPostgres(s.t, cmd)
	cmd.Run()
}

func (s *pgServer) pgctl(args ...string) {
	s.t.Helper()
	runAs(s.t, nil, filepath.Join(s.bin, "pg_ctl"), append(args[:1:1], append([]string{"-D", filepath.Join(s.dir, "data")}, args[1:]...)...)...)
}

// psql runs SQL as the superuser on database appdb (postgres before it
// exists) and returns the output, unaligned.
func (s *pgServer) psql(query string) string {
	s.t.Helper()
	db := "appdb"
	if strings.HasPrefix(query, "CREATE ROLE") || strings.HasPrefix(query, "CREATE DATABASE") {
		db = "postgres"
	}
	out, err := exec.Command("psql", "-X", "-qAt", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", strconv.Itoa(s.port),
		"-U", "postgres", "-d", db, "-c", query).CombinedOutput()
	if err != nil {
		s.t.Fatalf("psql -c %q: %v\n%s", query, err, out)
	}
	return strings.TrimSpace(string(out))
}

// config is cfg pointed at this server.
func (s *pgServer) config(cfg Config) Config {
	cfg.DBHost, cfg.DBPort = "127.0.0.1", s.port
	return cfg
}

// load is a set of clients of the API that run until stopped and count
// every answer they get. Each client owns one item: it replaces it, reads
// it back (a miss: the write invalidated it), patches it, and lists a
// page, so every step reaches PostgreSQL; every 10th round it also creates
// and deletes an item. A read that does not show the client's last
// acknowledged write is counted as stale.
type load struct {
	base   string
	client *http.Client
	stop   chan struct{}
	wg     sync.WaitGroup

	mu           sync.Mutex
	ok           int
	errors       map[string]int // "METHOD status: error message" -> count
	noRetryAfter int            // 503 answers without Retry-After
	unknown      int            // of errors, POSTs and DELETEs whose outcome the service said it cannot know
	stale        int
	firstError   time.Time
	lastError    time.Time
}

func startLoad(t *testing.T, base string, clients int) *load {
	t.Helper()
	l := &load{base: base, stop: make(chan struct{}), errors: map[string]int{},
		client: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: clients}}}
	for i := range clients {
		res, err := l.send("POST", "/items", fmt.Sprintf(`{"name":"client %d"}`, i))
		if err != nil || res.status != http.StatusCreated {
			t.Fatalf("create the load's items: %v %d %s", err, res.status, res.body)
		}
		var it Item
		json.Unmarshal(res.body, &it)
		l.wg.Add(1)
		go l.run(it.ID, i)
	}
	t.Cleanup(func() { l.finish() })
	return l
}

func (l *load) send(method, path, body string) (response, error) {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, _ := http.NewRequest(method, l.base+path, rd)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	start := time.Now()
	resp, err := l.client.Do(req)
	if err != nil {
		return response{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return response{status: resp.StatusCode, header: resp.Header, body: b, elapsed: time.Since(start)}, err
}

func (l *load) run(id int64, client int) {
	defer l.wg.Done()
	item := fmt.Sprintf("/items/%d", id)
	for n := 0; ; n++ {
		select {
		case <-l.stop:
			return
		default:
		}
		name := fmt.Sprintf("client %d round %d", client, n)
		acked := l.expect("PUT", item, fmt.Sprintf(`{"name":%q}`, name), http.StatusOK)
		if res, ok := l.step("GET", item, "", http.StatusOK); ok && acked {
			var it Item
			if json.Unmarshal(res.body, &it) != nil || it.Name != name {
				l.mu.Lock()
				l.stale++
				l.mu.Unlock()
			}
		}
		l.expect("PATCH", item, `{"description":"patched"}`, http.StatusOK)
		l.expect("GET", fmt.Sprintf("/items?after=%d&limit=20", max(0, id-10)), "", http.StatusOK)
		if n%10 == 0 {
			if res, ok := l.step("POST", "/items", `{"name":"extra"}`, http.StatusCreated); ok {
				var it Item
				json.Unmarshal(res.body, &it)
				l.expect("DELETE", fmt.Sprintf("/items/%d", it.ID), "", http.StatusNoContent)
			}
		}
	}
}

func (l *load) expect(method, path, body string, want int) bool {
	_, ok := l.step(method, path, body, want)
	return ok
}

// step sends one request and counts its answer: ok if its status is want.
func (l *load) step(method, path, body string, want int) (response, bool) {
	res, err := l.send(method, path, body)
	l.mu.Lock()
	defer l.mu.Unlock()
	if err == nil && res.status == want {
		l.ok++
		return res, true
	}
	key := fmt.Sprintf("%s %v", method, err)
	if err == nil {
		var e errorBody
		json.Unmarshal(res.body, &e)
		key = fmt.Sprintf("%s %d: %s", method, res.status, e.Error)
		if res.status == http.StatusServiceUnavailable && res.header.Get("Retry-After") == "" {
			l.noRetryAfter++
		}
		if res.status == http.StatusServiceUnavailable && (method == "POST" || method == "DELETE") &&
			strings.Contains(e.Error, "whether it was applied is unknown") {
			l.unknown++
		}
	}
	l.errors[key]++
	now := time.Now()
	if l.firstError.IsZero() {
		l.firstError = now
	}
	l.lastError = now
	return res, false
}

// finish stops the clients and waits for them.
func (l *load) finish() {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	l.wg.Wait()
}

// report stops the load and logs its counts; it returns the number of
// answers that were not the expected success, and how many of those were
// creates or deletes cut off mid-statement, whose outcome is unknown.
func (l *load) report(t *testing.T) (errors, unknown int) {
	t.Helper()
	l.finish()
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, n := range l.errors {
		errors += n
		t.Logf("  %d × %s", n, k)
	}
	window := time.Duration(0)
	if errors > 0 {
		window = l.lastError.Sub(l.firstError)
	}
	t.Logf("load: %d answers as expected, %d not (within %v; %d of them creates or deletes of unknown outcome), %d stale reads, %d 503s without Retry-After",
		l.ok, errors, window.Round(time.Millisecond), l.unknown, l.stale, l.noRetryAfter)
	if l.stale > 0 {
		t.Errorf("%d reads did not show the client's acknowledged write", l.stale)
	}
	if l.noRetryAfter > 0 {
		t.Errorf("%d answers 503 without Retry-After", l.noRetryAfter)
	}
	if l.ok == 0 {
		t.Error("no request succeeded")
	}
	return errors, l.unknown
}

// count is the answers so far as expected, for waiting on progress.
func (l *load) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ok
}

// running waits until the load has made n more good answers.
func (l *load) running(t *testing.T, n int) {
	t.Helper()
	start := l.count()
	waitFor(t, fmt.Sprintf("%d more answers", n), func() bool { return l.count() >= start+n })
}

// faultServer serves the API on cfg's PostgreSQL with the shared Redis.
func faultServer(t *testing.T, cfg Config) (string, *Store) {
	t.Helper()
	log := newLogBuffer(t).logger()
	store := newTestStore(t, cfg, log)
	return testServer(t, log, store, newTestCache(t, cfg, log)), store
}

// TestOnlineSchemaChange: migrations run while the service serves, each
// as docs/migrations.md says to write one (SET LOCAL lock_timeout): a
// column's type changed (which makes every connection's prepared
// statements stale), a NOT NULL column added with a default, and the type
// changed back. The clients see nothing.
func TestOnlineSchemaChange(t *testing.T) {
	cfg := testConfig(t)
	base, store := faultServer(t, cfg)
	l := startLoad(t, base, 8)
	l.running(t, 500)
	files := fstest.MapFS{}
	for i, ddl := range []string{
		"ALTER TABLE items ALTER COLUMN name TYPE varchar(300);",
		"ALTER TABLE items ADD COLUMN added_online text NOT NULL DEFAULT 'x';",
		"ALTER TABLE items ALTER COLUMN name TYPE text;",
	} {
		name := fmt.Sprintf("%05d_online.sql", 100+i)
		files[name] = &fstest.MapFile{Data: []byte("-- +goose Up\nSET LOCAL lock_timeout = '2s';\n" + ddl + "\n")}
		p, err := goose.NewProvider(goose.DialectPostgres, store.db, files, goose.WithDisableGlobalRegistry(true), goose.WithAllowOutofOrder(true))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.Up(t.Context()); err != nil {
			t.Fatalf("migration %s: %v", name, err)
		}
		l.running(t, 500)
	}
	if n, _ := l.report(t); n > 0 {
		t.Errorf("%d client-visible errors during online schema changes; want 0", n)
	}
	if got := store.retries.Load(); got == 0 {
		t.Error("no statement was retried: the type change did not make the prepared statements stale, so this test shows nothing")
	}
}

// terminate ends every backend of the service on db's server, but the
// caller's: those named items-api, or if behindBouncer every backend of
// appuser (PgBouncer's server connections carry no application_name).
// Only private servers, or a test's PgBouncer, should be treated so.
func terminate(t *testing.T, db *sql.DB, behindBouncer bool) int {
	t.Helper()
	var n int
	err := db.QueryRow(`SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE usename = 'appuser' AND datname = current_database() AND pid <> pg_backend_pid()
		AND (application_name = 'items-api' OR $1)`, behindBouncer).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestTerminatedBackends(t *testing.T) {
	pg := startPostgres(t)
	cfg := pg.config(testConfig(t))
	base, _ := faultServer(t, cfg)
	admin, err := sql.Open("pgx", fmt.Sprintf("postgres://postgres@127.0.0.1:%d/appdb", pg.port))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	l := startLoad(t, base, 8)
	l.running(t, 300)
	// Every backend at once, every 250 ms: harsher than a pooler restart or
	// an idle timeout, which end some, now and then. Rounds closer than a
	// retry takes (up to ~100 ms on a busy CI machine) would end retries too.
	total := 0
	for range 12 {
		total += terminate(t, admin, false)
		time.Sleep(250 * time.Millisecond)
	}
	t.Logf("terminated %d backends in 12 rounds", total)
	// A create or delete that was running when its backend ended may have
	// committed or not: the service says so (503) rather than run it twice.
	if n, unknown := l.report(t); n > unknown {
		t.Errorf("%d client-visible errors while backends were terminated, besides %d creates and deletes cut off mid-statement; want 0", n-unknown, unknown)
	}
}

// TestIdleSessionTimeout: PostgreSQL ends sessions idle longer than
// idle_session_timeout (as PgBouncer's server_idle_timeout, a cloud proxy
// or a firewall do). Requests spaced wider than it, creates included, all
// succeed, and without a retry: the pool finds each closed connection
// before it sends anything on it (shouldPing).
func TestIdleSessionTimeout(t *testing.T) {
	pg := startPostgres(t, "idle_session_timeout = 100") // ms
	cfg := pg.config(testConfig(t))
	base, store := faultServer(t, cfg)
	createItem(t, base, `{"name":"first"}`)
	connects := store.connects.Load()
	for range 8 {
		time.Sleep(300 * time.Millisecond)
		if res := do(t, "POST", base+"/items", `{"name":"after a pause"}`); res.status != http.StatusCreated {
			t.Errorf("POST after the session timed out: %d %s; want 201", res.status, res.body)
		}
	}
	if n := store.retries.Load(); n != 0 {
		t.Errorf("%d statements retried; want 0: a closed connection should be found before use", n)
	}
	if n := store.connects.Load() - connects; n < 8 {
		t.Errorf("%d connections made for 8 requests after a timeout each; want 8 (did the sessions time out?)", n)
	}
}

func TestCancellationStorm(t *testing.T) {
	cfg := testConfig(t)
	// A pool with room for every client, so that nobody waits for a
	// connection: an error can then only come from the hang-ups.
	cfg.DBMaxConns = 48
	base, store := faultServer(t, cfg)
	l := startLoad(t, base, 4)
	l.running(t, 200)
	connects := store.connects.Load()
	// Clients that hang up after a random 0-3 ms, mid-request, on reads and
	// writes of items of their own.
	var canceled atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := &http.Client{}
			res, err := l.send("POST", "/items", `{"name":"impatient"}`)
			if err != nil || res.status != http.StatusCreated {
				return
			}
			var it Item
			json.Unmarshal(res.body, &it)
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rand.IntN(300))*time.Microsecond)
				method, path, body := "GET", "/items?limit=100", ""
				switch n % 3 {
				case 1:
					method, path, body = "PUT", fmt.Sprintf("/items/%d", it.ID), fmt.Sprintf(`{"name":"impatient %d"}`, i)
				case 2:
					method, path = "GET", fmt.Sprintf("/items/%d", it.ID)
				}
				var rd io.Reader
				if body != "" {
					rd = strings.NewReader(body)
				}
				req, _ := http.NewRequestWithContext(ctx, method, base+path, rd)
				req.Header.Set("Content-Type", "application/json")
				if resp, err := client.Do(req); err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				} else {
					canceled.Add(1)
				}
				cancel()
				// A pause: the storm is of hang-ups, not of load. Without
				// it, 32 clients saturate this 2-core machine, and the
				// patient clients' requests time out for want of CPU.
				time.Sleep(time.Millisecond)
			}
		}()
	}
	time.Sleep(5 * time.Second)
	close(stop)
	wg.Wait()
	made := store.connects.Load() - connects
	t.Logf("%d requests hung up on; %d connections made meanwhile; %d retries", canceled.Load(), made, store.retries.Load())
	if n, _ := l.report(t); n > 0 {
		t.Errorf("%d errors for clients that did not hang up; want 0", n)
	}
	// A connect, ping or statement cancelled mid-flight costs its
	// connection (pgx closes it); the pool must not churn through
	// connections because clients hang up. Filling the pool makes up to
	// its size; a timeout on a slow machine may drop the idle ones once
	// (Store.classify). Cancelled as before this work: 207 to 232.
	if made > int64(2*cfg.DBMaxConns) {
		t.Errorf("%d connections made during the storm; want at most twice the pool's %d", made, cfg.DBMaxConns)
	}
}

// outage measures a fault's client-visible window: the load's errors must
// all be 503s with Retry-After, and writes must succeed again by
// themselves within bound once the fault is over.
func assertOnly503(t *testing.T, l *load) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	for k := range l.errors {
		if !strings.Contains(k, " 503: ") {
			t.Errorf("answer %q; want only 503s during the fault", k)
		}
	}
}

// firstWrite waits until a PUT succeeds, and returns how long that took.
func firstWrite(t *testing.T, base string, id int64, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < within {
		if res := do(t, "PUT", fmt.Sprintf("%s/items/%d", base, id), `{"name":"probe"}`); res.status == http.StatusOK {
			return time.Since(start)
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("no write succeeded within %v", within)
	return 0
}

// TestReadOnlyPrimary: a primary turned read-only (default_transaction_read_only,
// as during a switchover or on a full disk) makes writes 503 with
// Retry-After, never 500; reads go on; /ready says "read-only"; writes
// come back by themselves once it accepts them again.
func TestReadOnlyPrimary(t *testing.T) {
	pg := startPostgres(t)
	cfg := pg.config(testConfig(t))
	base, _ := faultServer(t, cfg)
	probe := createItem(t, base, `{"name":"probe"}`)
	l := startLoad(t, base, 4)
	l.running(t, 200)

	pg.psql("ALTER SYSTEM SET default_transaction_read_only = on")
	pg.psql("SELECT pg_reload_conf()")
	waitFor(t, "a write refused as read-only", func() bool {
		return do(t, "PUT", fmt.Sprintf("%s/items/%d", base, probe.ID), `{"name":"probe"}`).status == http.StatusServiceUnavailable
	})
	res := do(t, "PUT", fmt.Sprintf("%s/items/%d", base, probe.ID), `{"name":"probe"}`)
	if res.status != 503 || res.header.Get("Retry-After") == "" || !strings.Contains(errorMessage(t, res), "accepts no writes") {
		t.Errorf("PUT on a read-only primary: %d %s (Retry-After %q); want 503, Retry-After, a message saying so", res.status, res.body, res.header.Get("Retry-After"))
	}
	if res := do(t, "GET", base+"/items?limit=5", ""); res.status != 200 {
		t.Errorf("GET /items on a read-only primary: %d %s; want 200 (reads go on)", res.status, res.body)
	}
	ready := do(t, "GET", base+"/ready", "")
	var r readiness
	json.Unmarshal(ready.body, &r)
	if ready.status != 503 || r.Postgres != "read-only" {
		t.Errorf("/ready on a read-only primary: %d %s; want 503 with postgres \"read-only\"", ready.status, ready.body)
	}
	time.Sleep(time.Second)

	pg.psql("ALTER SYSTEM RESET default_transaction_read_only")
	pg.psql("SELECT pg_reload_conf()")
	took := firstWrite(t, base, probe.ID, 5*time.Second)
	t.Logf("writes came back %v after the primary accepted them again", took.Round(time.Millisecond))
	l.running(t, 200)
	assertOnly503(t, l)
	l.report(t)
	if ready := do(t, "GET", base+"/ready", ""); ready.status != 200 {
		t.Errorf("/ready after: %d %s; want 200", ready.status, ready.body)
	}
}

// TestFailover: DB_HOST lists a primary and its streaming standby. The
// primary stops (fast: it sends the standby all its WAL first), the
// standby is promoted, and the service finds it by itself: clients see
// only 503s with Retry-After, for a window measured here, and no
// acknowledged write is lost or read stale.
func TestFailover(t *testing.T) {
	primary := startPostgres(t)
	standby := primary.startStandby()
	cfg := testConfig(t)
	cfg.DBHost = fmt.Sprintf("127.0.0.1:%d,127.0.0.1:%d", primary.port, standby.port)
	base, _ := faultServer(t, cfg)
	probe := createItem(t, base, `{"name":"probe"}`)
	l := startLoad(t, base, 4)
	l.running(t, 300)

	start := time.Now()
	primary.stop("fast")
	stopped := time.Since(start)
	time.Sleep(500 * time.Millisecond) // a failover manager's detection time
	promoteAt := time.Now()
	standby.pgctl("promote", "-w")
	promoted := time.Since(promoteAt)
	took := firstWrite(t, base, probe.ID, 10*time.Second)
	t.Logf("primary stopped in %v; standby promoted in %v; first write %v after the promotion, %v after the primary began to stop",
		stopped.Round(time.Millisecond), promoted.Round(time.Millisecond), took.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	l.running(t, 300)
	assertOnly503(t, l)
	l.report(t)
	if took > 2*time.Second {
		t.Errorf("writes came back %v after the promotion; want within 2 s", took)
	}
}

// pgBouncer is a private PgBouncer in transaction pooling mode in front of
// cfg's PostgreSQL, its server connections set to cfg's schema (a pooler
// in transaction mode cannot keep a client's search_path: see
// docs/postgres.md#pgbouncer).
type pgBouncer struct {
	t    *testing.T
	dir  string
	port int
	cmd  *exec.Cmd
}

func startPgBouncer(t *testing.T, cfg Config) *pgBouncer {
	t.Helper()
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		needTool(t, "pgbouncer", "pgbouncer")
	}
	b := &pgBouncer{t: t, dir: privateDir(t, "pgbouncer"), port: freePort(t)}
	conf := fmt.Sprintf(`[databases]
%s = host=%s port=%d dbname=%s connect_query='SET search_path = %s'
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s/users.txt
pool_mode = transaction
default_pool_size = 4
max_client_conn = 500
ignore_startup_parameters = search_path
logfile = %s/pgbouncer.log
`, cfg.DBName, cfg.DBHost, cfg.DBPort, cfg.DBName, cfg.DBSchema, b.port, b.dir, b.dir)
	for name, text := range map[string]string{"pgbouncer.ini": conf, "users.txt": fmt.Sprintf("%q %q\n", cfg.DBUser, cfg.DBPassword)} {
		if err := os.WriteFile(filepath.Join(b.dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b.cmd = exec.Command(bin)
	b.start()
	return b
}

func (b *pgBouncer) start() {
	b.t.Helper()
	b.cmd = exec.Command(b.cmd.Path, filepath.Join(b.dir, "pgbouncer.ini"))
	asPostgres(b.t, b.cmd, b.dir)
	if err := b.cmd.Start(); err != nil {
		b.t.Fatal(err)
	}
	cmd := b.cmd
	b.t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitFor(b.t, "PgBouncer to listen", func() bool {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", b.port))
		if err == nil {
			c.Close()
		}
		return err == nil
	})
}

// restart stops PgBouncer at once (SIGTERM: every client connection
// closed) and starts it again.
func (b *pgBouncer) restart() {
	b.cmd.Process.Signal(syscall.SIGTERM)
	b.cmd.Wait()
	b.start()
}

// TestPgBouncer: through PgBouncer in transaction mode, with
// DB_QUERY_EXEC_MODE=exec and MIGRATE_ON_START=false (migrations ran
// directly), everything works under load: 0 errors; its restarts and the
// server's ending of backends give only 503s, in a window measured here.
func TestPgBouncer(t *testing.T) {
	cfg := testConfig(t)
	direct := newTestStore(t, cfg, newLogBuffer(t).logger()) // migrates, and drops the schema at the end
	bouncer := startPgBouncer(t, cfg)
	viaBouncer := cfg
	viaBouncer.DBHost, viaBouncer.DBPort = "127.0.0.1", bouncer.port
	viaBouncer.DBQueryExecMode = "exec"
	viaBouncer.MigrateOnStart = false
	log := newLogBuffer(t).logger()
	store, err := openStore(t.Context(), viaBouncer, log)
	if err != nil {
		t.Fatalf("open the store through PgBouncer: %v", err)
	}
	t.Cleanup(func() { store.Close() })
	base := testServer(t, log, store, newTestCache(t, cfg, log))

	l := startLoad(t, base, 8)
	l.running(t, 2000)
	if n, _ := l.report(t); n > 0 {
		t.Fatalf("%d errors through PgBouncer; want 0", n)
	}
	// Preconditions (a bigint[] parameter) and idempotency keys (a
	// transaction with an advisory lock) in exec mode.
	it := createItem(t, base, `{"name":"conditional"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	if res := do(t, "PUT", url, `{"name":"b"}`, "If-Match", `"1"`); res.status != 200 {
		t.Errorf("PUT If-Match \"1\" through PgBouncer: %d %s; want 200", res.status, res.body)
	}
	if res := do(t, "PATCH", url, `{"name":"c"}`, "If-Match", `"1"`); res.status != 412 || res.header.Get("ETag") != `"2"` {
		t.Errorf("PATCH If-Match \"1\" through PgBouncer: %d %s; want 412 with ETag \"2\"", res.status, res.body)
	}
	first := do(t, "POST", base+"/items", `{"name":"keyed"}`, "Idempotency-Key", "bouncer")
	again := do(t, "POST", base+"/items", `{"name":"keyed"}`, "Idempotency-Key", "bouncer")
	if first.status != 201 || again.status != 201 || string(again.body) != string(first.body) || again.header.Get("Idempotent-Replayed") != "true" {
		t.Errorf("a POST and its retry with one key through PgBouncer: %d %s, %d %s; want the same 201, replayed", first.status, first.body, again.status, again.body)
	}

	// A restart: until it listens again, new connections are refused (503).
	l = startLoad(t, base, 8)
	l.running(t, 300)
	for range 3 {
		start := time.Now()
		bouncer.restart()
		t.Logf("PgBouncer down for %v", time.Since(start).Round(time.Millisecond))
		l.running(t, 300)
	}
	assertOnly503(t, l)
	l.report(t)

	// The server ends the backends behind PgBouncer. The retry's new
	// connection is new to PgBouncer only: it may be given another server
	// connection that is dying too, so now and then a retried request
	// fails again (a 503 of unknown outcome for a write): about one run in
	// seven, one request in some 1,400.
	l = startLoad(t, base, 8)
	l.running(t, 300)
	for range 3 {
		terminate(t, direct.db, true)
		time.Sleep(250 * time.Millisecond)
	}
	assertOnly503(t, l)
	if n, unknown := l.report(t); n > unknown+3 {
		t.Errorf("%d errors when backends behind PgBouncer ended, besides %d creates and deletes cut off mid-statement; want at most 3", n-unknown, unknown)
	}
}
