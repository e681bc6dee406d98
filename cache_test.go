package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/format"
	"go/parser"
	"go/token"
	"go/types"
	"hash/crc32"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// checkEndpointsWithoutRedis runs every endpoint against a service whose
// Redis is broken: each must answer as it would with Redis, GETs as BYPASS
// within 1 s.
func checkEndpointsWithoutRedis(t *testing.T, base string) {
	t.Helper()
	if res := do(t, "GET", base+"/health", ""); res.status != 200 {
		t.Errorf("GET /health: got %d; want 200", res.status)
	}
	res := do(t, "GET", base+"/ready", "")
	var ready readiness
	if res.status != 200 || json.Unmarshal(res.body, &ready) != nil || ready.Status != "ok" || ready.Postgres != "up" ||
		ready.Redis != "down" || ready.RedisError == "" {
		t.Errorf("GET /ready: got %d %s; want 200 with status ok, postgres up, redis down and the reason", res.status, res.body)
	}
	it := createItem(t, base, `{"name":"no cache"}`)
	var first, slowest time.Duration
	for i := 0; i < 20; i++ {
		res := do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "")
		if res.status != 200 || res.header.Get("X-Cache") != "BYPASS" {
			t.Fatalf("GET %d: got %d X-Cache %q %s; want 200 BYPASS", i, res.status, res.header.Get("X-Cache"), res.body)
		}
		if res.elapsed > time.Second {
			t.Errorf("GET %d took %v; want under 1 s", i, res.elapsed)
		}
		if i == 0 {
			first = res.elapsed
		} else {
			slowest = max(slowest, res.elapsed)
		}
	}
	t.Logf("20 GETs without Redis: the first after the POST took %v, the slowest of the rest %v",
		first.Round(100*time.Microsecond), slowest.Round(100*time.Microsecond))
	if res := do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID+1000), ""); res.status != 404 {
		t.Errorf("GET missing item: got %d; want 404", res.status)
	}
	if res := do(t, "GET", base+"/items/abc", ""); res.status != 400 {
		t.Errorf("GET /items/abc: got %d; want 400", res.status)
	}
}

// serveWithRedis serves the API with the Redis at cfg's address, a broken or
// private one whose keys need no cleanup, and returns its URL and log.
func serveWithRedis(t *testing.T, cfg Config) (string, *logBuffer) {
	t.Helper()
	logs := newLogBuffer(t)
	log := logs.logger()
	cache := newCache(cfg, itemShape, log)
	t.Cleanup(func() { cache.Close() })
	return testServer(t, log, newTestStore(t, cfg, log), cache), logs
}

// TestRedisBroken: Redis refusing connections (nothing listens on its port)
// or hung (it accepts and never answers). Every endpoint still answers, and
// the outage is logged once. While hung, only one request per retry interval
// waits for the Redis timeout.
func TestRedisBroken(t *testing.T) {
	for name, port := range map[string]func(*testing.T) int{"refusing": freePort, "hung": hungListener} {
		t.Run(name, func(t *testing.T) {
			cfg := testConfig(t)
			cfg.RedisHost, cfg.RedisPort = "127.0.0.1", port(t)
			base, logs := serveWithRedis(t, cfg)
			checkEndpointsWithoutRedis(t, base)
			if n := logs.count("redis unavailable"); n != 1 {
				t.Errorf(`log lines "redis unavailable": got %d; want 1 for the whole outage`, n)
			}
		})
	}
}

// TestRedisOutageAndRecovery: Redis (a private redis-server) dies under a
// read load and comes back on the same port; every read is right, reads go
// BYPASS, then HIT again by themselves within 2 s, with one log line for the
// outage and one for the recovery.
func TestRedisOutageAndRecovery(t *testing.T) {
	cfg := testConfig(t)
	cfg.RedisHost, cfg.RedisPort = "127.0.0.1", freePort(t)
	cfg.RedisRetry = time.Second // the default
	stop := startRedis(t, cfg.RedisPort)
	base, logs := serveWithRedis(t, cfg)
	it := createItem(t, base, `{"name":"survivor"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	cacheHeader := func() string {
		res := do(t, "GET", url, "")
		if res.status != http.StatusOK {
			t.Fatalf("GET: got %d %s; want 200", res.status, res.body)
		}
		return res.header.Get("X-Cache")
	}
	if got := cacheHeader() + " " + cacheHeader(); got != "MISS HIT" {
		t.Fatalf("before the outage: got %s; want MISS HIT", got)
	}

	// A read load throughout: every answer must be right.
	others := make([]string, 20)
	for i := range others {
		others[i] = fmt.Sprintf("%s/items/%d", base, createItem(t, base, fmt.Sprintf(`{"name":"other %d"}`, i)).ID)
	}
	loadCtx, endLoad := context.WithCancel(t.Context())
	var load sync.WaitGroup
	var loaded atomic.Int64
	for r := range 4 {
		load.Add(1)
		go func() {
			defer load.Done()
			for n := r; loadCtx.Err() == nil; n++ {
				res := do(t, "GET", others[n%len(others)], "")
				if res.status != 200 || !strings.Contains(string(res.body), fmt.Sprintf(`"other %d"`, n%len(others))) {
					t.Errorf("GET under load: got %d %s %s", res.status, res.header.Get("X-Cache"), res.body)
					return
				}
				loaded.Add(1)
			}
		}()
	}
	defer func() {
		endLoad()
		load.Wait()
		t.Logf("%d reads under load across the outage, all right", loaded.Load())
	}()

	stop()
	for i := 0; i < 10; i++ {
		if got := cacheHeader(); got != "BYPASS" {
			t.Errorf("Redis down, GET %d: X-Cache %q; want BYPASS", i, got)
		}
	}

	startRedis(t, cfg.RedisPort) // empty: the old keys are gone
	back := time.Now()
	var outcomes []string
	for time.Since(back) < 5*time.Second {
		o := cacheHeader()
		outcomes = append(outcomes, o)
		if o == "HIT" {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if took := time.Since(back); outcomes[len(outcomes)-1] != "HIT" || took > 2*time.Second {
		t.Fatalf("after Redis came back: outcomes %v after %v; want HIT within 2 s", outcomes, took)
	} else {
		t.Logf("Redis restarted; first HIT after %v", took)
	}
	if n := logs.count("redis unavailable"); n != 1 {
		t.Errorf(`log lines "redis unavailable": got %d; want 1`, n)
	}
	if n := logs.count("redis is back"); n != 1 {
		t.Errorf(`log lines "redis is back": got %d; want 1`, n)
	}
}

// TestRedisFull: Redis refuses every write (maxmemory reached, noeviction).
// Reads still work; each GET of an uncached item is a MISS served from
// PostgreSQL; the refusals are logged once, and Redis is not bypassed.
func TestRedisFull(t *testing.T) {
	cfg := testConfig(t)
	cfg.RedisHost, cfg.RedisPort = "127.0.0.1", freePort(t)
	startRedis(t, cfg.RedisPort, "--maxmemory", "1", "--maxmemory-policy", "noeviction")
	base, logs := serveWithRedis(t, cfg)
	it := createItem(t, base, `{"name":"nowhere to cache"}`)
	for i := 0; i < 10; i++ {
		res := do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "")
		if res.status != http.StatusOK || res.header.Get("X-Cache") != "MISS" {
			t.Fatalf("GET %d with Redis full: got %d %s; want 200 MISS", i, res.status, res.header.Get("X-Cache"))
		}
	}
	// A write: Redis refuses the tombstone script too (OOM), so the cached
	// value, if any, is deleted instead, which a full Redis still accepts.
	if err := redis.NewClient(&redis.Options{Addr: cfg.redisAddr()}).Set(t.Context(), cfg.CacheKeyPrefix+strconv.FormatInt(it.ID, 10), "1:stale", 0).Err(); err == nil {
		t.Fatal("a SET into the full Redis succeeded; want OOM")
	}
	if res := do(t, "PUT", fmt.Sprintf("%s/items/%d", base, it.ID), `{"name":"changed"}`); res.status != 200 {
		t.Fatalf("PUT with Redis full: got %d %s", res.status, res.body)
	}
	if res := do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), ""); !strings.Contains(string(res.body), `"changed"`) || res.header.Get("X-Cache") != "MISS" {
		t.Errorf("GET after PUT with Redis full: got %s %s; want MISS with the new name", res.header.Get("X-Cache"), res.body)
	}
	if n := logs.count("redis refused a command"); n != 1 {
		t.Errorf(`log lines "redis refused a command": got %d; want 1 (at most one a minute)`, n)
	}
	if n := logs.count("redis unavailable"); n != 0 {
		t.Errorf(`log lines "redis unavailable": got %d; want 0 (Redis answers reads)`, n)
	}
}

// TestStaleFillIsRejected plays the cache-aside race step by step: a reader
// fetches a row, a write commits and invalidates, and only then does the
// reader fill Redis with what it fetched. The stale fill must not land, for
// an update or a delete; nor may a fill that comes too long after its read.
func TestStaleFillIsRejected(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	store := newTestStore(t, cfg, log)
	cache := newTestCache(t, cfg, log)
	base := testServer(t, log, store, cache)
	it := createItem(t, base, `{"name":"v1"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	fillWith := func(old Item) {
		t.Helper()
		body, err := json.Marshal(old)
		if err != nil {
			t.Fatal(err)
		}
		cache.Fill(t.Context(), old.ID, old.Version, body, time.Now())
	}

	old, err := store.Get(t.Context(), it.ID) // the slow reader's read
	if err != nil {
		t.Fatal(err)
	}
	if res := do(t, "PUT", url, `{"name":"v2"}`); res.status != 200 {
		t.Fatalf("PUT: got %d %s", res.status, res.body)
	}
	fillWith(old) // after the write's invalidation
	res := do(t, "GET", url, "")
	if res.status != 200 || !strings.Contains(string(res.body), `"v2"`) || res.header.Get("X-Cache") != "MISS" {
		t.Errorf("GET after a stale fill: got %d %s %s; want 200 MISS v2", res.status, res.header.Get("X-Cache"), res.body)
	}
	fillWith(old) // over the cached v2
	if res := do(t, "GET", url, ""); !strings.Contains(string(res.body), `"v2"`) || res.header.Get("X-Cache") != "HIT" {
		t.Errorf("GET after a stale fill over v2: got %s %s; want HIT v2", res.header.Get("X-Cache"), res.body)
	}

	old, err = store.Get(t.Context(), it.ID)
	if err != nil {
		t.Fatal(err)
	}
	if res := do(t, "DELETE", url, ""); res.status != 204 {
		t.Fatalf("DELETE: got %d %s", res.status, res.body)
	}
	fillWith(old)
	if res := do(t, "GET", url, ""); res.status != 404 {
		t.Errorf("GET after a stale fill of a deleted item: got %d %s; want 404", res.status, res.body)
	}
	if v, _ := cache.rdb.Get(t.Context(), cache.Key(it.ID)).Result(); v != "3:" {
		t.Errorf("Redis after DELETE of version 2: got %q; want the tombstone \"3:\"", v)
	}
	if ttl := cache.rdb.PTTL(t.Context(), cache.Key(it.ID)).Val(); ttl <= 0 || ttl > cache.tombstoneTTL {
		t.Errorf("tombstone TTL: got %v; want up to %v", ttl, cache.tombstoneTTL)
	}

	fresh := createItem(t, base, `{"name":"late"}`)
	fresh.Version = 1
	body, _ := json.Marshal(fresh)
	cache.Fill(t.Context(), fresh.ID, 1, body, time.Now().Add(-cache.fillWindow-time.Second))
	if n := cache.rdb.Exists(t.Context(), cache.Key(fresh.ID)).Val(); n != 0 {
		t.Errorf("a fill later than fillWindow after its read was stored")
	}
}

// TestNoStaleReadAfterRedisFailure: Redis (a private redis-server behind a
// proxy) is down, hung, or restarted with its data at the moment of a
// write, so the write cannot invalidate the cached value; or it restarts
// later from a snapshot taken before the write. The write still succeeds,
// and once Redis is reachable again with the old value in it, no GET
// returns that value. Hits resume with the new one, at once after an
// outage, or after CACHE_TTL if Redis came back with data of its own.
func TestNoStaleReadAfterRedisFailure(t *testing.T) {
	type redisCtl struct {
		proxy       *proxy
		stop, start func()
		save        func() // SAVE: an RDB snapshot that a restart reloads
	}
	cut := func(r redisCtl) func() {
		r.proxy.setCut(true)
		return func() { r.proxy.setCut(false) }
	}
	// A hung Redis would still run the invalidation when it wakes up; this
	// one loses it, as one restarted by a supervisor would.
	hang := func(r redisCtl) func() {
		r.proxy.stall()
		return r.proxy.dropHeld
	}
	for _, tc := range []struct {
		name        string
		write       string // PUT or DELETE
		args        []string
		fault       func(redisCtl) (restore func())
		noticed     bool   // the API sees the outage
		wantOutcome string // X-Cache at the end
	}{
		{"down", "PUT", nil, cut, true, "HIT"},
		{"down, delete", "DELETE", nil, cut, true, "MISS"},
		{"hung", "PUT", nil, hang, true, "HIT"},
		{"hung, delete", "DELETE", nil, hang, true, "MISS"},
		// Redis that keeps an append-only file restarts: the write finds it
		// gone, and the old value is back when it returns.
		{"restarted", "PUT", []string{"--appendonly", "yes", "--appendfsync", "always"}, func(r redisCtl) func() {
			r.stop()
			return r.start
		}, true, "BYPASS"},
		// Redis takes a snapshot, the write invalidates, and then Redis
		// restarts from the snapshot between two requests: the API never
		// sees an error.
		{"restored from an older snapshot", "PUT", nil, func(r redisCtl) func() {
			r.save()
			return func() { r.stop(); r.start() }
		}, false, "BYPASS"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t)
			redisPort := freePort(t)
			args := append([]string{"--dir", t.TempDir()}, tc.args...)
			stop := startRedis(t, redisPort, args...)
			p := newProxy(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(redisPort)))
			cfg.RedisHost, cfg.RedisPort = "127.0.0.1", p.port()
			base, logs := serveWithRedis(t, cfg)
			it := createItem(t, base, `{"name":"old"}`)
			url := fmt.Sprintf("%s/items/%d", base, it.ID)
			if got := do(t, "GET", url, "").header.Get("X-Cache") + " " + do(t, "GET", url, "").header.Get("X-Cache"); got != "MISS HIT" {
				t.Fatalf("before the fault: got %s; want MISS HIT", got)
			}

			direct := redis.NewClient(&redis.Options{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(redisPort))})
			defer direct.Close()
			restore := tc.fault(redisCtl{proxy: p, stop: func() { stop() },
				start: func() { stop = startRedis(t, redisPort, args...) },
				save: func() {
					if err := direct.Save(t.Context()).Err(); err != nil {
						t.Fatal(err)
					}
				}})
			body := ""
			if tc.write == "PUT" {
				body = `{"name":"new"}`
			}
			res := do(t, tc.write, url, body)
			if res.status/100 != 2 {
				t.Fatalf("%s with Redis %s: got %d %s; want 2xx", tc.write, tc.name, res.status, res.body)
			}
			if res.elapsed > time.Second {
				t.Errorf("%s with Redis %s took %v; want under 1 s", tc.write, tc.name, res.elapsed)
			}
			restore()

			var outcomes []string
			for start := time.Now(); time.Since(start) < 3*time.Second; time.Sleep(20 * time.Millisecond) {
				res := do(t, "GET", url, "")
				outcomes = append(outcomes, res.header.Get("X-Cache"))
				switch {
				case tc.write == "DELETE" && res.status != 404:
					t.Fatalf("GET after DELETE: got %d %s %s; want 404", res.status, res.header.Get("X-Cache"), res.body)
				case tc.write == "PUT" && (res.status != 200 || !strings.Contains(string(res.body), `"new"`)):
					t.Fatalf("GET after PUT: got %d %s %s; want 200 with the new name", res.status, res.header.Get("X-Cache"), res.body)
				}
				if outcomes[len(outcomes)-1] == tc.wantOutcome && len(outcomes) > 20 {
					break
				}
			}
			if got := outcomes[len(outcomes)-1]; got != tc.wantOutcome {
				t.Errorf("after Redis came back: outcomes %v; want them to end with %s", outcomes, tc.wantOutcome)
			}
			if n, want := logs.count("redis unavailable"), map[bool]int{true: 1}[tc.noticed]; n != want {
				t.Errorf(`log lines "redis unavailable": got %d; want %d`, n, want)
			}
			if n, want := logs.count("redis restarted with data"), map[bool]int{true: 1}[tc.wantOutcome == "BYPASS"]; n != want {
				t.Errorf(`log lines "redis restarted with data": got %d; want %d`, n, want)
			}
		})
	}
}

// TestNoStaleReads is the read-after-write check under load, against the
// real PostgreSQL and Redis and two replicas of the service: writers update
// (PUT, PATCH), delete and recreate a few items while readers GET them,
// each request through either replica. Each writer owns its items
// and numbers its writes in the name; a reader notes the last write
// acknowledged before its GET began, and the GET must show that write or a
// later one, and never a deleted item. STRESS_DURATION sets how long it
// runs (default 3s).
func TestNoStaleReads(t *testing.T) {
	duration := 3 * time.Second
	if v := os.Getenv("STRESS_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("STRESS_DURATION=%q: %v", v, err)
		}
		duration = d
	}
	const writers, itemsPerWriter, readers = 4, 2, 8
	cfg := testConfig(t)
	cfg.LogLevel = slog.LevelWarn
	logs := newLogBuffer(t)
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	// Two replicas, each with its own pool, Redis client and shared reads,
	// as two processes would have; writers and readers use both.
	replicas := []string{testServer(t, log, newTestStore(t, cfg, log), newTestCache(t, cfg, log))}
	replicas = append(replicas, serveItems(t, log, newReplica(t, cfg, log)))
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: writers + readers}}
	defer client.CloseIdleConnections()
	send := func(method, url, body string) (int, string, string, error) {
		req, err := http.NewRequest(method, url, strings.NewReader(body))
		if err != nil {
			return 0, "", "", err
		}
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, "", "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), resp.Header.Get("X-Cache"), err
	}

	// acked is what a slot's owner has been told: the item's id, the
	// number of its last acknowledged write, and whether it was deleted.
	type acked struct {
		id, seq  int64
		deleting bool // a DELETE has been sent
		deleted  bool // and acknowledged
	}
	slots := make([]atomic.Pointer[acked], writers*itemsPerWriter)
	create := func(slot int, seq int64) error {
		status, body, _, err := send("POST", replicas[slot%2]+"/items", fmt.Sprintf(`{"name":"s%d-%d"}`, slot, seq))
		var it Item
		if err == nil && (status != 201 || json.Unmarshal([]byte(body), &it) != nil) {
			err = fmt.Errorf("POST: %d %s", status, body)
		}
		if err == nil {
			slots[slot].Store(&acked{id: it.ID, seq: seq})
		}
		return err
	}
	for i := range slots {
		if err := create(i, 0); err != nil {
			t.Fatal(err)
		}
	}

	ctx, cancel := context.WithTimeout(t.Context(), duration)
	defer cancel()
	var wg sync.WaitGroup
	var writes, reads, hits, stale atomic.Int64
	var failMu sync.Mutex
	var failures []string
	fail := func(format string, args ...any) {
		failMu.Lock()
		defer failMu.Unlock()
		if len(failures) < 20 {
			failures = append(failures, fmt.Sprintf(format, args...))
		}
	}
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 1; ctx.Err() == nil; n++ {
				slot := w*itemsPerWriter + n%itemsPerWriter
				cur := slots[slot].Load()
				seq := cur.seq + 1
				url := fmt.Sprintf("%s/items/%d", replicas[(w+n)%2], cur.id)
				var status int
				var body string
				var err error
				switch {
				case n%25 == 0: // delete it, then create its successor
					slots[slot].Store(&acked{id: cur.id, seq: cur.seq, deleting: true})
					if status, body, _, err = send("DELETE", url, ""); err == nil && status == 204 {
						slots[slot].Store(&acked{id: cur.id, seq: cur.seq, deleted: true})
						err = create(slot, seq)
					} else if err == nil {
						err = fmt.Errorf("DELETE: %d %s", status, body)
					}
				case n%2 == 0:
					status, body, _, err = send("PUT", url, fmt.Sprintf(`{"name":"s%d-%d"}`, slot, seq))
				default:
					status, body, _, err = send("PATCH", url, fmt.Sprintf(`{"name":"s%d-%d"}`, slot, seq))
				}
				if err == nil && n%25 != 0 {
					if got, ok := seqOf(body); status != 200 || !ok || got != seq {
						err = fmt.Errorf("%d %s", status, body)
					} else {
						slots[slot].Store(&acked{id: cur.id, seq: seq})
					}
				}
				if err != nil {
					if ctx.Err() == nil {
						fail("writer %d: %v", w, err)
					}
					return
				}
				writes.Add(1)
			}
		}()
	}
	for r := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; ctx.Err() == nil; n++ {
				slot := (r + n*7) % len(slots)
				before := slots[slot].Load()
				status, body, xcache, err := send("GET", fmt.Sprintf("%s/items/%d", replicas[(r+n)%2], before.id), "")
				if err != nil {
					if ctx.Err() == nil {
						fail("reader %d: %v", r, err)
					}
					return
				}
				reads.Add(1)
				if xcache == "HIT" {
					hits.Add(1)
				}
				seq, ok := seqOf(body)
				switch {
				case status == 200 && before.deleted:
					stale.Add(1)
					fail("stale read: item %d was deleted, then GET answered %s %s", before.id, xcache, body)
				case status == 200 && (!ok || seq < before.seq):
					stale.Add(1)
					fail("stale read: item %d had write %d acknowledged, then GET answered %s %s", before.id, before.seq, xcache, body)
				case status == 404 && !before.deleted:
					// Only if it was deleted meanwhile.
					if now := slots[slot].Load(); now.id == before.id && !now.deleting && !now.deleted {
						fail("GET of item %d: 404, but it was never deleted", before.id)
					}
				case status != 200 && status != 404:
					fail("GET of item %d: %d %s", before.id, status, body)
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("%v: %d acknowledged writes, %d reads (%d hits), %d stale reads", duration, writes.Load(), reads.Load(), hits.Load(), stale.Load())
	for _, f := range failures {
		t.Error(f)
	}
	if writes.Load() < 100 || hits.Load() == 0 || hits.Load() == reads.Load() {
		t.Errorf("too little contention to show anything: %d writes, %d reads, %d hits; want 100+ writes and both hits and misses",
			writes.Load(), reads.Load(), hits.Load())
	}
}

// TestNoStaleReadsCatchesBrokenVariants shows that TestNoStaleReads can
// fail: it copies the package, breaks it as a naive cache-aside would be
// broken, and runs TestNoStaleReads on the copy, which must report stale
// reads. Each variant edits the copy's syntax tree, finding what it breaks
// by name, and fails saying what it could not find if the code has changed.
func TestNoStaleReadsCatchesBrokenVariants(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a copy of the package; skipped with -short")
	}
	testConfig(t) // skips or fails as the other tests do without servers
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to build the broken variants: %v", err)
	}
	variants := []struct {
		name, file string
		edit       func(*ast.File) error
		test       string // the test that must catch it
		duration   string // STRESS_DURATION
	}{
		{"invalidation before the commit", "items.go", invalidateBeforeCommit, "TestNoStaleReads", "2s"},
		{"fills that ignore versions", "cache.go", fillIgnoringVersions, "TestNoStaleReads", "2s"},
		{"an outbox never applied", "outbox.go", outboxNeverApplied, "TestScaleOut", "8s"},
	}
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			dir := t.TempDir()
			files, err := filepath.Glob("*.go")
			if err != nil {
				t.Fatal(err)
			}
			migrationFiles, _ := filepath.Glob("migrations/*")
			os.Mkdir(filepath.Join(dir, "migrations"), 0o755)
			for _, f := range append(append(files, migrationFiles...), "go.mod", "go.sum", "schema.sql") {
				b, err := os.ReadFile(f)
				if err != nil {
					t.Fatal(err)
				}
				if f == v.file {
					if b, err = editSource(f, b, v.edit); err != nil {
						t.Fatalf("variant %q cannot break %s: %v; update the variant to the code as it is now", v.name, f, err)
					}
				}
				if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			cmd := exec.CommandContext(t.Context(), goBin, "test", "-count=1", "-run", "^"+v.test+"$", ".")
			cmd.Dir = dir
			cmd.Env = append(os.Environ(), "STRESS_DURATION="+v.duration)
			out, err := cmd.CombinedOutput()
			if strings.Contains(string(out), "[build failed]") || strings.Contains(string(out), "[setup failed]") {
				t.Fatalf("variant %q does not build against the code as it is now; update the variant. Output:\n%s", v.name, out)
			}
			if err == nil || !strings.Contains(string(out), "stale read") {
				t.Fatalf("%s on the variant: %v; want it to fail with stale reads. Output:\n%s", v.test, err, out)
			}
			for _, line := range strings.Split(string(out), "\n") {
				if strings.Contains(line, "acknowledged writes") || strings.Contains(line, "3 replicas:") {
					t.Logf("caught: %s", strings.TrimSpace(line))
				}
			}
		})
	}
}

// editSource parses a Go file, edits its syntax tree and prints it again.
func editSource(name string, src []byte, edit func(*ast.File) error) ([]byte, error) {
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, name, src, parser.ParseComments)
	if err != nil {
		return nil, err
	}
	if err := edit(f); err != nil {
		return nil, err
	}
	var b bytes.Buffer
	err = format.Node(&b, fset, f)
	return b.Bytes(), err
}

// invalidateBeforeCommit breaks every method of Items that calls written
// (the invalidation after a write commits, written(ctx, id, ...)): it
// deletes the cached value first instead, then writes, and does not call
// written.
func invalidateBeforeCommit(f *ast.File) error {
	broken := 0
	for _, decl := range f.Decls {
		fn, ok := decl.(*ast.FuncDecl)
		if !ok || fn.Recv == nil || types.ExprString(fn.Recv.List[0].Type) != "*Items" || len(fn.Recv.List[0].Names) == 0 {
			continue
		}
		recv := fn.Recv.List[0].Names[0].Name
		for i, stmt := range fn.Body.List {
			call, ok := stmt.(*ast.ExprStmt)
			if !ok {
				continue
			}
			c, ok := call.X.(*ast.CallExpr)
			if sel, isSel := c.Fun.(*ast.SelectorExpr); !ok || !isSel || sel.Sel.Name != "written" || len(c.Args) < 2 {
				continue
			}
			del, err := parser.ParseExpr(fmt.Sprintf("%s.cache.rdb.Del(%s, %s.cache.Key(%s))",
				recv, types.ExprString(c.Args[0]), recv, types.ExprString(c.Args[1])))
			if err != nil {
				return err
			}
			// The call's arguments go to _, so that what they use stays used.
			blanks := make([]ast.Expr, len(c.Args))
			for j := range blanks {
				blanks[j] = ast.NewIdent("_")
			}
			fn.Body.List[i] = &ast.AssignStmt{Lhs: blanks, Tok: token.ASSIGN, Rhs: c.Args}
			fn.Body.List = append([]ast.Stmt{&ast.ExprStmt{X: del}}, fn.Body.List...)
			broken++
			break
		}
	}
	if broken == 0 {
		return errors.New("no method of Items calls written(ctx, id, ...) as a statement of its own")
	}
	return nil
}

// fillIgnoringVersions replaces the Lua script of fillScript (a
// redis.NewScript call) with a plain SET of the value (ARGV[2]) with its
// TTL in ms (ARGV[3]), as a naive cache-aside fills.
func fillIgnoringVersions(f *ast.File) error {
	for _, decl := range f.Decls {
		gen, ok := decl.(*ast.GenDecl)
		if !ok {
			continue
		}
		for _, spec := range gen.Specs {
			vs, ok := spec.(*ast.ValueSpec)
			if !ok || len(vs.Names) != 1 || vs.Names[0].Name != "fillScript" || len(vs.Values) != 1 {
				continue
			}
			if call, ok := vs.Values[0].(*ast.CallExpr); ok && types.ExprString(call.Fun) == "redis.NewScript" && len(call.Args) == 1 {
				call.Args[0] = &ast.BasicLit{Kind: token.STRING, Value: "`redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1`"}
				return nil
			}
		}
	}
	return errors.New("no var fillScript = redis.NewScript(...)")
}

// outboxNeverApplied makes the relay's sweeps delete the outbox rows
// without applying them: the function that SweepOutbox is given to apply
// them (its last argument, in relay.sweep) becomes one that returns nil.
func outboxNeverApplied(f *ast.File) error {
	found := false
	ast.Inspect(f, func(n ast.Node) bool {
		call, ok := n.(*ast.CallExpr)
		if !ok || !strings.HasSuffix(types.ExprString(call.Fun), ".SweepOutbox") || len(call.Args) == 0 {
			return true
		}
		expr, err := parser.ParseExpr("func(context.Context, map[int64]int64) error { return nil }")
		if err != nil {
			panic(err)
		}
		call.Args[len(call.Args)-1] = expr
		found = true
		return true
	})
	if !found {
		return errors.New("no call of SweepOutbox (r.store.SweepOutbox(..., apply))")
	}
	return nil
}

// TestTooManyMissedInvalidations: when more invalidations are missed during
// an outage than the cache remembers, it does not read Redis for one TTL
// after Redis is back, and so never serves what the writes could not remove.
func TestTooManyMissedInvalidations(t *testing.T) {
	cfg := testConfig(t)
	cfg.CacheTTL = 2 * time.Second
	redisPort := freePort(t)
	startRedis(t, redisPort)
	p := newProxy(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(redisPort)))
	cfg.RedisHost, cfg.RedisPort = "127.0.0.1", p.port()
	logs := newLogBuffer(t)
	log := logs.logger()
	cache := newCache(cfg, itemShape, log)
	t.Cleanup(func() { cache.Close() })
	cache.outages.maxMissed = 2
	base := testServer(t, log, newTestStore(t, cfg, log), cache)

	var urls []string
	for i := range 3 {
		it := createItem(t, base, fmt.Sprintf(`{"name":"old %d"}`, i))
		urls = append(urls, fmt.Sprintf("%s/items/%d", base, it.ID))
		do(t, "GET", urls[i], "") // cached
	}
	p.setCut(true)
	for _, url := range urls {
		if res := do(t, "PUT", url, `{"name":"new"}`); res.status != 200 {
			t.Fatalf("PUT with Redis down: got %d %s", res.status, res.body)
		}
	}
	p.setCut(false)
	if n := logs.count("too many invalidations missed"); n != 1 {
		t.Errorf(`log lines "too many invalidations missed": got %d; want 1`, n)
	}
	var outcomes []string
	for start := time.Now(); time.Since(start) < 6*time.Second; time.Sleep(50 * time.Millisecond) {
		for _, url := range urls {
			res := do(t, "GET", url, "")
			if !strings.Contains(string(res.body), `"new"`) {
				t.Fatalf("GET after the outage: got %d %s %s; want the new name", res.status, res.header.Get("X-Cache"), res.body)
			}
			outcomes = append(outcomes, res.header.Get("X-Cache"))
		}
		if outcomes[len(outcomes)-1] == "HIT" {
			break
		}
	}
	if outcomes[len(outcomes)-1] != "HIT" {
		t.Errorf("outcomes after the outage: %v; want BYPASS for about CACHE_TTL, then MISS and HIT", outcomes)
	}
}

// TestRedisSlow: every Redis reply comes 50 ms late, well within
// REDIS_TIMEOUT. Reads are still correct, hits are still hits, and each
// costs about the delay; nothing is logged as an outage.
func TestRedisSlow(t *testing.T) {
	cfg := testConfig(t)
	redisPort := freePort(t)
	startRedis(t, redisPort)
	p := newProxy(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(redisPort)))
	cfg.RedisHost, cfg.RedisPort = "127.0.0.1", p.port()
	base, logs := serveWithRedis(t, cfg)
	it := createItem(t, base, `{"name":"slow"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	do(t, "GET", url, "")
	p.delay.Store(int64(50 * time.Millisecond))
	var slowest time.Duration
	for i := 0; i < 10; i++ {
		res := do(t, "GET", url, "")
		if res.status != 200 || res.header.Get("X-Cache") != "HIT" || !strings.Contains(string(res.body), `"slow"`) {
			t.Fatalf("GET with a slow Redis: got %d %s %s; want 200 HIT", res.status, res.header.Get("X-Cache"), res.body)
		}
		slowest = max(slowest, res.elapsed)
	}
	if res := do(t, "PUT", url, `{"name":"slower"}`); res.status != 200 {
		t.Fatalf("PUT with a slow Redis: got %d %s", res.status, res.body)
	}
	if res := do(t, "GET", url, ""); !strings.Contains(string(res.body), `"slower"`) || res.header.Get("X-Cache") != "MISS" {
		t.Errorf("GET after PUT with a slow Redis: got %s %s; want MISS with the new name", res.header.Get("X-Cache"), res.body)
	}
	if n := logs.count("redis unavailable"); n != 0 {
		t.Errorf(`log lines "redis unavailable": got %d; want 0`, n)
	}
	t.Logf("slowest HIT with 50 ms added to each Redis reply: %v", slowest)
}

// TestRedisAbsentAtStartup: the service starts while nothing listens on
// Redis's port, serves from PostgreSQL, and hits resume by themselves
// within 2 s of Redis appearing (REDIS_RETRY_INTERVAL is 1 s).
func TestRedisAbsentAtStartup(t *testing.T) {
	cfg := testConfig(t)
	cfg.RedisHost, cfg.RedisPort = "127.0.0.1", freePort(t)
	cfg.RedisRetry = time.Second
	logs := newLogBuffer(t)
	newTestStore(t, cfg, logs.logger())
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	base, done := startRun(t, ctx, envFrom(cfg))
	it := createItem(t, base, `{"name":"early"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	if res := do(t, "GET", url, ""); res.status != 200 || res.header.Get("X-Cache") != "BYPASS" {
		t.Fatalf("GET without Redis: got %d %s; want 200 BYPASS", res.status, res.header.Get("X-Cache"))
	}

	startRedis(t, cfg.RedisPort)
	appeared := time.Now()
	var outcomes []string
	for time.Since(appeared) < 5*time.Second && (len(outcomes) == 0 || outcomes[len(outcomes)-1] != "HIT") {
		res := do(t, "GET", url, "")
		if res.status != 200 {
			t.Fatalf("GET: got %d %s", res.status, res.body)
		}
		outcomes = append(outcomes, res.header.Get("X-Cache"))
		time.Sleep(10 * time.Millisecond)
	}
	took := time.Since(appeared)
	if outcomes[len(outcomes)-1] != "HIT" || took > 2*time.Second {
		t.Errorf("after Redis appeared: outcomes %v after %v; want a HIT within 2 s", outcomes, took)
	}
	t.Logf("Redis appeared; first HIT after %v", took)
	cancel()
	if err := <-done; err != nil {
		t.Errorf("run: %v", err)
	}
}

// TestStaleFillAfterRedisRestart: a reader fetches a row, a write commits
// and leaves its tombstone, then Redis restarts empty (the tombstone is
// gone) before the reader fills. The fill must not land: reads that began
// before a restart was noticed cannot fill.
func TestStaleFillAfterRedisRestart(t *testing.T) {
	cfg := testConfig(t)
	redisPort := freePort(t)
	stop := startRedis(t, redisPort)
	cfg.RedisHost, cfg.RedisPort = "127.0.0.1", redisPort
	log := newLogBuffer(t).logger()
	store := newTestStore(t, cfg, log)
	cache := newCache(cfg, itemShape, log)
	defer cache.Close()
	base := testServer(t, log, store, cache)
	it := createItem(t, base, `{"name":"old"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)

	readStart := time.Now()
	old, err := store.Get(t.Context(), it.ID)
	if err != nil {
		t.Fatal(err)
	}
	if res := do(t, "PUT", url, `{"name":"new"}`); res.status != 200 {
		t.Fatalf("PUT: got %d %s", res.status, res.body)
	}
	stop()
	startRedis(t, redisPort)
	body, _ := json.Marshal(old)
	cache.Fill(t.Context(), old.ID, old.Version, body, readStart)
	if res := do(t, "GET", url, ""); !strings.Contains(string(res.body), `"new"`) || res.header.Get("X-Cache") != "MISS" {
		t.Errorf("GET after a stale fill into a restarted Redis: got %s %s; want MISS with the new name", res.header.Get("X-Cache"), res.body)
	}
	if res := do(t, "GET", url, ""); !strings.Contains(string(res.body), `"new"`) || res.header.Get("X-Cache") != "HIT" {
		t.Errorf("second GET: got %s %s; want HIT with the new name (a fill from a read after the restart lands)", res.header.Get("X-Cache"), res.body)
	}
}

// TestCacheAside: the first GET is a MISS that fills Redis with the body and
// the TTL, the second a HIT with byte-identical body; a cached value that
// this service did not write for that item is a MISS and is replaced.
func TestCacheAside(t *testing.T) {
	cfg := testConfig(t)
	cfg.CacheTTL = 90 * time.Second
	logs := newLogBuffer(t)
	log := logs.logger()
	cache := newTestCache(t, cfg, log)
	base := testServer(t, log, newTestStore(t, cfg, log), cache)
	it := createItem(t, base, `{"name":"cached","description":"<b>&</b>"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	key := cache.Key(it.ID)

	if n, _ := cache.rdb.Exists(t.Context(), key).Result(); n != 0 {
		t.Fatalf("key %s exists right after POST; want the first GET to be a MISS", key)
	}
	miss := do(t, "GET", url, "")
	hit := do(t, "GET", url, "")
	if got := miss.header.Get("X-Cache"); got != "MISS" {
		t.Errorf("first GET: X-Cache %q; want MISS", got)
	}
	if got := hit.header.Get("X-Cache"); got != "HIT" {
		t.Errorf("second GET: X-Cache %q; want HIT", got)
	}
	if string(miss.body) != string(hit.body) {
		t.Errorf("bodies differ: MISS %q, HIT %q", miss.body, hit.body)
	}
	body := strings.TrimSuffix(string(miss.body), "\n")
	// "<version>:<shape>:<CRC-32C of "<version>:<shape>:" and the body>:<body>"
	head := "1:" + itemShape + ":"
	cached := fmt.Sprintf("%s%08x:%s", head, crc32.Checksum([]byte(head+body), crc32.MakeTable(crc32.Castagnoli)), body)
	stored, err := cache.rdb.Get(t.Context(), key).Result()
	if err != nil || stored != cached {
		t.Errorf("Redis %s: got %q, %v; want %q, the version, the checksum and the body", key, stored, err, cached)
	}
	ttl, err := cache.rdb.PTTL(t.Context(), key).Result()
	if err != nil || ttl <= 80*time.Second || ttl > 90*time.Second {
		t.Errorf("TTL of %s: got %v, %v; want just under CACHE_TTL=90s", key, ttl, err)
	}

	other := createItem(t, base, `{"name":"other"}`)
	otherURL := fmt.Sprintf("%s/items/%d", base, other.ID)
	do(t, "GET", otherURL, "")
	othersValue, err := cache.rdb.Get(t.Context(), cache.Key(other.ID)).Result()
	if err != nil {
		t.Fatal(err)
	}
	sum := cached[len(head) : len(head)+8]
	crc32c := func(s string) uint32 { return crc32.Checksum([]byte(s), crc32.MakeTable(crc32.Castagnoli)) }
	for _, bad := range []string{"not json", "1:not json", head + "not json", head + sum + ":not json", `1:{"id":999999,"name":"other"}`, `1:[]`,
		head + sum, head + sum + ":", "x" + cached, strings.TrimSuffix(cached, "}") + `,"extra":1}`, cached + "  ", cached[:len(cached)-1],
		strings.TrimPrefix(cached, "1:"), head + body, head + "00000000:" + body, head + strings.ToUpper(sum) + ":" + body,
		othersValue,  // another item's value, checksum and all
		"0" + cached, // the version edited (0 leads, so it is not higher)
		fmt.Sprintf("1:00000000:%08x:%s", crc32c("1:00000000:"+body), body), // written by a build whose item has other fields
		fmt.Sprintf("1:%08x:%s", crc32c("1:"+body), body),                   // the format before values named their shape
	} {
		if bad == cached {
			continue // an uppercase checksum with no letters in it
		}
		if err := cache.rdb.Set(t.Context(), key, bad, time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		res := do(t, "GET", url, "")
		if res.status != 200 || res.header.Get("X-Cache") != "MISS" || string(res.body) != string(miss.body) {
			t.Errorf("GET with cached %q: got %d %s %s; want 200 MISS %s", bad, res.status, res.header.Get("X-Cache"), res.body, miss.body)
		}
		if got, _ := cache.rdb.Get(t.Context(), key).Result(); got != cached {
			t.Errorf("cached %q was not replaced: Redis has %q", bad, got)
		}
	}

	if n := logs.count("a cached value is not what this service caches"); n != 1 {
		t.Errorf("warnings about the values above: got %d; want 1 (at most one a minute)", n)
	}

	// A key of another type (WRONGTYPE) is a miss for that item, replaced by
	// the next fill; Redis is not bypassed for the other items.
	if err := cache.rdb.Del(t.Context(), key).Err(); err != nil {
		t.Fatal(err)
	}
	if err := cache.rdb.HSet(t.Context(), key, "a", "b").Err(); err != nil {
		t.Fatal(err)
	}
	if res := do(t, "GET", url, ""); res.status != 200 || res.header.Get("X-Cache") != "MISS" {
		t.Errorf("GET with a hash at %s: got %d %s; want 200 MISS", key, res.status, res.header.Get("X-Cache"))
	}
	if got := do(t, "GET", otherURL, "").header.Get("X-Cache"); got != "HIT" {
		t.Errorf("GET of another item after a WRONGTYPE: X-Cache %q; want HIT", got)
	}
	if got := do(t, "GET", url, "").header.Get("X-Cache"); got != "HIT" {
		t.Errorf("GET after the hash was replaced: X-Cache %q; want HIT", got)
	}
}

// TestItemShapes: a build whose Item has another field has another shape,
// and while both builds share one Redis (a rolling update) neither serves a
// body the other cached, and each respects the other's invalidations.
func TestItemShapes(t *testing.T) {
	// Item with one more field, whatever fields Item has now.
	fields := reflect.VisibleFields(reflect.TypeFor[Item]())
	fields = append(fields, reflect.StructField{Name: "ExtraForThisTest", Type: reflect.TypeFor[*int64](), Tag: `json:"extra" db:"extra"`})
	for i := range fields {
		fields[i].Index, fields[i].Offset = nil, 0
	}
	withExtra := shapeOf(reflect.StructOf(fields))
	type sameAsItem Item
	if withExtra == itemShape {
		t.Fatalf("an Item with another field has this build's shape %s; want another", itemShape)
	}
	if got := shapeOf(reflect.TypeFor[sameAsItem]()); got != itemShape {
		t.Errorf("a type with Item's fields: shape %s; want Item's %s", got, itemShape)
	}

	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	this := newTestCache(t, cfg, log)
	other := newCache(cfg, withExtra, log)
	defer other.Close()
	ctx := t.Context()
	mine, theirs := []byte(`{"id":7,"name":"a"}`), []byte(`{"id":7,"name":"a","extra":5}`)

	this.Fill(ctx, 7, 1, mine, time.Now())
	if _, _, outcome := other.Get(ctx, 7); outcome != Miss {
		t.Errorf("the other build reading this build's value: %s; want MISS", outcome)
	}
	other.Fill(ctx, 7, 1, theirs, time.Now())
	if body, version, outcome := other.Get(ctx, 7); outcome != Hit || string(body) != string(theirs) || version != 1 {
		t.Errorf("the other build reading its own value: %s %s; want HIT %s", outcome, body, theirs)
	}
	if _, _, outcome := this.Get(ctx, 7); outcome != Miss {
		t.Errorf("this build reading the other build's value: %s; want MISS", outcome)
	}
	other.Invalidate(ctx, 7, 2) // a write through the other build
	this.Fill(ctx, 7, 1, mine, time.Now())
	if _, _, outcome := this.Get(ctx, 7); outcome != Miss {
		t.Errorf("after the other build's write, a fill of the old version: %s; want MISS (the tombstone holds)", outcome)
	}
}

// TestRedisACL: a Redis user that may not run commands the cache needs
// (INFO and PING here; a managed Redis may withhold INFO) gets the cache bypassed,
// with the missing permissions named in the log and by /ready; once they
// are granted, the cache is back by itself. A user with exactly the
// commands docs/scaling.md lists has a working cache.
func TestRedisACL(t *testing.T) {
	cfg := testConfig(t)
	port := freePort(t)
	startRedis(t, port, "--user", "default", "on", "nopass", "~*", "+@all")
	admin := redis.NewClient(&redis.Options{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port))})
	defer admin.Close()
	listed := []string{"+get", "+set", "+del", "+exists", "+dbsize", "+eval", "+evalsha", "+info", "+ping"}
	acl := append([]string{"ACL", "SETUSER", "items", "on", ">pw", "~" + cfg.CacheKeyPrefix + "*", "-@all"}, listed...)
	args := make([]any, 0, len(acl))
	for _, a := range acl {
		if a != "+info" && a != "+ping" {
			args = append(args, a)
		}
	}
	if err := admin.Do(t.Context(), args...).Err(); err != nil {
		t.Fatal(err)
	}
	cfg.RedisHost, cfg.RedisPort, cfg.RedisUsername, cfg.RedisPassword = "127.0.0.1", port, "items", "pw"
	logs := newLogBuffer(t)
	log := logs.logger()
	base, _ := serveWithCache(t, cfg, log)
	it := createItem(t, base, `{"name":"acl"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	for range 3 {
		if res := do(t, "GET", url, ""); res.header.Get("X-Cache") != "BYPASS" {
			t.Fatalf("GET without INFO: X-Cache %s; want BYPASS", res.header.Get("X-Cache"))
		}
	}
	var ready readiness
	res := do(t, "GET", base+"/ready", "")
	if json.Unmarshal(res.body, &ready) != nil || res.status != 200 || ready.Redis != "down" ||
		!strings.Contains(ready.RedisError, "may not run info, ping,") {
		t.Errorf("/ready without INFO and PING: %d %s; want 200, redis down, and that both are missing", res.status, res.body)
	}
	if logs.count("may not run info, ping,") == 0 {
		t.Errorf("the log does not say INFO and PING are missing:\n%s", logs)
	}
	if err := admin.Do(t.Context(), "ACL", "SETUSER", "items", "+info", "+ping").Err(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the cache back once INFO is granted", func() bool {
		return do(t, "GET", url, "").header.Get("X-Cache") == "HIT"
	})
	if res := do(t, "GET", base+"/ready", ""); !strings.Contains(string(res.body), `"redis":"up"`) {
		t.Errorf("/ready with every permission: %s", res.body)
	}
	t.Logf("/ready without INFO: %s", ready.RedisError)
}

// TestFirstReadAfterRedisIsBack: as in the README's walkthrough, a write
// while Redis is down, then Redis back: the first read after the retry
// interval brings Redis up to date with the outbox itself and reads it (a
// MISS with the new value, then a HIT), rather than bypassing it until the
// relay's next turn.
func TestFirstReadAfterRedisIsBack(t *testing.T) {
	cfg := testConfig(t)
	cfg.OutboxInterval = time.Hour // only requests may catch up
	port := freePort(t)
	stop := startRedis(t, port)
	cfg.RedisHost, cfg.RedisPort = "127.0.0.1", port
	log := newLogBuffer(t).logger()
	base, _ := serveWithCache(t, cfg, log)
	it := createItem(t, base, `{"name":"old"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	do(t, "GET", url, "")
	stop()
	if res := do(t, "PUT", url, `{"name":"new"}`); res.status != 200 {
		t.Fatalf("PUT with Redis down: %d %s", res.status, res.body)
	}
	startRedis(t, port)
	time.Sleep(cfg.RedisRetry + 50*time.Millisecond)
	for i, want := range []string{"MISS", "HIT"} {
		res := do(t, "GET", url, "")
		if got := res.header.Get("X-Cache"); got != want || !strings.Contains(string(res.body), `"new"`) {
			t.Errorf("GET %d after Redis came back: %s %s; want %s with the new name", i+1, got, res.body, want)
		}
	}
}
