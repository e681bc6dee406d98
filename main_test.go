package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
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

// TestRunEndToEnd starts the whole service with run on a free port, as main
// does, uses it over HTTP, checks its health-check mode, and stops it.
func TestRunEndToEnd(t *testing.T) {
	cfg, base, done, cancel := runService(t)

	it := createItem(t, base, `{"name":"end to end"}`)
	if got := do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "").header.Get("X-Cache"); got != "MISS" {
		t.Errorf("first GET: X-Cache %q; want MISS", got)
	}
	if got := do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "").header.Get("X-Cache"); got != "HIT" {
		t.Errorf("second GET: X-Cache %q; want HIT", got)
	}

	_, port, _ := net.SplitHostPort(strings.TrimPrefix(base, "http://"))
	// Only PORT matters to it: not a secret's file it cannot read.
	if err := run(t.Context(), []string{"items", "healthcheck"}, envFrom(cfg, "PORT", port, "DB_PASSWORD_FILE", "/nonexistent"), io.Discard); err != nil {
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
	it, err := store.Create(t.Context(), Item{Name: "in flight"})
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

// TestShutdownDelay: after SIGTERM, for SHUTDOWN_DELAY, the service goes on
// answering, on the connections it has (a client's next request on one gets
// "Connection: close") and on new ones, with /ready 503; then it stops
// listening and returns.
func TestShutdownDelay(t *testing.T) {
	const delay = 1500 * time.Millisecond
	_, base, done, cancel := runService(t, "SHUTDOWN_DELAY", delay.String())
	it := createItem(t, base, `{"name":"leaving"}`)
	path := fmt.Sprintf("%s/items/%d", base, it.ID)

	// One kept-alive connection, reused by the request after SIGTERM.
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
	get := func(url string) (*http.Response, bool) {
		t.Helper()
		reused := false
		trace := &httptrace.ClientTrace{GotConn: func(c httptrace.GotConnInfo) { reused = c.Reused }}
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(t.Context(), trace), "GET", url, nil)
		res, err := client.Do(req)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
		return res, reused
	}
	if res, _ := get(path); res.StatusCode != 200 || res.Close {
		t.Fatalf("before SIGTERM: %d, close %v; want 200 on a kept-alive connection", res.StatusCode, res.Close)
	}
	start := time.Now()
	cancel()
	waitFor(t, "/ready to answer 503", func() bool { return do(t, "GET", base+"/ready", "").status == http.StatusServiceUnavailable })
	// res.Close: the answer said "Connection: close" (Go's client takes
	// the header out).
	if res, reused := get(path); res.StatusCode != 200 || !reused || !res.Close {
		t.Errorf("while leaving, on the kept-alive connection: %d, reused %v, close %v; want 200, reused, close", res.StatusCode, reused, res.Close)
	}
	if res := do(t, "GET", path, ""); res.status != 200 || time.Since(start) >= delay {
		t.Errorf("while leaving, a new connection: %d after %v; want 200 within %v", res.status, time.Since(start), delay)
	}
	select {
	case err := <-done:
		if err != nil || time.Since(start) < delay {
			t.Errorf("run returned %v after %v; want nil after SHUTDOWN_DELAY=%v", err, time.Since(start), delay)
		}
	case <-time.After(delay + 10*time.Second):
		t.Fatal("run did not return after SHUTDOWN_DELAY")
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

// TestMain lets a test run this test binary as the service itself (main,
// with the real signal handling) by setting ITEMS_TEST_RUN_MAIN=1.
func TestMain(m *testing.M) {
	if os.Getenv("ITEMS_TEST_RUN_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	flag.Parse() // for testing.Short
	before, ok := envSchemaVersion()
	code := m.Run()
	if after, ok2 := envSchemaVersion(); ok && ok2 && after != before && code == 0 {
		fmt.Fprintf(os.Stderr, "FAIL: the tests migrated the environment's own schema (from %s to %s): a running stack's; each test must keep to its own schema\n", before, after)
		code = 1
	}
	os.Exit(code)
}

// envSchemaVersion is the migration version of the schema the environment
// names (DB_SCHEMA, or public), or "none"; ok is false if PostgreSQL does
// not answer. The tests run in schemas of their own, so it must not change.
func envSchemaVersion() (version string, ok bool) {
	cfg, err := loadConfig(os.Getenv)
	if err != nil || testing.Short() {
		return "", false
	}
	db, err := sql.Open("pgx", cfg.dsn())
	if err != nil {
		return "", false
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if db.PingContext(ctx) != nil {
		return "", false
	}
	if db.QueryRowContext(ctx, "SELECT max(version_id)::text FROM goose_db_version").Scan(&version) != nil {
		return "none", true
	}
	return version, true
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
	cached, err := store.Create(t.Context(), Item{Name: "cached"})
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
	wait := loadClients(8, stop, func(w, n int) bool {
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
				return true
			}
			mu.Lock()
			failures = append(failures, fmt.Sprintf("%s sent before SIGTERM: %v", req.Method, err))
			mu.Unlock()
			return false
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
		return true
	})
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
	wait()

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
		got, err := store.Get(t.Context(), it.ID)
		if err != nil || got.Name != it.Name {
			t.Errorf("item %d answered 201 before shutdown: stored %+v, %v", it.ID, got, err)
		}
	}
	t.Logf("SIGTERM under load: %d answers, %d of them to the 8 requests in flight at SIGTERM; %d items created and stored; "+
		"%d attempts refused after SIGTERM; exit 0 %v after SIGTERM (PostgreSQL held for 200 ms of it)",
		ok.Load(), finishedAfterTerm.Load(), len(created), refusedAfterTerm.Load(), took.Round(time.Millisecond))
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

// TestShutdownCutsWritesOff: a PUT still waiting on PostgreSQL (a locked
// table) when SHUTDOWN_TIMEOUT ends is cut off with its statement, and
// invalidates the item before the process exits: PostgreSQL may still
// apply it once the lock goes, and Redis must not then serve the old
// value. Found by a review: once statements stopped ending when their
// client hung up, the process exited with the write in flight, unseen.
func TestShutdownCutsWritesOff(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	store := newTestStore(t, cfg, log)
	cache := newTestCache(t, cfg, log)
	it, err := store.Create(t.Context(), Item{Name: "old"})
	if err != nil {
		t.Fatal(err)
	}
	cfg.DBQueryTimeout = 4 * time.Second
	cfg.ShutdownTimeout = time.Second
	base, cmd, exited := startProcess(t, cfg, "")
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	// pgx prepares a statement on its first use, and the prepare would
	// wait for the lock too; with it prepared, the PUT below is executed,
	// and commits once the lock goes, whoever still listens.
	do(t, "PUT", url, `{"name":"old"}`)
	do(t, "GET", url, "")
	if h := do(t, "GET", url, "").header.Get("X-Cache"); h != "HIT" {
		t.Fatalf("priming the cache: X-Cache %s; want HIT", h)
	}
	unlock := lockItems(t, cfg)
	go func() {
		req, _ := http.NewRequest("PUT", url, strings.NewReader(`{"name":"new"}`))
		req.Header.Set("Content-Type", "application/json")
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	}()
	time.Sleep(300 * time.Millisecond) // the UPDATE waits for the lock
	cmd.Process.Signal(syscall.SIGTERM)
	<-exited
	unlock()
	time.Sleep(300 * time.Millisecond)
	got, err := store.Get(t.Context(), it.ID)
	if err != nil {
		t.Fatal(err)
	}
	body, _, outcome := cache.Get(t.Context(), it.ID)
	t.Logf("PostgreSQL: %q; Redis: %s %s", got.Name, outcome, body)
	if outcome == Hit && !strings.Contains(string(body), got.Name) {
		t.Errorf("Redis serves %s while PostgreSQL holds %q", body, got.Name)
	}
}
