package main

import (
	"fmt"
	"net/http"
	"testing"
	"time"
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
	if want := `{"status":"ok","postgres":"up","redis":"down"}` + "\n"; res.status != 200 || string(res.body) != want {
		t.Errorf("GET /ready: got %d %s; want 200 %s", res.status, res.body, want)
	}
	it := createItem(t, base, `{"name":"no cache"}`)
	for i := 0; i < 20; i++ {
		res := do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "")
		if res.status != 200 || res.header.Get("X-Cache") != "BYPASS" {
			t.Fatalf("GET %d: got %d X-Cache %q %s; want 200 BYPASS", i, res.status, res.header.Get("X-Cache"), res.body)
		}
		if res.elapsed > time.Second {
			t.Errorf("GET %d took %v; want under 1 s", i, res.elapsed)
		}
	}
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
	cache := newCache(cfg, log)
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

// TestRedisOutageAndRecovery: Redis (a private redis-server) dies mid-run and
// comes back on the same port; reads go BYPASS, then HIT again by themselves,
// with one log line for the outage and one for the recovery.
func TestRedisOutageAndRecovery(t *testing.T) {
	cfg := testConfig(t)
	cfg.RedisHost, cfg.RedisPort = "127.0.0.1", freePort(t)
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

	stop()
	for i := 0; i < 10; i++ {
		if got := cacheHeader(); got != "BYPASS" {
			t.Errorf("Redis down, GET %d: X-Cache %q; want BYPASS", i, got)
		}
	}

	startRedis(t, cfg.RedisPort) // empty: the old keys are gone
	back := time.Now()
	var outcomes []string
	for time.Since(back) < 3*time.Second {
		o := cacheHeader()
		outcomes = append(outcomes, o)
		if o == "HIT" {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if outcomes[len(outcomes)-1] != "HIT" {
		t.Fatalf("after Redis came back: outcomes %v; want HIT within 3 s", outcomes)
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
	if n := logs.count("redis refused a command"); n != 1 {
		t.Errorf(`log lines "redis refused a command": got %d; want 1`, n)
	}
	if n := logs.count("redis unavailable"); n != 0 {
		t.Errorf(`log lines "redis unavailable": got %d; want 0 (Redis answers reads)`, n)
	}
}
