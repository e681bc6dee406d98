package main

import (
	"bytes"
	"cmp"
	"database/sql"
	"fmt"
	"maps"
	"net/http"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Metrics are the service's figures for GET /metrics, written in the
// Prometheus text exposition format, version 0.0.4
// (https://prometheus.io/docs/instrumenting/exposition_formats/): the
// requests by route and status, with a latency histogram; the counters of
// Items; both PostgreSQL pools' and the Redis pool's statistics; and a few
// of the Go runtime's. Written by hand from what the service already
// counts, it is this file; prometheus/client_golang v1.25 would add seven
// modules to the binary (protobuf and procfs among them) and a second set
// of counters to keep in step. metrics_test.go parses the output with
// Prometheus's own parser (prometheus/common/expfmt).
type Metrics struct {
	items    *Items
	requests sync.Map // requestKey -> *requestSeries
}

// requestKey is a series of the request metrics: the route pattern that
// matched (as the request log's "route"; "unmatched" for none, since
// Prometheus reads an empty label as no label) and the status.
type requestKey struct {
	route string
	code  int
}

// requestSeries counts a series' requests into latencyBuckets, one count
// per bucket (the exposition's buckets are cumulative: written adds them
// up), the last for slower ones, and their total duration.
type requestSeries struct {
	buckets [len(latencyBuckets) + 1]atomic.Uint64
	sum     atomic.Int64 // ns
}

// latencyBuckets are the histogram's upper bounds: from a cache hit
// (tens of µs of the service's own time, docs/performance.md) to a request
// that waited out DB_QUERY_TIMEOUT (3 s by default) or a slow client.
var latencyBuckets = [...]time.Duration{
	500 * time.Microsecond, time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond,
	250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2500 * time.Millisecond,
	5 * time.Second, 10 * time.Second,
}

func newMetrics(items *Items) *Metrics { return &Metrics{items: items} }

var processStart = time.Now()

// observe counts a request that the route answered with status in d. It
// takes no lock: a series is made once, then only added to.
func (m *Metrics) observe(route string, status int, d time.Duration) {
	if route == "" {
		route = "unmatched"
	}
	k := requestKey{route, status}
	v, ok := m.requests.Load(k)
	if !ok {
		v, _ = m.requests.LoadOrStore(k, new(requestSeries))
	}
	s := v.(*requestSeries)
	i, _ := slices.BinarySearch(latencyBuckets[:], d) // the first bound >= d: bucket "le" counts d <= le
	s.buckets[i].Add(1)
	s.sum.Add(int64(d))
}

// handleMetrics answers GET /metrics.
func handleMetrics(m *Metrics) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		w.Write(m.written())
	})
}

// runtimeMetrics are the Go runtime's figures that /metrics shows, under
// the names prometheus/client_golang gives them; GOMEMLIMIT is there so
// that one can see what the Deployment's downward API set.
var runtimeMetrics = []struct{ name, help, source string }{
	{"go_goroutines", "Goroutines that currently exist.", "/sched/goroutines:goroutines"},
	{"go_memstats_heap_alloc_bytes", "Bytes of allocated heap objects.", "/memory/classes/heap/objects:bytes"},
	{"go_memstats_sys_bytes", "Bytes of memory obtained from the OS.", "/memory/classes/total:bytes"},
	{"go_gc_gomemlimit_bytes", "The Go runtime's soft memory limit (GOMEMLIMIT).", "/gc/gomemlimit:bytes"},
}

// written is the whole exposition, families in a fixed order and series
// sorted, so that two scrapes differ only in their values.
func (m *Metrics) written() []byte {
	var e exposition
	m.writeRequests(&e)
	for _, c := range m.items.counters() {
		name, typ := "items_"+c.name+"_total", "counter"
		if c.gauge {
			name, typ = "items_"+c.name, "gauge"
		}
		e.family(name, typ, c.help)
		e.sample(name, "", float64(c.value.Load()))
	}

	pools := m.items.store.PoolStats()
	for _, f := range []struct {
		name, typ, help string
		value           func(sql.DBStats) float64
	}{
		{"items_postgres_pool_max_connections", "gauge", "The pool's limit on connections (DB_MAX_CONNS for main).", func(p sql.DBStats) float64 { return float64(p.MaxOpenConnections) }},
		{"items_postgres_pool_open_connections", "gauge", "Connections open, in use or idle.", func(p sql.DBStats) float64 { return float64(p.OpenConnections) }},
		{"items_postgres_pool_in_use_connections", "gauge", "Connections running a statement.", func(p sql.DBStats) float64 { return float64(p.InUse) }},
		{"items_postgres_pool_idle_connections", "gauge", "Connections open and idle.", func(p sql.DBStats) float64 { return float64(p.Idle) }},
		{"items_postgres_pool_waits_total", "counter", "Times a statement waited for a connection, the pool being full.", func(p sql.DBStats) float64 { return float64(p.WaitCount) }},
		{"items_postgres_pool_wait_seconds_total", "counter", "Time statements waited for a connection.", func(p sql.DBStats) float64 { return p.WaitDuration.Seconds() }},
	} {
		e.family(f.name, f.typ, f.help+` By pool: "main", or "fresh" for second tries.`)
		for _, p := range slices.Sorted(maps.Keys(pools)) {
			e.sample(f.name, "pool="+quote(p), f.value(pools[p]))
		}
	}

	rp := m.items.cache.PoolStats()
	for _, f := range []struct {
		name, typ, help string
		value           uint32
	}{
		{"items_redis_pool_connections", "gauge", "Connections open to Redis, in use or idle.", rp.TotalConns},
		{"items_redis_pool_idle_connections", "gauge", "Connections to Redis open and idle.", rp.IdleConns},
		{"items_redis_pool_hits_total", "counter", "Times a command found an idle connection.", rp.Hits},
		{"items_redis_pool_misses_total", "counter", "Times a command found no idle connection and made one.", rp.Misses},
		{"items_redis_pool_timeouts_total", "counter", "Times a command waited for a connection longer than REDIS_TIMEOUT.", rp.Timeouts},
	} {
		e.family(f.name, f.typ, f.help)
		e.sample(f.name, "", float64(f.value))
	}

	samples := make([]metrics.Sample, len(runtimeMetrics))
	for i, rm := range runtimeMetrics {
		samples[i].Name = rm.source
	}
	metrics.Read(samples)
	for i, rm := range runtimeMetrics {
		e.family(rm.name, "gauge", rm.help)
		e.sample(rm.name, "", float64(samples[i].Value.Uint64()))
	}
	// The process's CPU and memory are the container runtime's figures
	// (the kubelet's cAdvisor); its start tells a restart.
	e.family("process_start_time_seconds", "gauge", "When the process started, in seconds since the Unix epoch.")
	e.sample("process_start_time_seconds", "", float64(processStart.UnixMilli())/1000)
	return e.Bytes()
}

// writeRequests writes the request counts and the latency histogram.
func (m *Metrics) writeRequests(e *exposition) {
	type series struct {
		requestKey
		*requestSeries
	}
	var all []series
	m.requests.Range(func(k, v any) bool {
		all = append(all, series{k.(requestKey), v.(*requestSeries)})
		return true
	})
	slices.SortFunc(all, func(a, b series) int {
		return cmp.Or(strings.Compare(a.route, b.route), cmp.Compare(a.code, b.code))
	})
	labels := func(s series) string {
		return "route=" + quote(s.route) + ",code=" + quote(strconv.Itoa(s.code))
	}
	// Each series' buckets are read once, for both families, so that its
	// count and its histogram agree.
	counts := make([][len(latencyBuckets) + 1]uint64, len(all))
	e.family("items_http_requests_total", "counter", "HTTP requests answered, by route pattern and status.")
	for i, s := range all {
		var total uint64
		for j := range s.buckets {
			counts[i][j] = s.buckets[j].Load()
			total += counts[i][j]
		}
		e.sample("items_http_requests_total", labels(s), float64(total))
	}
	e.family("items_http_request_duration_seconds", "histogram", "Time from a request's arrival to its answer's end, by route pattern and status.")
	for i, s := range all {
		var cumulative uint64
		for j, n := range counts[i] {
			cumulative += n
			le := "+Inf"
			if j < len(latencyBuckets) {
				le = strconv.FormatFloat(latencyBuckets[j].Seconds(), 'g', -1, 64)
			}
			e.sample("items_http_request_duration_seconds_bucket", labels(s)+",le="+quote(le), float64(cumulative))
		}
		e.sample("items_http_request_duration_seconds_sum", labels(s), time.Duration(s.sum.Load()).Seconds())
		e.sample("items_http_request_duration_seconds_count", labels(s), float64(cumulative))
	}
}

// exposition is text in the exposition format being written.
type exposition struct{ bytes.Buffer }

func (e *exposition) family(name, typ, help string) {
	fmt.Fprintf(e, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
}

func (e *exposition) sample(name, labels string, v float64) {
	e.WriteString(name)
	if labels != "" {
		e.WriteString("{" + labels + "}")
	}
	e.WriteString(" " + strconv.FormatFloat(v, 'f', -1, 64) + "\n")
}

// quote is a label value as the format writes it: in double quotes, with
// backslash, double quote and line feed escaped.
func quote(s string) string {
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s) + `"`
}
