package main

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// outboxBound is the promise of docs/scaling.md for a replica cut off from
// Redis: its writes reach Redis through another replica's relay within
// this time of their acknowledgement (OUTBOX_POLL_INTERVAL is 250 ms).
const outboxBound = time.Second

// TestScaleOut runs three replicas of the service as processes (this test
// binary, through TestMain) on one PostgreSQL and a private Redis, each
// replica through a proxy of its own to Redis, with writers and readers
// spread over them, through four phases:
//  1. all healthy;
//  2. replica 0 cut off from Redis, with some writers writing through it
//     only; then it is killed (SIGKILL), still cut off, and started again;
//  3. replica 1 killed under load and started again;
//  4. Redis restarted, empty; then every replica must serve from it soon.
//
// A read is stale if it returns an older write of its item than one
// acknowledged before the read began. Every stale read fails the test,
// except those within outboxBound of a write acknowledged by a replica that
// could not reach Redis: in phase 2 the cut-off one, in phase 4 any while
// Redis restarts (and for a second after, as their breakers close); the
// test measures how long those lasted. Requests
// fail only if they were in flight on a replica being killed.
func TestScaleOut(t *testing.T) {
	phase := 2 * time.Second
	if v := os.Getenv("STRESS_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("STRESS_DURATION=%q: %v", v, err)
		}
		phase = d / 4
	}
	const replicas, writers, itemsPerWriter, readers = 3, 6, 3, 9
	cfg := testConfig(t)
	logs := newLogBuffer(t)
	newTestStore(t, cfg, logs.logger()) // the schema, migrated
	redisPort := freePort(t)
	stopRedis := startRedis(t, redisPort)
	redisAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(redisPort))

	type replica struct {
		url    atomic.Pointer[string] // nil while it is down
		proxy  *proxy                 // to Redis
		cmd    *exec.Cmd
		exited <-chan error
	}
	reps := make([]*replica, replicas)
	for i := range reps {
		reps[i] = new(replica)
	}
	// start starts replica i, anew; only its url is read by the load.
	start := func(i int) {
		r := reps[i]
		r.proxy = newProxy(t, redisAddr)
		url, cmd, exited := startProcess(t, cfg, "", "REDIS_HOST", "127.0.0.1", "REDIS_PORT", strconv.Itoa(r.proxy.port()),
			"REDIS_RETRY_INTERVAL", "300ms", "OUTBOX_POLL_INTERVAL", "250ms", "CACHE_TTL", "60s")
		r.cmd, r.exited = cmd, exited
		r.url.Store(&url)
	}
	for i := range reps {
		start(i)
	}
	// kill ends a replica with SIGKILL, as the kernel's OOM killer or a
	// node failure would; no new request is sent to it from just before.
	kill := func(i int) {
		reps[i].url.Store(nil)
		reps[i].cmd.Process.Kill()
		<-reps[i].exited
	}

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: writers + readers}, Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	var killing atomic.Int64 // 1 + the replica being killed, or 0
	var failed, inFlightOnKilled, requests atomic.Int64
	var failures sync.Map // a few examples: string -> true
	// send sends a request to replica i (or, if i < 0, to any that is up),
	// and returns the status and body, or ok false if it failed, and the
	// replica that answered.
	send := func(i int, method, path, body string) (status int, resBody string, ok bool, via int) {
		if i < 0 {
			i = rand.IntN(replicas)
		}
		url := reps[i].url.Load()
		for url == nil { // a load balancer would skip it
			i = (i + 1) % replicas
			url = reps[i].url.Load()
		}
		requests.Add(1)
		req, _ := http.NewRequest(method, *url+path, strings.NewReader(body))
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		res, err := client.Do(req)
		if err == nil {
			b, rerr := io.ReadAll(res.Body)
			res.Body.Close()
			status, resBody, err = res.StatusCode, string(b), rerr
		}
		switch {
		case err == nil && status < 300:
			return status, resBody, true, i
		case killing.Load() == int64(i+1) || reps[i].url.Load() != url:
			inFlightOnKilled.Add(1)
		default:
			failed.Add(1)
			failures.Store(fmt.Sprintf("%s %s on replica %d: %d %s %v", method, path, i, status, strings.TrimSpace(resBody), err), true)
		}
		return status, resBody, false, i
	}

	// acks of each item: the writes acknowledged, in order, with when and
	// through which replica and in which phase.
	type ack struct {
		seq      int64
		at       time.Time
		replica  int
		phase    int64
		fromCut0 bool // acknowledged by replica 0 while it was cut off from Redis
		redisOff bool // acknowledged while Redis was restarting, or just after (every replica cut off)
	}
	type history struct {
		mu   sync.Mutex
		id   int64
		acks []ack
	}
	items := make([]*history, writers*itemsPerWriter)
	for i := range items {
		_, body, ok, _ := send(0, "POST", "/items", fmt.Sprintf(`{"name":"%d-0"}`, i))
		var it Item
		if !ok || json.Unmarshal([]byte(body), &it) != nil {
			t.Fatalf("creating item %d: %s", i, body)
		}
		items[i] = &history{id: it.ID, acks: []ack{{seq: 0, at: time.Now()}}}
	}

	var current atomic.Int64 // the phase, 1 to 4
	current.Store(1)
	var cut0 atomic.Bool     // replica 0 is cut off from Redis
	var redisOff atomic.Bool // Redis is restarting: every replica is cut off
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			seq := int64(0)
			for {
				select {
				case <-stop:
					return
				default:
				}
				slot := w*itemsPerWriter + rand.IntN(itemsPerWriter)
				h := items[slot]
				seq++
				to := -1
				if cut0.Load() && w < 2 {
					to = 0 // these writers' items are written through the cut-off replica only
				}
				wasCut, wasOff := cut0.Load(), redisOff.Load()
				status, _, ok, via := send(to, "PUT", fmt.Sprintf("/items/%d", h.id), fmt.Sprintf(`{"name":"%d-%d"}`, slot, seq))
				if ok && status == 200 {
					h.mu.Lock()
					cut := wasCut || cut0.Load() // during the write, replica 0 may have been cut off
					h.acks = append(h.acks, ack{seq: seq, at: time.Now(), replica: via, phase: current.Load(),
						fromCut0: cut && via == 0, redisOff: wasOff || redisOff.Load()})
					h.mu.Unlock()
				}
				time.Sleep(time.Duration(rand.IntN(3)) * time.Millisecond)
			}
		})
	}
	type stale struct {
		phase   int64
		lag     time.Duration // from the newer write's acknowledgement to the read's start
		allowed bool
		what    string
	}
	var staleMu sync.Mutex
	var stales []stale
	var reads atomic.Int64
	for range readers {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				h := items[rand.IntN(len(items))]
				h.mu.Lock()
				known := h.acks[len(h.acks)-1].seq
				h.mu.Unlock()
				began := time.Now()
				i := rand.IntN(replicas)
				_, body, ok, _ := send(i, "GET", fmt.Sprintf("/items/%d", h.id), "")
				if !ok {
					continue
				}
				reads.Add(1)
				seq, parsed := seqOf(body)
				if !parsed {
					failed.Add(1)
					failures.Store("GET answered "+body, true)
					continue
				}
				if seq >= known {
					continue
				}
				h.mu.Lock()
				k, _ := slices.BinarySearchFunc(h.acks, seq+1, func(a ack, s int64) int { return int(a.seq - s) })
				newer := h.acks[min(k, len(h.acks)-1)]
				h.mu.Unlock()
				lag := began.Sub(newer.at)
				staleMu.Lock()
				stales = append(stales, stale{phase: current.Load(), lag: lag, allowed: (newer.fromCut0 || newer.redisOff) && lag <= outboxBound,
					what: fmt.Sprintf("item %d: read %d (on replica %d), after write %d was acknowledged %v earlier by replica %d in phase %d",
						h.id, seq, i, newer.seq, lag.Round(time.Millisecond), newer.replica, newer.phase)})
				staleMu.Unlock()
			}
		})
	}

	time.Sleep(phase) // 1: healthy
	current.Store(2)
	cut0.Store(true)
	reps[0].proxy.setCut(true)
	time.Sleep(phase)
	killing.Store(1)
	kill(0) // still cut off: what it could not tell Redis is only in the outbox
	cut0.Store(false)
	start(0)
	killing.Store(0)
	current.Store(3)
	time.Sleep(phase / 2)
	killing.Store(2)
	kill(1)
	start(1)
	killing.Store(0)
	time.Sleep(phase / 2)
	current.Store(4)
	// A write while Redis restarts cannot invalidate it either, from any
	// replica; until each replica's breaker lets it try Redis again
	// (REDIS_RETRY_INTERVAL, 300 ms), its writes leave only their outbox row.
	redisOff.Store(true)
	stopRedis() // and an empty one on the same port
	startRedis(t, redisPort)
	time.AfterFunc(time.Second, func() { redisOff.Store(false) })
	time.Sleep(phase)
	close(stop)
	wg.Wait()
	// An empty Redis is not quarantined: no replica bypasses it for a
	// CACHE_TTL (60 s here) because another filled it first.
	for i, r := range reps {
		path := fmt.Sprintf("%s/items/%d", *r.url.Load(), items[0].id)
		waitFor(t, fmt.Sprintf("replica %d to serve from the restarted Redis", i), func() bool {
			return do(t, "GET", path, "").header.Get("X-Cache") == "HIT"
		})
	}

	var forbidden, allowed []stale
	var maxLag time.Duration
	allowedIn := map[int64]int{}
	for _, s := range stales {
		if s.allowed {
			allowed = append(allowed, s)
			allowedIn[s.phase]++
			maxLag = max(maxLag, s.lag)
		} else {
			forbidden = append(forbidden, s)
		}
	}
	t.Logf("3 replicas: %d requests, %d reads; %d stale reads outside the bound; %d within %v of a write by a replica cut off from Redis (phase 2: %d, phase 4: %d; the longest %v after its acknowledgement); %d failed, besides %d in flight on killed replicas",
		requests.Load(), reads.Load(), len(forbidden), len(allowed), outboxBound, allowedIn[2], allowedIn[4], maxLag.Round(time.Millisecond),
		failed.Load(), inFlightOnKilled.Load())
	for i, s := range forbidden {
		if i == 10 {
			break
		}
		t.Errorf("stale read in phase %d: %s", s.phase, s.what)
	}
	if failed.Load() > 0 {
		failures.Range(func(k, _ any) bool {
			t.Errorf("failed: %s", k)
			return true
		})
	}
}

// TestOutboxReachesRedisThroughAnotherReplica: replica A cannot reach
// Redis; B can, and has the item cached. A's PUT and then DELETE of it are
// acknowledged; B must serve each within outboxBound, and from then on
// never the version before it.
func TestOutboxReachesRedisThroughAnotherReplica(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	store := newTestStore(t, cfg, log)
	b := testServer(t, log, store, newTestCache(t, cfg, log))
	cutOff := cfg
	cutOff.RedisHost, cutOff.RedisPort = "127.0.0.1", freePort(t)
	a := serveItems(t, log, newReplica(t, cutOff, log))

	it := createItem(t, b, `{"name":"old"}`)
	path := fmt.Sprintf("/items/%d", it.ID)
	do(t, "GET", b+path, "")
	if res := do(t, "GET", b+path, ""); res.header.Get("X-Cache") != "HIT" {
		t.Fatalf("B: X-Cache %s; want HIT", res.header.Get("X-Cache"))
	}
	// until polls B until ok says its answer is the new one, and returns how
	// long that took after the write's acknowledgement.
	until := func(what string, acked time.Time, ok func(response) bool) time.Duration {
		t.Helper()
		for {
			res := do(t, "GET", b+path, "")
			if ok(res) {
				return time.Since(acked)
			}
			if time.Since(acked) > outboxBound {
				t.Fatalf("B still answers %d %s %s, %v after A acknowledged %s", res.status, res.header.Get("X-Cache"), res.body, outboxBound, what)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	if res := do(t, "PUT", a+path, `{"name":"new"}`); res.status != 200 {
		t.Fatalf("PUT through A: %d %s", res.status, res.body)
	}
	put := until("the PUT", time.Now(), func(res response) bool { return strings.Contains(string(res.body), `"new"`) })
	if res := do(t, "DELETE", a+path, ""); res.status != 204 {
		t.Fatalf("DELETE through A: %d %s", res.status, res.body)
	}
	del := until("the DELETE", time.Now(), func(res response) bool { return res.status == 404 })
	for range 20 {
		if res := do(t, "GET", b+path, ""); res.status != 404 {
			t.Fatalf("B after the DELETE reached it: %d %s", res.status, res.body)
		}
	}
	t.Logf("A's writes reached B's readers through the outbox: the PUT after %v, the DELETE after %v",
		put.Round(time.Millisecond), del.Round(time.Millisecond))
}

// TestOutboxOfAKilledWriter: a write committed with its outbox row by a
// replica that died before it could invalidate Redis (as if killed between
// its COMMIT and its Redis call) leaves Redis holding the old value. A
// replica that starts then must not serve it, not even before its relay's
// first sweep: the cache is held until that sweep has applied the row.
func TestOutboxOfAKilledWriter(t *testing.T) {
	cfg := testConfig(t)
	cfg.OutboxInterval = time.Hour // each relay sweeps once, when it starts
	log := newLogBuffer(t).logger()
	store := newTestStore(t, cfg, log)
	cache := newTestCache(t, cfg, log)
	first := testServer(t, log, store, cache)
	it := createItem(t, first, `{"name":"old"}`)
	path := fmt.Sprintf("/items/%d", it.ID)
	do(t, "GET", first+path, "")
	if res := do(t, "GET", first+path, ""); res.header.Get("X-Cache") != "HIT" {
		t.Fatalf("X-Cache %s; want HIT", res.header.Get("X-Cache"))
	}
	// The dead writer's transaction, as Store.Replace runs it.
	rawSQL(t, cfg, fmt.Sprintf(`UPDATE items SET name = 'new', version = version + 1 WHERE id = %d`, it.ID),
		fmt.Sprintf(`INSERT INTO cache_outbox (item_id, floor) SELECT id, version FROM items WHERE id = %d`, it.ID))
	next := serveItems(t, log, newReplica(t, cfg, log))
	if res := do(t, "GET", next+path, ""); !strings.Contains(string(res.body), `"new"`) {
		t.Fatalf("a replica started after the write: %d %s %s; want the new name", res.status, res.header.Get("X-Cache"), res.body)
	}
	if res := do(t, "GET", first+path, ""); !strings.Contains(string(res.body), `"new"`) {
		t.Fatalf("the first replica after the new one's sweep: %d %s %s; want the new name", res.status, res.header.Get("X-Cache"), res.body)
	}
}

// TestHoldWaitsForLockedOutboxRows: when Redis comes back after an outage,
// a replica must not read it while another replica's relay holds outbox
// rows it has not applied yet (their transaction still open, as when its
// Redis call is slow): a sweep that skipped them has not seen the whole
// outbox. Here the rows' holder is the test, in a transaction.
func TestHoldWaitsForLockedOutboxRows(t *testing.T) {
	cfg := testConfig(t)
	port := freePort(t)
	startRedis(t, port)
	p := newProxy(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	cfg.RedisHost, cfg.RedisPort = "127.0.0.1", p.port()
	log := newLogBuffer(t).logger()
	base, _ := serveWithCache(t, cfg, log)
	it := createItem(t, base, `{"name":"old"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	do(t, "GET", url, "")
	if res := do(t, "GET", url, ""); res.header.Get("X-Cache") != "HIT" {
		t.Fatalf("X-Cache %s; want HIT", res.header.Get("X-Cache"))
	}

	p.setCut(true)
	do(t, "GET", url, "") // the replica finds Redis down
	// Another replica's write, which could not reach Redis either, and its
	// relay, holding the row while Redis is back for this replica.
	rawSQL(t, cfg, fmt.Sprintf(`UPDATE items SET name = 'new', version = version + 1 WHERE id = %d`, it.ID),
		fmt.Sprintf(`INSERT INTO cache_outbox (item_id, floor) SELECT id, version FROM items WHERE id = %d`, it.ID))
	db, err := sql.Open("pgx", cfg.dsn())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	holder, err := db.BeginTx(t.Context(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := holder.Exec("SELECT * FROM cache_outbox FOR UPDATE"); err != nil {
		t.Fatal(err)
	}
	p.setCut(false)
	time.Sleep(cfg.RedisRetry + 50*time.Millisecond)
	for i := range 3 {
		if res := do(t, "GET", url, ""); !strings.Contains(string(res.body), `"new"`) {
			t.Fatalf("GET %d with the outbox row held elsewhere: %d %s %s; want the new name", i, res.status, res.header.Get("X-Cache"), res.body)
		}
	}
	holder.Rollback() // that relay failed: the row is this replica's to apply
	waitFor(t, "a HIT once the row is applied", func() bool {
		res := do(t, "GET", url, "")
		if !strings.Contains(string(res.body), `"new"`) {
			t.Fatalf("after the row was let go: %s %s", res.header.Get("X-Cache"), res.body)
		}
		return res.header.Get("X-Cache") == "HIT"
	})
}

// TestEmptyRestartThenNewReplica: Redis restarts empty; a replica that
// starts then fills it before an older replica notices the restart. The
// older one must not take those fills for data from before the restart
// (and bypass Redis for a CACHE_TTL): the new replica vouched for the empty
// server on its first connection.
func TestEmptyRestartThenNewReplica(t *testing.T) {
	cfg := testConfig(t)
	port := freePort(t)
	stop := startRedis(t, port)
	cfg.RedisHost, cfg.RedisPort = "127.0.0.1", port
	logs := newLogBuffer(t)
	log := logs.logger()
	older, _ := serveWithCache(t, cfg, log)
	it := createItem(t, older, `{"name":"item"}`)
	path := fmt.Sprintf("/items/%d", it.ID)
	do(t, "GET", older+path, "")
	stop()
	startRedis(t, port)
	newer := serveItems(t, log, newReplica(t, cfg, log))
	do(t, "GET", newer+path, "") // a MISS that fills the new server
	waitFor(t, "the older replica to serve from the restarted Redis", func() bool {
		return do(t, "GET", older+path, "").header.Get("X-Cache") == "HIT"
	})
	if n := logs.count("redis restarted with data"); n != 0 {
		t.Errorf(`log lines "redis restarted with data": %d; want 0`, n)
	}
}

// TestNewReplicaAfterRedisReloadedData: Redis restarts and reloads a
// snapshot that holds an item's old value (its tombstone came after the
// snapshot). A replica that starts then, with no run_id of its own to
// compare, must not serve that value: the run_id its deployment last saw,
// reloaded with the snapshot, says Redis restarted.
func TestNewReplicaAfterRedisReloadedData(t *testing.T) {
	cfg := testConfig(t)
	port := freePort(t)
	dir := t.TempDir()
	snapshot := []string{"--dir", dir, "--dbfilename", "items.rdb"}
	stop := startRedis(t, port, snapshot...)
	cfg.RedisHost, cfg.RedisPort = "127.0.0.1", port
	log := newLogBuffer(t).logger()
	first, cache := serveWithCache(t, cfg, log)
	it := createItem(t, first, `{"name":"old"}`)
	path := fmt.Sprintf("/items/%d", it.ID)
	do(t, "GET", first+path, "")
	if err := cache.rdb.Save(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	if res := do(t, "PUT", first+path, `{"name":"new"}`); res.status != 200 {
		t.Fatalf("PUT: %d %s", res.status, res.body)
	}
	// Once the relay has swept the PUT's outbox row, only the restart
	// detection is left to stop the old value.
	waitFor(t, "the outbox to be swept", func() bool {
		var n int
		db, err := sql.Open("pgx", cfg.dsn())
		if err == nil {
			defer db.Close()
			err = db.QueryRowContext(t.Context(), "SELECT count(*) FROM cache_outbox").Scan(&n)
		}
		return err == nil && n == 0
	})
	stop() // SIGKILL: the tombstone is not saved
	startRedis(t, port, snapshot...)
	next := serveItems(t, log, newReplica(t, cfg, log))
	for i := range 3 {
		if res := do(t, "GET", next+path, ""); !strings.Contains(string(res.body), `"new"`) {
			t.Fatalf("GET %d on a replica started after Redis reloaded its snapshot: %s %s; want the new name", i, res.header.Get("X-Cache"), res.body)
		}
	}
}
