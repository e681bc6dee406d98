package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Tests of POST /items with an Idempotency-Key.

// countNamed is how many rows of cfg's items table have name.
func countNamed(t *testing.T, store *Store, name string) int {
	t.Helper()
	var n int
	if err := store.db.QueryRowContext(t.Context(), "SELECT count(*) FROM items WHERE name = $1", name).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestIdempotentCreate: a retry with the key gets the first answer again
// and creates nothing; the key with another body is 422; a bad key is 400.
func TestIdempotentCreate(t *testing.T) {
	cfg := testConfig(t)
	log := slog.New(slog.DiscardHandler)
	store := newTestStore(t, cfg, log)
	base := testServer(t, log, store, newTestCache(t, cfg, log))
	key := "order-" + randomHex(t)

	first := do(t, "POST", base+"/items", `{"name":"Widget","description":"d"}`, "Idempotency-Key", key)
	if first.status != 201 || first.header.Get("Location") == "" || first.header.Get("ETag") != `"1"` || first.header.Get("Idempotent-Replayed") != "" {
		t.Fatalf("first POST: %d %v %s; want 201 with Location and ETag \"1\", not replayed", first.status, first.header, first.body)
	}
	again := do(t, "POST", base+"/items", `{ "description" : "d", "name": "Widget" }`, "Idempotency-Key", key)
	if again.status != 201 || string(again.body) != string(first.body) || again.header.Get("Location") != first.header.Get("Location") ||
		again.header.Get("ETag") != `"1"` || again.header.Get("Idempotent-Replayed") != "true" {
		t.Errorf("retry: %d %v %s; want the first answer again (201 %s, Location %s) with Idempotent-Replayed: true",
			again.status, again.header, again.body, first.body, first.header.Get("Location"))
	}
	if n := countNamed(t, store, "Widget"); n != 1 {
		t.Errorf("rows after a POST and its retry: %d; want 1", n)
	}

	other := do(t, "POST", base+"/items", `{"name":"Other"}`, "Idempotency-Key", key)
	if other.status != 422 || !strings.Contains(errorMessage(t, other), "Idempotency-Key") || countNamed(t, store, "Other") != 0 {
		t.Errorf("the key with another body: %d %s; want 422 naming the key, and nothing created", other.status, other.body)
	}
	if plain := createItem(t, base, `{"name":"Widget","description":"d"}`); plain.ID == 0 || countNamed(t, store, "Widget") != 2 {
		t.Errorf("a POST without a key: want a new item; rows named Widget: %d", countNamed(t, store, "Widget"))
	}

	// The answer stays what it was, whatever became of the item.
	do(t, "DELETE", base+first.header.Get("Location"), "")
	if late := do(t, "POST", base+"/items", `{"name":"Widget","description":"d"}`, "Idempotency-Key", key); late.status != 201 || string(late.body) != string(first.body) {
		t.Errorf("a retry after the item was deleted: %d %s; want the first answer, %s", late.status, late.body, first.body)
	}

	long := strings.Repeat("k", 255)
	for _, c := range []struct{ key, want string }{
		{long, "201"},
		{`"8e03978e-40d5-43e8-bc93-6894a57f9324"`, "201"}, // the draft's quoted form
		{long + "k", "400"},
		{"a b", "400"},
		{"café", "400"},
		{"", "400"},
	} {
		name := "key " + strconv.Itoa(len(c.key))
		res := do(t, "POST", base+"/items", fmt.Sprintf(`{"name":%q}`, name), "Idempotency-Key", c.key)
		if strconv.Itoa(res.status) != c.want {
			t.Errorf("Idempotency-Key %q: got %d %s; want %s", truncate(c.key), res.status, res.body, c.want)
		}
		if c.want == "400" && (!strings.Contains(errorMessage(t, res), "Idempotency-Key") || countNamed(t, store, name) != 0) {
			t.Errorf("Idempotency-Key %q: %s; want a message naming the header, and nothing created", truncate(c.key), res.body)
		}
	}
	req, _ := http.NewRequest("POST", base+"/items", strings.NewReader(`{"name":"twice"}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Add("Idempotency-Key", "a")
	req.Header.Add("Idempotency-Key", "b")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 400 || countNamed(t, store, "twice") != 0 {
		t.Errorf("two Idempotency-Key lines: %v %v; want 400 and nothing created", resp.StatusCode, err)
	} else {
		resp.Body.Close()
	}

	// A request that fails records nothing: the key is free for a good one.
	bad := "bad-" + randomHex(t)
	if res := do(t, "POST", base+"/items", `{"name":""}`, "Idempotency-Key", bad); res.status != 400 {
		t.Errorf("an invalid body with a key: %d; want 400", res.status)
	}
	if res := do(t, "POST", base+"/items", `{"name":"good"}`, "Idempotency-Key", bad); res.status != 201 || res.header.Get("Idempotent-Replayed") != "" {
		t.Errorf("the key of a rejected request, with a good body: %d %v; want 201, not replayed", res.status, res.header)
	}
}

// TestIdempotencyKeyInUse: while the first request with a key runs (its
// INSERT waits on a lock here), a second with the key is 409 with
// Retry-After; once the first has answered, a third gets its answer.
func TestIdempotencyKeyInUse(t *testing.T) {
	cfg := testConfig(t)
	cfg.DBQueryTimeout = 10 * time.Second
	log := slog.New(slog.DiscardHandler)
	store := newTestStore(t, cfg, log)
	base := testServer(t, log, store, newTestCache(t, cfg, log))
	key := "k-" + randomHex(t)
	unlock := lockItems(t, cfg)
	firstDone := make(chan response, 1)
	go func() { firstDone <- do(t, "POST", base+"/items", `{"name":"first"}`, "Idempotency-Key", key) }()
	waitFor(t, "the first POST to wait on the lock", func() bool {
		var n int
		store.db.QueryRowContext(t.Context(), `SELECT count(*) FROM pg_stat_activity
			WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO items%'`).Scan(&n)
		return n == 1
	})
	second := do(t, "POST", base+"/items", `{"name":"first"}`, "Idempotency-Key", key)
	if second.status != 409 || second.header.Get("Retry-After") == "" || !strings.Contains(errorMessage(t, second), "still being processed") {
		t.Errorf("the key while its first request runs: %d %v %s; want 409 with Retry-After", second.status, second.header, second.body)
	}
	unlock()
	first := <-firstDone
	third := do(t, "POST", base+"/items", `{"name":"first"}`, "Idempotency-Key", key)
	if first.status != 201 || third.status != 201 || string(third.body) != string(first.body) || countNamed(t, store, "first") != 1 {
		t.Errorf("first %d %s, then %d %s, %d rows; want 201 twice with one body and one row", first.status, first.body, third.status, third.body, countNamed(t, store, "first"))
	}
}

// TestConcurrentCreatesWithOneKey: many POSTs with one key at once make
// one item; each answer is that item (201) or 409. Then as many retries at
// once all replay it.
func TestConcurrentCreatesWithOneKey(t *testing.T) {
	cfg := testConfig(t)
	log := slog.New(slog.DiscardHandler)
	store := newTestStore(t, cfg, log)
	base := testServer(t, log, store, newTestCache(t, cfg, log))
	for round := range 10 {
		key, name := fmt.Sprintf("round-%d-%s", round, randomHex(t)), fmt.Sprintf("round %d", round)
		answers := make([]response, 12)
		postAll := func() { // the POST from each of len(answers) clients at once
			var wg sync.WaitGroup
			for i := range answers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					answers[i] = do(t, "POST", base+"/items", fmt.Sprintf(`{"name":%q}`, name), "Idempotency-Key", key)
				}()
			}
			wg.Wait()
		}
		postAll()
		var created []string
		for _, a := range answers {
			switch a.status {
			case 201:
				created = append(created, string(a.body))
			case 409:
			default:
				t.Errorf("round %d: %d %s; want 201 or 409", round, a.status, a.body)
			}
		}
		if n := countNamed(t, store, name); n != 1 || len(created) == 0 {
			t.Fatalf("round %d: %d rows, %d answers 201; want 1 row and at least one 201", round, n, len(created))
		}
		for _, body := range created {
			if body != created[0] {
				t.Errorf("round %d: answers %s and %s; want one item", round, created[0], body)
			}
		}
		// Retries of the finished create, at once: each replays it; none
		// is told that the first is still running.
		postAll()
		for _, a := range answers {
			if a.status != 201 || string(a.body) != created[0] || a.header.Get("Idempotent-Replayed") != "true" {
				t.Errorf("round %d: a retry after the create: %d %s; want it replayed, 201 %s", round, a.status, a.body, created[0])
			}
		}
	}
}

// TestIdempotencyKeysExpire: a key older than IDEMPOTENCY_KEY_TTL is
// deleted by the replica's expiry, and then makes a new item.
func TestIdempotencyKeysExpire(t *testing.T) {
	cfg := testConfig(t)
	cfg.IdempotencyKeyTTL = time.Second
	log := slog.New(slog.DiscardHandler)
	store := newTestStore(t, cfg, log)
	base := testServer(t, log, store, newTestCache(t, cfg, log))
	key := "k-" + randomHex(t)
	first := do(t, "POST", base+"/items", `{"name":"once"}`, "Idempotency-Key", key)
	if again := do(t, "POST", base+"/items", `{"name":"once"}`, "Idempotency-Key", key); again.header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("a retry within the TTL: %d %v; want it replayed", again.status, again.header)
	}
	waitFor(t, "the key to be deleted", func() bool {
		var n int
		store.db.QueryRowContext(t.Context(), "SELECT count(*) FROM idempotency_keys").Scan(&n)
		return n == 0
	})
	later := do(t, "POST", base+"/items", `{"name":"once"}`, "Idempotency-Key", key)
	if later.status != 201 || later.header.Get("Idempotent-Replayed") != "" || string(later.body) == string(first.body) {
		t.Errorf("the key after it expired: %d %v %s; want a new item (first: %s)", later.status, later.header, later.body, first.body)
	}
}

// TestExpireKeysInBatches deletes 2,500 expired keys while the items table
// is locked: the expiry needs no lock of it, and leaves the keys that have
// not expired.
func TestExpireKeysInBatches(t *testing.T) {
	cfg := testConfig(t)
	log := slog.New(slog.DiscardHandler)
	store := newTestStore(t, cfg, log)
	newTestCache(t, cfg, log)
	rawSQL(t, cfg,
		`INSERT INTO idempotency_keys (key, fingerprint, status, location, etag, body, created)
		 SELECT 'old-' || n, '\x00', 201, '/items/' || n, '"1"', '{}', now() - interval '2 days' - n * interval '1 second' FROM generate_series(1, 2500) n`,
		`INSERT INTO idempotency_keys (key, fingerprint, status, location, etag, body)
		 SELECT 'new-' || n, '\x00', 201, '/items/' || n, '"1"', '{}' FROM generate_series(1, 10) n`)
	lockItems(t, cfg)
	start := time.Now()
	n, err := store.ExpireKeys()
	if err != nil || n != 2500 {
		t.Fatalf("ExpireKeys: %d, %v; want the 2500 expired keys deleted", n, err)
	}
	var left int
	store.db.QueryRowContext(t.Context(), "SELECT count(*) FROM idempotency_keys WHERE key LIKE 'new-%'").Scan(&left)
	if left != 10 {
		t.Errorf("keys that have not expired: %d left; want 10", left)
	}
	t.Logf("2500 expired keys deleted in %s, %d statements, with items locked", time.Since(start), (2500+keyBatch)/keyBatch)
}

// TestRetriedCreatesThroughFaults: clients create items, each under a key
// of its own, while PostgreSQL is cut, stalled and its backends
// terminated (a private PostgreSQL), and retry every POST that did not answer 201 with the same
// key and body, until it does. Every key must end with exactly one row,
// the one its 201 names: no duplicate, none lost. Some POSTs commit and
// lose their answer (TestNothingLost counts those rows); here their
// retries must get the answer replayed instead.
func TestRetriedCreatesThroughFaults(t *testing.T) {
	cfg := startPostgres(t).config(testConfig(t)) // a private server, whose backends it may end
	cfg.DBQueryTimeout = 10 * time.Second         // for the checks at the end
	log := slog.New(slog.NewTextHandler(newLogBuffer(t), &slog.HandlerOptions{Level: slog.LevelWarn}))
	direct, store, pg := storeBehindProxy(t, cfg, log)
	base := testServer(t, log, store, newTestCache(t, cfg, log))
	// Each create's COMMIT takes 50 ms (a deferred trigger), so that when
	// replies stall, most creates in flight have sent theirs: they commit,
	// and their answers are lost.
	rawSQL(t, cfg, `CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
		'BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END'`,
		`CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON idempotency_keys
		DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()`)

	type outcome struct {
		key   string
		item  Item
		tries int
	}
	var mu sync.Mutex
	var done []outcome
	statuses := map[int]int{}
	var replayed, transport int
	stop := make(chan struct{})
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 8}, Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	wait := loadClients(8, stop, func(w, n int) bool {
		o := outcome{key: fmt.Sprintf("w%d-%d-%s", w, n, randomHex(t))}
		body := fmt.Sprintf(`{"name":%q}`, o.key)
		for ; ; o.tries++ {
			if o.tries == 300 {
				t.Errorf("key %s: no 201 after %d tries", o.key, o.tries)
				return false
			}
			req, _ := http.NewRequest("POST", base+"/items", strings.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			req.Header.Set("Idempotency-Key", o.key)
			resp, err := client.Do(req)
			if err != nil {
				mu.Lock()
				transport++
				mu.Unlock()
				time.Sleep(20 * time.Millisecond)
				continue
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			mu.Lock()
			statuses[resp.StatusCode]++
			if resp.Header.Get("Idempotent-Replayed") == "true" {
				replayed++
			}
			mu.Unlock()
			if resp.StatusCode == 201 {
				if err := json.Unmarshal(b, &o.item); err != nil || o.item.Name != o.key {
					t.Errorf("key %s: 201 with %s", o.key, b)
				}
				break
			}
			if resp.StatusCode != 503 && resp.StatusCode != 409 {
				t.Errorf("key %s: %d %s; want 201, 409 or 503", o.key, resp.StatusCode, b)
				return false
			}
			time.Sleep(20 * time.Millisecond)
		}
		mu.Lock()
		done = append(done, o)
		mu.Unlock()
		return true
	})
	terminateAll := func() { terminate(t, direct.db, false) }
	step(t, 300*time.Millisecond, "cut PostgreSQL", func() { pg.setCut(true) })
	step(t, 700*time.Millisecond, "restore PostgreSQL", func() { pg.setCut(false) })
	step(t, 500*time.Millisecond, "stall PostgreSQL", pg.stall)
	step(t, 700*time.Millisecond, "restore PostgreSQL", pg.dropHeld)
	step(t, 500*time.Millisecond, "stall replies only", pg.stallReplies)
	step(t, 700*time.Millisecond, "restore PostgreSQL", pg.dropHeld)
	step(t, 500*time.Millisecond, "terminate every backend", terminateAll)
	step(t, 300*time.Millisecond, "terminate every backend", terminateAll)
	step(t, 300*time.Millisecond, "stall replies only", pg.stallReplies)
	step(t, 700*time.Millisecond, "restore PostgreSQL", pg.dropHeld)
	step(t, 500*time.Millisecond, "stop", func() { close(stop) })
	wait()

	rows, err := direct.List(t.Context(), 0, 1_000_000)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string][]Item{}
	for _, r := range rows {
		byName[r.Name] = append(byName[r.Name], r)
	}
	var duplicates, lost, retried int
	for _, o := range done {
		got := byName[o.key]
		switch {
		case len(got) == 0:
			lost++
			t.Errorf("key %s answered 201 %+v, but no row has it", o.key, o.item)
		case len(got) > 1:
			duplicates += len(got) - 1
			t.Errorf("key %s: %d rows %+v; want 1", o.key, len(got), got)
		case got[0].ID != o.item.ID:
			t.Errorf("key %s: its 201 named item %d; its row is %d", o.key, o.item.ID, got[0].ID)
		}
		if o.tries > 0 {
			retried++
		}
		delete(byName, o.key)
	}
	for name, items := range byName { // keys whose client stopped before a 201 (only if a test error ended it)
		t.Logf("row of a key with no 201: %s %+v", name, items)
	}
	// A replayed answer is a POST that committed but whose 201 was lost:
	// without the key, its retry would have made a second row.
	if statuses[503] == 0 || retried == 0 || replayed == 0 {
		t.Errorf("%d 503s, %d keys retried, %d answers replayed: want some of each, or the faults were not felt", statuses[503], retried, replayed)
	}
	t.Logf("%d keys, %d rows: %d duplicates, %d lost; %d keys needed retries; answers %v, %d replayed, %d transport errors",
		len(done), len(rows), duplicates, lost, retried, statuses, replayed, transport)
}

// TestInsertKeyNeverReplacesALiveKey: the record of a key replaces an
// expired row of it, never a live one, so a create that raced with
// another under the same key writes nothing (errKeyRaced).
func TestInsertKeyNeverReplacesALiveKey(t *testing.T) {
	cfg := testConfig(t)
	store := newTestStore(t, cfg, slog.New(slog.DiscardHandler))
	rawSQL(t, cfg, `INSERT INTO idempotency_keys (key, fingerprint, status, location, etag, body, created)
		VALUES ('live', '\x01', 201, '/items/1', '"1"', '{"id":1}', now()), ('old', '\x01', 201, '/items/2', '"1"', '{"id":2}', now() - interval '2 days')`)
	for _, c := range []struct {
		key  string
		want int64
	}{{"live", 0}, {"old", 1}} {
		r, err := store.db.ExecContext(t.Context(), insertKey, c.key, []byte{2}, 201, "/items/3", `"1"`, `{"id":3}`, store.keyTTL.Milliseconds())
		if err != nil {
			t.Fatal(err)
		}
		if n, _ := r.RowsAffected(); n != c.want {
			t.Errorf("recording key %q over its row: %d rows changed; want %d", c.key, n, c.want)
		}
	}
	var body string
	store.db.QueryRowContext(t.Context(), "SELECT body FROM idempotency_keys WHERE key = 'live'").Scan(&body)
	if body != `{"id":1}` {
		t.Errorf("the live key's answer is now %s; want it kept", body)
	}
}

// TestSlowCreateKeepsItsKey: a create that waits on a lock for longer than
// IDEMPOTENCY_KEY_TTL still records a key that lives a TTL from its
// commit, so that a retry right after it is replayed.
func TestSlowCreateKeepsItsKey(t *testing.T) {
	cfg := testConfig(t)
	cfg.IdempotencyKeyTTL = time.Second
	cfg.DBQueryTimeout = 10 * time.Second
	log := slog.New(slog.DiscardHandler)
	store := newTestStore(t, cfg, log)
	base := testServer(t, log, store, newTestCache(t, cfg, log))
	unlock := lockItems(t, cfg)
	time.AfterFunc(1500*time.Millisecond, unlock)
	first := do(t, "POST", base+"/items", `{"name":"slow"}`, "Idempotency-Key", "slow")
	again := do(t, "POST", base+"/items", `{"name":"slow"}`, "Idempotency-Key", "slow")
	if first.status != 201 || again.header.Get("Idempotent-Replayed") != "true" || string(again.body) != string(first.body) {
		t.Errorf("a create that took %s, then its retry: %d %s, then %d %v %s; want the retry replayed",
			first.elapsed.Round(time.Millisecond), first.status, first.body, again.status, again.header, again.body)
	}
}

func TestTimeoutSetting(t *testing.T) {
	for d, want := range map[time.Duration]int64{
		3 * time.Second: 3000, 500 * time.Microsecond: 1, 600 * time.Hour: 1<<31 - 1,
	} {
		if got := timeoutSetting(d); got != want {
			t.Errorf("timeoutSetting(%s) = %d; want %d", d, got, want)
		}
	}
}
