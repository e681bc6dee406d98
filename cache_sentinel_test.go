package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// sentinelSetup is a private Redis master, one replica of it and three
// Sentinels watching them, all on 127.0.0.1, as startSentinels leaves them.
type sentinelSetup struct {
	name             string // the master's name in the Sentinels (REDIS_MASTER_NAME)
	password         string // the Redis servers' requirepass and masterauth; "" for none
	sentinelPassword string // the Sentinels' requirepass; "" for none
	masterPort       int
	replicaPort      int
	stopMaster       func() // SIGKILLs the master
	sentinelAddrs    []string
	logs             []string // the Sentinels' log files
}

// addrs is the Sentinels' addresses as REDIS_SENTINEL_ADDRS takes them.
func (s *sentinelSetup) addrs() string { return strings.Join(s.sentinelAddrs, ",") }

// sentinel is a client of the i-th Sentinel; it is closed when the test ends.
func (s *sentinelSetup) sentinel(t *testing.T, i int) *redis.SentinelClient {
	t.Helper()
	c := redis.NewSentinelClient(&redis.Options{Addr: s.sentinelAddrs[i], Password: s.sentinelPassword,
		DialTimeout: time.Second, ReadTimeout: time.Second, MaxRetries: -1})
	t.Cleanup(func() { c.Close() })
	return c
}

// server is a client of the Redis server on port; it is closed when the test ends.
func (s *sentinelSetup) server(t *testing.T, port int) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), Password: s.password,
		DialTimeout: time.Second, ReadTimeout: time.Second, MaxRetries: -1})
	t.Cleanup(func() { c.Close() })
	return c
}

// startSentinels starts, on free ports, a Redis master, a replica of it
// (--replicaof) and three redis-sentinel processes monitoring the master
// with a quorum of 2, a down-after of 1 s and a failover timeout of 5 s.
// password, if not "", is the servers' requirepass and masterauth, which the
// Sentinels are given (sentinel auth-pass); sentinelPassword, if not "", is
// the Sentinels' own requirepass. Everything is killed when the test ends.
// It returns once the replica is in sync and every Sentinel names the
// master, knows the replica and the other two Sentinels, and can reach a
// quorum (SENTINEL CKQUORUM). Without redis-sentinel it skips the test, or
// fails it if the CI variable is set, as startRedis does.
func startSentinels(t *testing.T, password, sentinelPassword string) *sentinelSetup {
	t.Helper()
	bin, err := exec.LookPath("redis-sentinel")
	if err != nil {
		needTool(t, "redis-sentinel", "redis-sentinel")
	}
	s := &sentinelSetup{name: "items-" + randomHex(t)[:6], password: password, sentinelPassword: sentinelPassword,
		masterPort: freePort(t), replicaPort: freePort(t)}
	var auth []string
	if password != "" {
		auth = []string{"--requirepass", password, "--masterauth", password}
	}
	// --dir: a replica writes the RDB it syncs from; keep it out of the package.
	s.stopMaster = startRedis(t, s.masterPort, append([]string{"--dir", t.TempDir()}, auth...)...)
	startRedis(t, s.replicaPort, append([]string{"--dir", t.TempDir(),
		"--replicaof", "127.0.0.1", strconv.Itoa(s.masterPort)}, auth...)...)
	replica := s.server(t, s.replicaPort)
	waitUntil(t, 10*time.Second, "the replica to sync with the master", func() (bool, string) {
		info, err := replica.Info(t.Context(), "replication").Result()
		return err == nil && strings.Contains(info, "master_link_status:up"), fmt.Sprint(info, err)
	})

	for range 3 {
		port := freePort(t)
		dir := t.TempDir()
		conf := []string{
			"port " + strconv.Itoa(port),
			"bind 127.0.0.1",
			"protected-mode no",
			"dir " + dir,
			"logfile " + filepath.Join(dir, "sentinel.log"),
			fmt.Sprintf("sentinel monitor %s 127.0.0.1 %d 2", s.name, s.masterPort),
			fmt.Sprintf("sentinel down-after-milliseconds %s 1000", s.name),
			fmt.Sprintf("sentinel failover-timeout %s 5000", s.name),
			fmt.Sprintf("sentinel parallel-syncs %s 1", s.name),
		}
		if password != "" {
			conf = append(conf, fmt.Sprintf("sentinel auth-pass %s %s", s.name, password))
		}
		if sentinelPassword != "" {
			// The Sentinels also use it to talk to each other.
			conf = append(conf, "requirepass "+sentinelPassword)
		}
		file := filepath.Join(dir, "sentinel.conf")
		if err := os.WriteFile(file, []byte(strings.Join(conf, "\n")+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, file)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			cmd.Process.Kill()
			cmd.Wait()
		})
		s.sentinelAddrs = append(s.sentinelAddrs, net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		s.logs = append(s.logs, filepath.Join(dir, "sentinel.log"))
	}
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		for i, f := range s.logs {
			b, _ := os.ReadFile(f)
			t.Logf("log of sentinel %d (%s):\n%s", i, s.sentinelAddrs[i], b)
		}
	})

	master := net.JoinHostPort("127.0.0.1", strconv.Itoa(s.masterPort))
	for i := range s.sentinelAddrs {
		c := s.sentinel(t, i)
		waitUntil(t, 20*time.Second, fmt.Sprintf("sentinel %s to watch the master and its replica", s.sentinelAddrs[i]), func() (bool, string) {
			ctx := t.Context()
			addr, err := c.GetMasterAddrByName(ctx, s.name).Result()
			if err != nil || len(addr) != 2 || net.JoinHostPort(addr[0], addr[1]) != master {
				return false, fmt.Sprintf("get-master-addr-by-name: %v %v; want %s", addr, err, master)
			}
			replicas, err := c.Replicas(ctx, s.name).Result()
			if err != nil || len(replicas) != 1 || replicas[0]["port"] != strconv.Itoa(s.replicaPort) ||
				replicas[0]["flags"] != "slave" || replicas[0]["master-link-status"] != "ok" {
				return false, fmt.Sprintf("replicas: %v %v", replicas, err)
			}
			sentinels, err := c.Sentinels(ctx, s.name).Result()
			if err != nil || len(sentinels) != 2 {
				return false, fmt.Sprintf("other sentinels: %v %v", sentinels, err)
			}
			quorum, err := c.CkQuorum(ctx, s.name).Result()
			return err == nil, fmt.Sprint("ckquorum: ", quorum, err)
		})
	}
	return s
}

// masterNamed is the master that every Sentinel names now, or "" if they
// do not all agree (or one does not answer).
func (s *sentinelSetup) masterNamed(ctx context.Context, sentinels []*redis.SentinelClient) string {
	named := ""
	for i, c := range sentinels {
		addr, err := c.GetMasterAddrByName(ctx, s.name).Result()
		if err != nil || len(addr) != 2 {
			return ""
		}
		a := net.JoinHostPort(addr[0], addr[1])
		if i > 0 && a != named {
			return ""
		}
		named = a
	}
	return named
}

// waitUntil polls cond every 20 ms for up to d; on timeout it fails the
// test with what cond said last.
func waitUntil(t *testing.T, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s; last: %s", d, what, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSentinelFailover runs the service against a master, its replica and
// three Sentinels, with passwords on both the servers and the Sentinels,
// and SIGKILLs the master under a load of writers and readers. The Sentinels
// promote the replica; the service must follow them: no request fails, no
// read is older than a write acknowledged before it began, and reads are
// HIT again, filled on the promoted server, whose script cache is empty (so
// fills go EVALSHA, NOSCRIPT, EVAL), within the quarantine of a server that
// restarted with data (CACHE_TTL + REDIS_RETRY_INTERVAL) after the failover.
func TestSentinelFailover(t *testing.T) {
	const writers, readOnly, readers = 4, 4, 8
	cfg := testConfig(t)
	cfg.CacheTTL = 2 * time.Second
	s := startSentinels(t, "redis-secret", "sentinel-secret")
	newTestStore(t, cfg, slog.New(slog.DiscardHandler)) // creates and drops the schema
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	base, done := startRun(t, ctx, envFrom(cfg,
		"REDIS_SENTINEL_ADDRS", s.addrs(), "REDIS_MASTER_NAME", s.name,
		"REDIS_PASSWORD", s.password, "REDIS_SENTINEL_PASSWORD", s.sentinelPassword,
		"CACHE_TTL", cfg.CacheTTL.String()))
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
	}()

	// Item k is named "i<k>-<n>" at its n-th write; writer k owns item k,
	// and the last readOnly items are never written.
	ids := make([]int64, writers+readOnly)
	acked := make([]atomic.Int64, len(ids)) // the last n acknowledged
	for k := range ids {
		ids[k] = createItem(t, base, fmt.Sprintf(`{"name":"i%d-0"}`, k)).ID
		url := fmt.Sprintf("%s/items/%d", base, ids[k])
		waitFor(t, "a HIT before the failover", func() bool { return do(t, "GET", url, "").header.Get("X-Cache") == "HIT" })
	}
	replica := s.server(t, s.replicaPort)
	scriptOnReplica, err := replica.ScriptExists(t.Context(), fillScript.Hash()).Result()
	if err != nil {
		t.Fatal(err)
	}
	if scriptOnReplica[0] {
		t.Logf("the replica has the fill script cached already: this run does not exercise NOSCRIPT")
	}

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: writers + readers}}
	defer client.CloseIdleConnections()
	// send makes one request and returns the item's name and X-Cache; any
	// answer but a 2xx with an item is an error.
	send := func(method, url, body string) (name, xcache string, err error) {
		req, err := http.NewRequest(method, url, strings.NewReader(body))
		if err != nil {
			return "", "", err
		}
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		resp, err := client.Do(req)
		if err != nil {
			return "", "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		var it Item
		if err == nil && resp.StatusCode/100 == 2 {
			err = json.Unmarshal(b, &it)
		}
		if err == nil && resp.StatusCode/100 != 2 {
			err = fmt.Errorf("%d %s", resp.StatusCode, b)
		}
		return it.Name, resp.Header.Get("X-Cache"), err
	}
	seqOf := func(k int, name string) (int64, bool) {
		n, ok := strings.CutPrefix(name, fmt.Sprintf("i%d-", k))
		seq, err := strconv.ParseInt(n, 10, 64)
		return seq, ok && err == nil
	}

	var requests, failed, reads, bypassed, bypassedBefore, stale atomic.Int64
	var killed atomic.Int64   // when the master was dead, Unix ns; 0 before
	var firstHit atomic.Int64 // when a read begun after that was first a HIT, Unix ns
	var failMu sync.Mutex
	var failures []string
	fail := func(format string, args ...any) {
		failMu.Lock()
		defer failMu.Unlock()
		if len(failures) < 20 {
			failures = append(failures, fmt.Sprintf(format, args...))
		}
	}
	load, stopLoad := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	defer func() {
		stopLoad()
		wg.Wait()
	}()
	for w := range writers {
		wg.Go(func() {
			url := fmt.Sprintf("%s/items/%d", base, ids[w])
			for n := int64(1); load.Err() == nil; n++ {
				requests.Add(1)
				name, _, err := send("PUT", url, fmt.Sprintf(`{"name":"i%d-%d"}`, w, n))
				if got, ok := seqOf(w, name); err != nil || !ok || got != n {
					failed.Add(1)
					fail("writer %d: PUT i%d-%d: got %q, %v", w, w, n, name, err)
					continue
				}
				acked[w].Store(n)
			}
		})
	}
	for r := range readers {
		wg.Go(func() {
			for n := 0; load.Err() == nil; n++ {
				k := (r + n) % len(ids)
				before := acked[k].Load()
				began := time.Now().UnixNano()
				requests.Add(1)
				reads.Add(1)
				name, xcache, err := send("GET", fmt.Sprintf("%s/items/%d", base, ids[k]), "")
				seq, ok := seqOf(k, name)
				switch {
				case err != nil || !ok:
					failed.Add(1)
					fail("reader %d: GET item %d: got %q, %v", r, ids[k], name, err)
				case seq < before:
					stale.Add(1)
					fail("stale read: item %d had write %d acknowledged, then GET answered %s %q", ids[k], before, xcache, name)
				}
				switch xcache {
				case "BYPASS":
					bypassed.Add(1)
					if killed.Load() == 0 {
						bypassedBefore.Add(1)
					}
				case "HIT":
					if at := killed.Load(); at != 0 && began > at {
						firstHit.CompareAndSwap(0, time.Now().UnixNano())
					}
				}
			}
		})
	}

	time.Sleep(500 * time.Millisecond) // under load before the fault
	sentinels := []*redis.SentinelClient{s.sentinel(t, 0), s.sentinel(t, 1), s.sentinel(t, 2)}
	promoted := net.JoinHostPort("127.0.0.1", strconv.Itoa(s.replicaPort))
	kill := time.Now()
	s.stopMaster()
	killed.Store(time.Now().UnixNano())
	waitUntil(t, 30*time.Second, "the sentinels to name the replica master", func() (bool, string) {
		named := s.masterNamed(t.Context(), sentinels)
		return named == promoted, named
	})
	newMaster := time.Since(kill)
	// A promoted replica holds the old master's keys under a new run_id:
	// onConnect quarantines it for CACHE_TTL + REDIS_RETRY_INTERVAL.
	bound := cfg.CacheTTL + cfg.RedisRetry + 3*time.Second
	for deadline := time.Now().Add(bound); firstHit.Load() == 0 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	hitBack := time.Duration(firstHit.Load() - kill.UnixNano())
	time.Sleep(time.Second) // and under load on the new master for a while
	stopLoad()
	wg.Wait()

	back := "never back (no HIT)"
	if firstHit.Load() != 0 {
		back = fmt.Sprintf("back (HIT) after %d ms", hitBack.Milliseconds())
	}
	t.Logf("failover: new master after %d ms; cache %s; %d reads bypassed (%d before the kill); %d failed of %d requests; %d stale of %d reads",
		newMaster.Milliseconds(), back, bypassed.Load(), bypassedBefore.Load(), failed.Load(), requests.Load(), stale.Load(), reads.Load())
	for _, f := range failures {
		t.Error(f)
	}
	if failed.Load() != 0 || stale.Load() != 0 {
		t.Errorf("failed requests: %d, stale reads: %d; want 0 and 0", failed.Load(), stale.Load())
	}
	if firstHit.Load() == 0 {
		t.Errorf("no read was a HIT within %v of the sentinels naming the new master; want one", bound)
	} else if exists, err := replica.ScriptExists(t.Context(), fillScript.Hash()).Result(); err != nil || !exists[0] {
		t.Errorf("fill script on the promoted server after HITs: %v %v; want it loaded by EVAL after NOSCRIPT", exists, err)
	}
}

// TestSentinelWrongMasterName: Sentinels that answer but monitor no master
// of that name leave the cache bypassed (not every read a MISS), and
// /ready says to check REDIS_MASTER_NAME.
func TestSentinelWrongMasterName(t *testing.T) {
	cfg := testConfig(t)
	s := startSentinels(t, "redis-secret", "sentinel-secret")
	cfg.RedisSentinelAddrs, cfg.RedisMasterName = s.addrs(), "no-such-master"
	cfg.RedisPassword, cfg.RedisSentinelPassword = s.password, s.sentinelPassword
	log := newLogBuffer(t).logger()
	base, _ := serveWithCache(t, cfg, log)
	it := createItem(t, base, `{"name":"x"}`)
	for i := range 3 {
		if res := do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), ""); res.status != 200 || res.header.Get("X-Cache") != "BYPASS" {
			t.Errorf("GET %d: %d %s; want 200 BYPASS", i, res.status, res.header.Get("X-Cache"))
		}
	}
	var ready readiness
	res := do(t, "GET", base+"/ready", "")
	if json.Unmarshal(res.body, &ready) != nil || ready.Redis != "down" || !strings.Contains(ready.RedisError, "REDIS_MASTER_NAME") {
		t.Errorf("/ready: %s; want redis down, naming REDIS_MASTER_NAME", res.body)
	}
}
