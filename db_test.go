package main

import (
	"bytes"
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/redis/go-redis/v9"
)

// pgBehindProxy returns a server whose PostgreSQL connections go through a
// proxy the test controls, and an item stored before anything breaks.
func pgBehindProxy(t *testing.T, cfg Config) (base string, p *proxy, it Item, logs *logBuffer) {
	t.Helper()
	logs = newLogBuffer(t)
	log := logs.logger()
	newTestStore(t, cfg, log) // creates the schema, drops it at the end
	p = newProxy(t, net.JoinHostPort(cfg.DBHost, strconv.Itoa(cfg.DBPort)))
	cfg.DBHost, cfg.DBPort = "127.0.0.1", p.port()
	store, err := openStore(t.Context(), cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	base = testServer(t, log, store, newTestCache(t, cfg, log))
	return base, p, createItem(t, base, `{"name":"before the outage"}`), logs
}

// checkUnavailable expects a 503 JSON error within the query timeout (plus
// a generous margin), never a hang or a 500.
func checkUnavailable(t *testing.T, cfg Config, method, url, body string) {
	t.Helper()
	res := do(t, method, url, body)
	if res.status != http.StatusServiceUnavailable || res.header.Get("Retry-After") != "1" {
		t.Errorf("%s %s: got %d %s, Retry-After %q; want 503 with Retry-After: 1", method, url, res.status, res.body, res.header.Get("Retry-After"))
	}
	errorMessage(t, res)
	if limit := cfg.DBQueryTimeout + 2*time.Second; res.elapsed > limit {
		t.Errorf("%s %s took %v; want under %v", method, url, res.elapsed, limit)
	}
	t.Logf("%s %s: %d after %v", method, strings.TrimPrefix(url, "http://"), res.status, res.elapsed.Round(100*time.Microsecond))
}

// TestPostgresLost: PostgreSQL goes away mid-run (every connection cut, new
// ones dropped). Reads that need it and writes get 503 JSON quickly,
// readiness fails, liveness does not, cached items are still served, and
// everything recovers by itself when PostgreSQL is back.
func TestPostgresLost(t *testing.T) {
	cfg := testConfig(t)
	base, pg, cached, _ := pgBehindProxy(t, cfg)
	do(t, "GET", fmt.Sprintf("%s/items/%d", base, cached.ID), "") // fill the cache

	pg.setCut(true)
	checkUnavailable(t, cfg, "GET", fmt.Sprintf("%s/items/%d", base, cached.ID+1000), "")
	checkUnavailable(t, cfg, "POST", base+"/items", `{"name":"during the outage"}`)
	// A write that could not even be sent changed nothing: the cached item
	// is still right, and still served.
	checkUnavailable(t, cfg, "PUT", fmt.Sprintf("%s/items/%d", base, cached.ID), `{"name":"never sent"}`)
	checkUnavailable(t, cfg, "GET", base+"/ready", "")
	if res := do(t, "GET", base+"/health", ""); res.status != 200 {
		t.Errorf("GET /health with PostgreSQL down: got %d; want 200 (liveness must not depend on it)", res.status)
	}
	if res := do(t, "GET", fmt.Sprintf("%s/items/%d", base, cached.ID), ""); res.status != 200 || res.header.Get("X-Cache") != "HIT" {
		t.Errorf("GET of a cached item with PostgreSQL down: got %d %s; want 200 HIT", res.status, res.header.Get("X-Cache"))
	}

	pg.setCut(false)
	waitFor(t, "POST to succeed after PostgreSQL is back", func() bool {
		return do(t, "POST", base+"/items", `{"name":"after the outage"}`).status == http.StatusCreated
	})
	if res := do(t, "GET", base+"/ready", ""); res.status != 200 {
		t.Errorf("GET /ready after recovery: got %d %s; want 200", res.status, res.body)
	}
}

// TestPostgresHung: PostgreSQL accepts but stops answering. Requests get 503
// at the query timeout, and once it answers again the pool serves requests
// without a restart.
func TestPostgresHung(t *testing.T) {
	cfg := testConfig(t)
	cfg.DBQueryTimeout = 500 * time.Millisecond
	base, pg, it, logs := pgBehindProxy(t, cfg)

	pg.stall()
	// A client that gives up first is logged as such (499), not as an outage.
	for _, path := range []string{fmt.Sprintf("/items/%d", it.ID+999), "/ready"} {
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		req, _ := http.NewRequestWithContext(ctx, "GET", base+path, nil)
		if _, err := http.DefaultClient.Do(req); err == nil {
			t.Errorf("GET %s with a 100 ms client timeout succeeded while PostgreSQL was stalled", path)
		}
		cancel()
	}
	waitFor(t, "the abandoned requests' log lines", func() bool { return logs.count("status=499") == 2 })
	if n := logs.count("level=WARN"); n != 0 {
		t.Errorf("abandoned requests logged %d warnings; want none (not a database outage)", n)
	}

	for i := 0; i < 3; i++ {
		checkUnavailable(t, cfg, "GET", fmt.Sprintf("%s/items/%d", base, it.ID+1000+int64(i)), "")
	}
	checkUnavailable(t, cfg, "POST", base+"/items", `{"name":"stalled"}`)
	pg.resume()
	waitFor(t, "GET to succeed after PostgreSQL answers again", func() bool {
		return do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "").status == http.StatusOK
	})
}

// TestAbandonedReadIsLogged499: a client that hangs up while its item is
// read from PostgreSQL is logged as 499, though the shared read goes on and
// succeeds (and fills the cache for the next reader).
func TestAbandonedReadIsLogged499(t *testing.T) {
	cfg := testConfig(t)
	cfg.DBQueryTimeout = 2 * time.Second
	base, pg, it, logs := pgBehindProxy(t, cfg)
	pg.stall()
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), nil)
	if _, err := http.DefaultClient.Do(req); err == nil {
		t.Fatal("GET with a 100 ms client timeout succeeded while PostgreSQL was stalled")
	}
	time.Sleep(200 * time.Millisecond)
	pg.resume()
	waitFor(t, "the abandoned request's log line", func() bool {
		return logs.count(fmt.Sprintf("path=/items/%d status=499", it.ID)) == 1
	})
	if n := logs.count(fmt.Sprintf("path=/items/%d status=200", it.ID)); n != 0 {
		t.Errorf("the abandoned GET was logged as 200 (%d lines); want 499", n)
	}
	if res := do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), ""); res.header.Get("X-Cache") != "HIT" {
		t.Errorf("GET after the abandoned read: X-Cache %q; want HIT (the shared read filled the cache)", res.header.Get("X-Cache"))
	}
}

// TestHandMadeTable: a table created by hand with the original design's
// `id SERIAL PRIMARY KEY` (an int4 id) before the service ever ran is
// adopted by the first migration, rows kept, and works, including ids
// beyond int4's range.
func TestHandMadeTable(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	rawSQL(t, cfg, "CREATE SCHEMA "+cfg.DBSchema,
		"CREATE TABLE "+cfg.DBSchema+".items (id SERIAL PRIMARY KEY, name TEXT NOT NULL, description TEXT)",
		"INSERT INTO "+cfg.DBSchema+".items (name) VALUES ('made by hand')")
	store := newTestStore(t, cfg, log)
	var idType string
	if err := store.db.QueryRowContext(t.Context(),
		"SELECT data_type FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'items' AND column_name = 'id'",
		cfg.DBSchema).Scan(&idType); err != nil || idType != "integer" {
		t.Fatalf("id column type: got %q, %v; want the hand-made integer kept", idType, err)
	}
	if it, err := store.Get(t.Context(), 1); err != nil || it.Name != "made by hand" || it.Version != 1 {
		t.Errorf("the hand-made row: got %+v, %v; want it kept, at version 1", it, err)
	}
	base := testServer(t, log, store, newTestCache(t, cfg, log))
	it := createItem(t, base, `{"name":"serial"}`)
	if res := do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), ""); res.status != 200 {
		t.Errorf("GET: got %d %s; want 200", res.status, res.body)
	}
	if res := do(t, "GET", base+"/items/5000000000", ""); res.status != 404 {
		t.Errorf("GET id beyond int4: got %d %s; want 404", res.status, res.body)
	}
}

// TestSchemaIsolation: a test's schema holds its own items table, so the
// default schema's table (a running stack's) is never touched.
func TestSchemaIsolation(t *testing.T) {
	cfg := testConfig(t)
	store := newTestStore(t, cfg, newLogBuffer(t).logger())
	var schema string
	if err := store.db.QueryRowContext(t.Context(), "SELECT current_schema()").Scan(&schema); err != nil || schema != cfg.DBSchema {
		t.Errorf("current_schema(): got %q, %v; want %q", schema, err, cfg.DBSchema)
	}
}

func TestClassify(t *testing.T) {
	fatal := func(code string) error { return &pgconn.PgError{Severity: "FATAL", Code: code} }
	plain := func(code string) error { return &pgconn.PgError{Severity: "ERROR", Code: code} }
	tests := []struct {
		err       error
		want      error // nil: none of the sentinels (a 500)
		unchanged bool  // a write that failed so left the table as it was
	}{
		{context.DeadlineExceeded, ErrUnavailable, false},
		{&net.OpError{Op: "dial", Err: errors.New("connection refused")}, ErrUnavailable, false},
		{fmt.Errorf("%w: %w", ErrNotSent, context.DeadlineExceeded), ErrUnavailable, true},
		{driver.ErrBadConn, ErrUnavailable, true},
		{fatal("57P01"), ErrUnavailable, false}, // admin_shutdown: may come after the commit
		{fatal("57P05"), ErrUnavailable, false}, // idle_session_timeout
		{plain("57014"), ErrUnavailable, true},  // query_canceled: statement_timeout
		{fatal("53300"), ErrUnavailable, false}, // too_many_connections
		{plain("08006"), ErrUnavailable, true},  // connection_failure
		{plain("25006"), ErrReadOnly, true},     // read_only_sql_transaction
		{plain("40001"), ErrUnavailable, true},  // serialization_failure
		{plain("40P01"), ErrUnavailable, true},  // deadlock_detected
		{plain("40003"), ErrUnavailable, false}, // statement_completion_unknown
		{plain("55P03"), ErrUnavailable, true},  // lock_not_available: lock_timeout
		{plain("58030"), ErrUnavailable, true},  // io_error
		{plain("25P03"), ErrUnavailable, true},  // idle_in_transaction_session_timeout
		{plain("23505"), ErrConflict, true},     // unique_violation
		{plain("23514"), ErrConflict, true},     // check_violation
		{plain("22001"), ErrRejected, true},     // string_data_right_truncation
		{plain("42P01"), nil, true},             // undefined_table: a bug, not an outage
		{plain("0A000"), nil, true},             // feature_not_supported
		{fatal("28P01"), nil, false},            // invalid_password: configuration
		{errors.New("sql: Scan error"), nil, false},
		{sql.ErrNoRows, ErrNotFound, true},
	}
	for _, tc := range tests {
		got := classify(tc.err)
		for _, sentinel := range []error{ErrUnavailable, ErrReadOnly, ErrConflict, ErrRejected, ErrNotFound} {
			if want := tc.want == sentinel || tc.want == ErrReadOnly && sentinel == ErrUnavailable; errors.Is(got, sentinel) != want {
				t.Errorf("classify(%v) = %v: is %v %v; want %v", tc.err, got, sentinel, !want, want)
			}
		}
		if Unchanged(got) != tc.unchanged {
			t.Errorf("Unchanged(%v): got %v; want %v", tc.err, !tc.unchanged, tc.unchanged)
		}
	}
	// Severity is translated by the server's lc_messages.
	if german := (&pgconn.PgError{Severity: "FEHLER", SeverityUnlocalized: "ERROR", Code: "22001"}); !Unchanged(classify(german)) {
		t.Error("a translated ERROR is not taken as one")
	}
	if russian := (&pgconn.PgError{Severity: "ВАЖНО", SeverityUnlocalized: "FATAL", Code: "57P01"}); !deadConn(russian) {
		t.Error("a translated FATAL is not taken as one")
	}
	if err := classify(fmt.Errorf("%w: %w", ErrOutcomeUnknown, fatal("57P01"))); Unchanged(err) || !errors.Is(err, ErrUnavailable) {
		t.Errorf("a retried write of unknown outcome: %v; want unavailable, and not unchanged", err)
	}
	if err := classify(&pgconn.PgError{Severity: "ERROR", Code: "26000", Message: `prepared statement "stmtcache_1f" does not exist`}); !strings.Contains(err.Error(), "DB_QUERY_EXEC_MODE=exec") {
		t.Errorf("a prepared statement lost by a pooler: %v; want the setting named", err)
	}
	if !stalePlan(&pgconn.PgError{Code: "0A000", Message: "cached plan must not change result type"}) {
		t.Error("a stale plan is not recognised")
	}
}

// TestWriteWithUnknownOutcome: PostgreSQL runs a PUT but its answer never
// arrives, so the client gets a 503 although the change committed. The
// cached old value must not be served afterwards: a failed write
// invalidates the item too.
func TestWriteWithUnknownOutcome(t *testing.T) {
	cfg := testConfig(t)
	cfg.DBQueryTimeout = 500 * time.Millisecond
	cfg.DBMaxConns = 1
	base, pg, it, _ := pgBehindProxy(t, cfg)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	// pgx prepares a statement on its first use on a connection; prepare the
	// UPDATE now, so that below only its answer is lost, not the request.
	if res := do(t, "PUT", url, `{"name":"before the outage"}`); res.status != 200 {
		t.Fatalf("PUT: got %d %s", res.status, res.body)
	}
	if got := do(t, "GET", url, "").header.Get("X-Cache") + " " + do(t, "GET", url, "").header.Get("X-Cache"); got != "MISS HIT" {
		t.Fatalf("priming the cache: got %s; want MISS HIT", got)
	}

	pg.stallReplies()
	checkUnavailable(t, cfg, "PUT", url, `{"name":"committed after all"}`)
	pg.dropHeld()
	// The write might reach PostgreSQL much later still (a partition):
	// the item is not cached until such a late write cannot happen.
	rdb := redis.NewClient(&redis.Options{Addr: cfg.redisAddr()})
	defer rdb.Close()
	if ttl := rdb.PTTL(t.Context(), cfg.CacheKeyPrefix+strconv.FormatInt(it.ID, 10)).Val(); ttl < 15*time.Minute {
		t.Errorf("TTL of the tombstone after a write with an unknown outcome: %v; want over 15 min", ttl)
	}
	waitFor(t, "GET to succeed", func() bool { return do(t, "GET", url, "").status == 200 })
	for i := 0; i < 5; i++ {
		res := do(t, "GET", url, "")
		if !strings.Contains(string(res.body), "committed after all") {
			t.Fatalf("GET after a PUT that timed out but committed: got %d %s %s; want what PostgreSQL holds",
				res.status, res.header.Get("X-Cache"), res.body)
		}
	}
}

// TestWriteNeverSent: a write that never got a pooled connection (the pool
// stayed full past DB_QUERY_TIMEOUT, or its client gave up while waiting)
// wrote nothing, so it leaves the cached value alone: no long tombstone.
func TestWriteNeverSent(t *testing.T) {
	cfg := testConfig(t)
	cfg.DBQueryTimeout = 500 * time.Millisecond
	cfg.DBMaxConns = 1
	log := newLogBuffer(t).logger()
	store := newTestStore(t, cfg, log)
	cache := newTestCache(t, cfg, log)
	base := testServer(t, log, store, cache)
	it := createItem(t, base, `{"name":"cached"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	if got := do(t, "GET", url, "").header.Get("X-Cache") + " " + do(t, "GET", url, "").header.Get("X-Cache"); got != "MISS HIT" {
		t.Fatalf("priming the cache: got %s; want MISS HIT", got)
	}

	held, err := store.db.Conn(t.Context()) // the pool's only connection
	if err != nil {
		t.Fatal(err)
	}
	// One client gives up while waiting, another waits past the timeout.
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "PATCH", url, strings.NewReader(`{"name":"abandoned"}`))
	req.Header.Set("Content-Type", "application/json")
	if _, err := http.DefaultClient.Do(req); err == nil {
		t.Fatal("PATCH with a 100 ms client timeout succeeded with the pool held")
	}
	checkUnavailable(t, cfg, "DELETE", url, "")
	held.Close()

	key := cache.Key(it.ID)
	if v, err := cache.rdb.Get(t.Context(), key).Result(); err != nil || !strings.HasPrefix(v, "1:") {
		t.Errorf("Redis %s after writes that were never sent: %q, %v; want the cached version 1 untouched", key, v, err)
	}
	if res := do(t, "GET", url, ""); res.status != 200 || res.header.Get("X-Cache") != "HIT" || !strings.Contains(string(res.body), `"cached"`) {
		t.Errorf("GET after writes that were never sent: %d %s %s; want a HIT of the unchanged item", res.status, res.header.Get("X-Cache"), res.body)
	}
}

// TestPostgresPoolSaturated: every pooled connection is stuck in a slow
// query (a lock another session holds), so later requests wait for a
// connection. They get 503 within DB_QUERY_TIMEOUT, /health keeps
// answering at once, and everything works again when the lock goes.
func TestPostgresPoolSaturated(t *testing.T) {
	cfg := testConfig(t)
	cfg.DBMaxConns = 2
	cfg.DBQueryTimeout = time.Second
	log := newLogBuffer(t).logger()
	store := newTestStore(t, cfg, log)
	base := testServer(t, log, store, newTestCache(t, cfg, log))
	var ids []int64
	for i := range 6 {
		ids = append(ids, createItem(t, base, fmt.Sprintf(`{"name":"item %d"}`, i)).ID)
	}

	unlock := lockItems(t, cfg)

	results := make(chan response, len(ids)+1)
	for _, id := range ids {
		go func() { results <- do(t, "GET", fmt.Sprintf("%s/items/%d", base, id), "") }()
	}
	go func() { results <- do(t, "POST", base+"/items", `{"name":"waiting"}`) }()
	time.Sleep(100 * time.Millisecond) // let them take the pool
	for i := 0; i < 5; i++ {
		if res := do(t, "GET", base+"/health", ""); res.status != 200 || res.elapsed > 100*time.Millisecond {
			t.Errorf("GET /health with the pool saturated: got %d in %v; want 200 at once", res.status, res.elapsed)
		}
	}
	var slowest time.Duration
	for range len(ids) + 1 {
		res := <-results
		if res.status != http.StatusServiceUnavailable {
			t.Errorf("request with the pool saturated: got %d %s; want 503", res.status, res.body)
		}
		slowest = max(slowest, res.elapsed)
	}
	if limit := cfg.DBQueryTimeout + time.Second; slowest > limit {
		t.Errorf("slowest 503 with the pool saturated took %v; want under %v", slowest, limit)
	}
	t.Logf("pool of 2 stuck: %d requests got 503, the slowest after %v", len(ids)+1, slowest)

	unlock()
	if res := do(t, "GET", fmt.Sprintf("%s/items/%d", base, ids[0]), ""); res.status != 200 {
		t.Errorf("GET after the lock was released: got %d %s; want 200", res.status, res.body)
	}
}

// storeBehindProxy is a store on cfg's PostgreSQL (which creates the
// schema and drops it at the end) and one through a proxy in front of it,
// with a query timeout of 500 ms, for a write load through faults.
func storeBehindProxy(t *testing.T, cfg Config, log *slog.Logger) (direct, proxied *Store, pg *proxy) {
	t.Helper()
	direct = newTestStore(t, cfg, log)
	pg = newProxy(t, net.JoinHostPort(cfg.DBHost, strconv.Itoa(cfg.DBPort)))
	through := cfg
	through.DBHost, through.DBPort = "127.0.0.1", pg.port()
	through.DBQueryTimeout = 500 * time.Millisecond
	proxied, err := openStore(t.Context(), through, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxied.Close() })
	return direct, proxied, pg
}

// TestNothingLost creates items from several clients while PostgreSQL is
// cut and restored twice and Redis is killed and restarted. Afterwards every
// POST that answered 201 is readable with what was sent, every row in the
// table is whole and was sent by some POST, and each client saw its ids
// only grow.
func TestNothingLost(t *testing.T) {
	cfg := testConfig(t)
	cfg.DBQueryTimeout = 10 * time.Second // for the checks at the end
	cfg.RedisHost, cfg.RedisPort = "127.0.0.1", freePort(t)
	stopRedis := startRedis(t, cfg.RedisPort)
	log := slog.New(slog.NewTextHandler(newLogBuffer(t), &slog.HandlerOptions{Level: slog.LevelWarn}))
	direct, store, pg := storeBehindProxy(t, cfg, log)
	cache := newCache(cfg, itemShape, log)
	defer cache.Close()
	base := testServer(t, log, store, cache)

	type sent struct {
		name, description string
		status            int
		item              Item
	}
	var mu sync.Mutex
	var all []sent
	var backwards []string
	stop := make(chan struct{})
	last := make([]int64, 8) // each client's last id
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 8}, Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	wait := loadClients(8, stop, func(w, n int) bool {
		s := sent{name: fmt.Sprintf("w%d-%d", w, n), description: fmt.Sprintf("written by %d, number %d; it's \"quoted\"", w, n)}
		body, _ := json.Marshal(map[string]string{"name": s.name, "description": s.description})
		resp, err := client.Post(base+"/items", "application/json", bytes.NewReader(body))
		if err != nil {
			t.Errorf("POST: %v", err)
			return false
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		s.status = resp.StatusCode
		if s.status == 201 {
			if err := json.Unmarshal(b, &s.item); err != nil {
				t.Errorf("201 with %s: %v", b, err)
			}
			if s.item.ID <= last[w] {
				mu.Lock()
				backwards = append(backwards, fmt.Sprintf("client %d: id %d after %d", w, s.item.ID, last[w]))
				mu.Unlock()
			}
			last[w] = s.item.ID
		} else if s.status != 503 {
			t.Errorf("POST: got %d %s; want 201 or 503", s.status, b)
		}
		mu.Lock()
		all = append(all, s)
		mu.Unlock()
		return true
	})
	step(t, 300*time.Millisecond, "cut PostgreSQL", func() { pg.setCut(true) })
	step(t, 700*time.Millisecond, "restore PostgreSQL", func() { pg.setCut(false) })
	step(t, 500*time.Millisecond, "kill Redis", stopRedis)
	step(t, 700*time.Millisecond, "restart Redis", func() { startRedis(t, cfg.RedisPort) })
	step(t, 500*time.Millisecond, "stall PostgreSQL", pg.stall)
	step(t, 700*time.Millisecond, "restore PostgreSQL", pg.dropHeld)
	step(t, 500*time.Millisecond, "stop", func() { close(stop) })
	wait()

	// Every 201 is readable, through the API, as sent.
	bySentName := map[string]sent{}
	var created, failed int
	for _, s := range all {
		bySentName[s.name] = s
		if s.status != 201 {
			failed++
			continue
		}
		created++
		if s.item.Name != s.name || s.item.Description == nil || *s.item.Description != s.description {
			t.Errorf("201 answered %+v for %q", s.item, s.name)
		}
		res := do(t, "GET", fmt.Sprintf("%s/items/%d", base, s.item.ID), "")
		for try := 0; res.status == 503 && try < 3; try++ { // a busy machine
			time.Sleep(100 * time.Millisecond)
			res = do(t, "GET", fmt.Sprintf("%s/items/%d", base, s.item.ID), "")
		}
		var got Item
		if res.status != 200 || json.Unmarshal(res.body, &got) != nil || got.Name != s.name || *got.Description != s.description {
			t.Errorf("item %d (%q) answered 201; GET now: %d %s", s.item.ID, s.name, res.status, res.body)
		}
	}
	// Every row is whole and was sent; rows from POSTs that answered 503
	// (PostgreSQL ran the INSERT, its answer was lost) are counted.
	rows, err := direct.List(t.Context(), 0, 1_000_000)
	if err != nil {
		t.Fatal(err)
	}
	var committedAfterError int
	for _, row := range rows {
		s, ok := bySentName[row.Name]
		switch {
		case !ok || row.Description == nil || *row.Description != s.description:
			t.Errorf("row %+v is not what any POST sent", row)
		case s.status != 201:
			committedAfterError++
		}
	}
	if len(rows) != created+committedAfterError {
		t.Errorf("rows: %d; want the %d created plus %d from POSTs that failed after committing", len(rows), created, committedAfterError)
	}
	for _, b := range backwards {
		t.Errorf("id moved backwards: %s", b)
	}
	if next := createItem(t, base, `{"name":"after"}`); len(rows) > 0 && next.ID <= rows[len(rows)-1].ID {
		t.Errorf("id after the run: %d; want above %d", next.ID, rows[len(rows)-1].ID)
	}
	if created < 100 || failed == 0 {
		t.Errorf("%d created, %d failed: want many of each, or the faults were not felt", created, failed)
	}
	t.Logf("%d POSTs: %d answered 201, all readable as sent; %d answered 503, of which %d had committed (whole rows); %d rows",
		len(all), created, failed, committedAfterError, len(rows))
}

// TestPostgresHungConnections: the pool's idle connections all hang (their
// bytes are held by the proxy), while new connections work. One request
// pays the query timeout; the pool then drops its idle connections, and the
// next requests are served on new ones, rather than each finding another
// hung connection.
func TestPostgresHungConnections(t *testing.T) {
	cfg := testConfig(t)
	cfg.DBQueryTimeout = 500 * time.Millisecond
	cfg.DBMaxConns = 8
	base, pg, it, _ := pgBehindProxy(t, cfg)

	// Fill the pool: 8 reads held on a lock at once need 8 connections.
	unlock := lockItems(t, cfg)
	var wg sync.WaitGroup
	for i := range cfg.DBMaxConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID+100+int64(i)), "")
		}()
	}
	time.Sleep(200 * time.Millisecond)
	unlock()
	wg.Wait()

	pg.freezeExisting()
	defer pg.resume()
	var statuses []int
	for i := range 10 {
		res := do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID+1000+int64(i)), "")
		statuses = append(statuses, res.status)
		time.Sleep(20 * time.Millisecond)
	}
	failed := 0
	for _, s := range statuses {
		if s != 404 {
			failed++
		}
	}
	if failed > 2 || statuses[len(statuses)-1] != 404 {
		t.Errorf("GETs of missing items with every pooled connection hung: statuses %v; want at most 2 503s, then 404s from new connections", statuses)
	}
	t.Logf("pool of %d hung connections: statuses %v", cfg.DBMaxConns, statuses)
}

// TestDeleteUnreadableRow: a row the API cannot read (a NULL name, in a
// table changed by hand) is still deleted with 204, and leaves an ordinary
// tombstone rather than the 20-minute one of a write whose outcome is
// unknown.
func TestDeleteUnreadableRow(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	store := newTestStore(t, cfg, log)
	cache := newTestCache(t, cfg, log)
	base := testServer(t, log, store, cache)
	if _, err := store.db.ExecContext(t.Context(), "ALTER TABLE items ALTER COLUMN name DROP NOT NULL"); err != nil {
		t.Fatal(err)
	}
	var id int64
	if err := store.db.QueryRowContext(t.Context(), "INSERT INTO items (name) VALUES (NULL) RETURNING id").Scan(&id); err != nil {
		t.Fatal(err)
	}
	if res := do(t, "DELETE", fmt.Sprintf("%s/items/%d", base, id), ""); res.status != http.StatusNoContent {
		t.Fatalf("DELETE of a row with a NULL name: got %d %s; want 204", res.status, res.body)
	}
	if ttl := cache.rdb.PTTL(t.Context(), cache.Key(id)).Val(); ttl <= 0 || ttl > cache.tombstoneTTL {
		t.Errorf("tombstone TTL after the DELETE: %v; want up to %v", ttl, cache.tombstoneTTL)
	}
}

// sample sets v to a value of its type that tells field i and the round n
// apart from the others; it fails the test for a type it does not know.
func sample(t *testing.T, v reflect.Value, name string, i, n int) {
	t.Helper()
	switch k := v.Kind(); k {
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
		sample(t, v.Elem(), name, i, n)
	case reflect.String:
		v.SetString(fmt.Sprintf("%s %d", name, n))
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		v.SetInt(int64(10*n + i))
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(uint64(10*n + i))
	case reflect.Float32, reflect.Float64:
		v.SetFloat(float64(10*n+i) + 0.5)
	case reflect.Bool:
		v.SetBool(n%2 == 1)
	default:
		t.Fatalf("field %s is a %s; give sample in db_test.go a value of that type", name, v.Type())
	}
}

// sampleItem is an Item with a sample in every field but ID and Version,
// which the table keeps.
func sampleItem(t *testing.T, n int) Item {
	t.Helper()
	var it Item
	v := reflect.ValueOf(&it).Elem()
	for i, f := range reflect.VisibleFields(v.Type()) {
		if f.Name != "ID" && f.Name != "Version" {
			sample(t, v.Field(i), f.Name, i, n)
		}
	}
	return it
}

// TestItemAndInput: every field of Item names its column (the queries
// select Item's db tags), and Input.item copies every field that Input
// gives into the Item's field of that name, so that a field added to both
// types but not copied there (or copied from another) is caught here,
// rather than stored as null by every POST and PUT.
func TestItemAndInput(t *testing.T) {
	for _, f := range reflect.VisibleFields(reflect.TypeFor[Item]()) {
		if f.Tag.Get("db") == "" {
			t.Errorf("Item.%s has no db tag naming its column", f.Name)
		}
	}
	var in Input
	fields := reflect.ValueOf(&in).Elem()
	for i := range fields.NumField() {
		fields.Field(i).FieldByName("Set").SetBool(true)
		sample(t, fields.Field(i).FieldByName("Value"), fields.Type().Field(i).Name, i, 1)
	}
	it := reflect.ValueOf(in.item(7))
	if id := it.FieldByName("ID").Int(); id != 7 {
		t.Errorf("Input.item(7) has id %d; want 7, the id in the URL", id)
	}
	for i := range fields.NumField() {
		name := fields.Type().Field(i).Name
		got, want := it.FieldByName(name), fields.Field(i).FieldByName("Value").Elem()
		switch {
		case name == "ID":
		case !got.IsValid():
			t.Errorf("Input.%s has no field of that name in Item", name)
		case got.Kind() == reflect.Pointer && got.IsNil():
			t.Errorf("Input.item leaves Item.%s null; copy Input.%s into it", name, name)
		case !reflect.DeepEqual(reflect.Indirect(got).Interface(), want.Interface()):
			t.Errorf("Input.item sets Item.%s to %v; want Input.%s's %v", name, reflect.Indirect(got), name, want)
		}
	}
}

// TestStoreWritesEveryField: Create, Replace and Patch store every field of
// Item, so that a column left out of the INSERT or an UPDATE, or its value
// out of their arguments, is caught here.
func TestStoreWritesEveryField(t *testing.T) {
	cfg := testConfig(t)
	store := newTestStore(t, cfg, newLogBuffer(t).logger())
	ctx := t.Context()
	check := func(what string, got Item, err error, want Item) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		want.ID, want.Version = got.ID, got.Version
		js := func(it Item) string { b, _ := json.Marshal(it); return string(b) }
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s stored %s; want %s", what, js(got), js(want))
		}
		if again, err := store.Get(ctx, got.ID); err != nil || !reflect.DeepEqual(again, got) {
			t.Errorf("Get after %s: %s, %v; want %s", what, js(again), err, js(got))
		}
	}
	created, err := store.Create(ctx, sampleItem(t, 1))
	check("Create", created, err, sampleItem(t, 1))

	replacement := sampleItem(t, 2)
	replacement.ID = created.ID
	replaced, err := store.Replace(ctx, replacement, nil)
	check("Replace", replaced, err, replacement)

	// A patch that gives every field, as pointers to a third sample's.
	want := sampleItem(t, 3)
	var in Input
	from, fields := reflect.ValueOf(&want).Elem(), reflect.ValueOf(&in).Elem()
	for i := range fields.NumField() {
		name := fields.Type().Field(i).Name
		if name == "ID" {
			continue
		}
		value := from.FieldByName(name)
		if value.Kind() != reflect.Pointer {
			value = value.Addr()
		}
		fields.Field(i).FieldByName("Set").SetBool(true)
		fields.Field(i).FieldByName("Value").Set(value)
	}
	patched, err := store.Patch(ctx, created.ID, in, nil)
	check("Patch", patched, err, want)
}

// TestUnread: the peek before a pooled connection is reused tells an idle
// connection from one the server closed or wrote to, and does not wait
// for a read that another goroutine (pgx's background reader) has begun.
func TestUnread(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pair := func() (client, server net.Conn) {
		accepted := make(chan net.Conn, 1)
		go func() { c, _ := ln.Accept(); accepted <- c }()
		client, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		return client, <-accepted
	}
	idle, srv := pair()
	defer idle.Close()
	defer srv.Close()
	if unread(idle) {
		t.Error("an idle connection: unread says true")
	}
	go idle.Read(make([]byte, 1)) // a reader blocked on it, as pgx's may be
	time.Sleep(20 * time.Millisecond)
	done := make(chan bool, 1)
	go func() { done <- unread(idle) }()
	select {
	case <-done:
	case <-time.After(time.Second):
		t.Fatal("unread waited for another goroutine's read")
	}

	written, srv2 := pair()
	defer written.Close()
	srv2.Write([]byte("E")) // a FATAL message, say
	closed, srv3 := pair()
	defer closed.Close()
	srv3.Close()
	time.Sleep(20 * time.Millisecond)
	if !unread(written) || !unread(closed) {
		t.Errorf("unread on a connection with bytes waiting: %v, closed by the server: %v; want true for both", unread(written), unread(closed))
	}
	srv2.Close()
}

// TestRetriedWriteOfUnknownOutcome: a PUT reaches PostgreSQL and commits,
// its connection dies before the answer, and its retry cannot get a
// connection. The client must hear that the outcome is unknown (not "try
// again", as if nothing happened), and the cache must not keep the old
// value. Found by a review: only the retry's error was looked at.
func TestRetriedWriteOfUnknownOutcome(t *testing.T) {
	cfg := testConfig(t)
	base, p, it, _ := pgBehindProxy(t, cfg)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	do(t, "PUT", url, `{"name":"old"}`) // prepares the UPDATE on the connection
	if got := do(t, "GET", url, "").header.Get("X-Cache") + " " + do(t, "GET", url, "").header.Get("X-Cache"); got != "MISS HIT" {
		t.Fatalf("priming the cache: got %s; want MISS HIT", got)
	}
	p.stallReplies()
	done := make(chan response)
	go func() { done <- do(t, "PUT", url, `{"name":"new"}`) }()
	time.Sleep(300 * time.Millisecond) // the UPDATE commits; its answer is held
	p.setCut(true)                     // the connection dies, and no new one can be made
	res := <-done
	p.resume()
	p.setCut(false)
	if res.status != http.StatusServiceUnavailable || !strings.Contains(errorMessage(t, res), "whether it was applied is unknown") {
		t.Errorf("PUT: %d %s; want 503 saying the outcome is unknown", res.status, res.body)
	}
	if got := do(t, "GET", url, ""); !strings.Contains(string(got.body), `"new"`) {
		t.Errorf("GET after: %d %s %s; want what PostgreSQL holds, the new name", got.status, got.header.Get("X-Cache"), got.body)
	}
}

// TestRetriedConditionalWrite: a PUT with If-Match commits, its answer is
// lost with its connection, and it runs again on a new connection, where
// its precondition no longer holds, since the first try made the next
// version. The client must not get a 412, as if someone else had changed
// the item: it gets the 503 of unknown outcome.
func TestRetriedConditionalWrite(t *testing.T) {
	cfg := testConfig(t)
	base, p, it, _ := pgBehindProxy(t, cfg)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	do(t, "PUT", url, `{"name":"old"}`, "If-Match", `"1"`) // prepares the UPDATE on the connection
	p.stallReplies()
	done := make(chan response)
	go func() { done <- do(t, "PUT", url, `{"name":"new"}`, "If-Match", `"2"`) }()
	time.Sleep(300 * time.Millisecond) // the UPDATE commits; its answer is held
	p.dropHeld()                       // the connection dies; new ones work
	res := <-done
	if res.status != http.StatusServiceUnavailable || !strings.Contains(errorMessage(t, res), "whether it was applied is unknown") {
		t.Errorf("PUT If-Match \"2\": %d %s; want 503 saying the outcome is unknown", res.status, res.body)
	}
	var vars struct{ Items map[string]int64 }
	json.Unmarshal(do(t, "GET", base+"/debug/vars", "").body, &vars)
	if vars.Items["postgres_errors"] == 0 {
		t.Errorf("postgres_errors: %d; want the failed write counted", vars.Items["postgres_errors"])
	}
	if got := do(t, "GET", url, ""); !strings.Contains(string(got.body), `"new"`) || got.header.Get("ETag") != `"3"` {
		t.Errorf("GET after: %d %s %s; want the new name at \"3\"", got.status, got.header.Get("ETag"), got.body)
	}
}
