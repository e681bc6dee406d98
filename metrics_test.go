package main

import (
	"bytes"
	"fmt"
	"math"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrape gets base's /metrics and parses it with Prometheus's own text
// parser, which refuses a malformed line, a family declared twice, or
// samples of a family apart.
func scrape(t *testing.T, base string) map[string]*dto.MetricFamily {
	t.Helper()
	res := do(t, "GET", base+"/metrics", "")
	if res.status != 200 {
		t.Fatalf("GET /metrics: %d %s", res.status, res.body)
	}
	if ct, want := res.header.Get("Content-Type"), "text/plain; version=0.0.4; charset=utf-8"; ct != want {
		t.Fatalf("Content-Type %q, want %q", ct, want)
	}
	return parseMetrics(t, res.body)
}

func parseMetrics(t *testing.T, text []byte) map[string]*dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(model.LegacyValidation)
	families, err := p.TextToMetricFamilies(bytes.NewReader(text))
	if err != nil {
		t.Fatalf("Prometheus's parser refused /metrics: %v\n%s", err, text)
	}
	return families
}

// series finds the sample of family name with exactly these labels.
func series(t *testing.T, families map[string]*dto.MetricFamily, name string, labels ...string) *dto.Metric {
	t.Helper()
	f := families[name]
	if f == nil {
		t.Fatalf("no family %s", name)
	}
	want := map[string]string{}
	for i := 0; i < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
next:
	for _, m := range f.Metric {
		if len(m.Label) != len(want) {
			continue
		}
		for _, l := range m.Label {
			if want[l.GetName()] != l.GetValue() {
				continue next
			}
		}
		return m
	}
	t.Fatalf("%s has no series %v", name, want)
	return nil
}

func TestMetrics(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	items := newItems(newTestStore(t, cfg, log), newTestCache(t, cfg, log))
	base := serveItems(t, log, items)

	it := createItem(t, base, `{"name":"scraped"}`)
	path := fmt.Sprintf("%s/items/%d", base, it.ID)
	do(t, "GET", path, "") // MISS
	for range 3 {
		do(t, "GET", path, "") // HIT
	}
	do(t, "GET", base+"/items/999999999", "")
	do(t, "GET", base+"/nowhere", "")

	f := scrape(t, base)
	for name, typ := range map[string]dto.MetricType{
		"items_http_requests_total": dto.MetricType_COUNTER, "items_http_request_duration_seconds": dto.MetricType_HISTOGRAM,
		"items_cache_hits_total": dto.MetricType_COUNTER, "items_waiting_for_item_reads": dto.MetricType_GAUGE,
		"items_postgres_pool_open_connections": dto.MetricType_GAUGE, "items_redis_pool_connections": dto.MetricType_GAUGE,
		"go_gc_gomemlimit_bytes": dto.MetricType_GAUGE, "process_start_time_seconds": dto.MetricType_GAUGE,
	} {
		if f[name] == nil || f[name].GetType() != typ {
			t.Errorf("family %s: %v, want a %v", name, f[name], typ)
		}
	}
	for _, c := range []struct {
		route, code string
		n           float64
	}{{"GET /items/{id}", "200", 4}, {"GET /items/{id}", "404", 1}, {"POST /items", "201", 1}, {"unmatched", "404", 1}} {
		if got := series(t, f, "items_http_requests_total", "route", c.route, "code", c.code).GetCounter().GetValue(); got != c.n {
			t.Errorf("requests %s %s: %v, want %v", c.route, c.code, got, c.n)
		}
		h := series(t, f, "items_http_request_duration_seconds", "route", c.route, "code", c.code).GetHistogram()
		if float64(h.GetSampleCount()) != c.n || h.GetSampleSum() <= 0 {
			t.Errorf("histogram %s %s: count %d sum %v, want %v requests", c.route, c.code, h.GetSampleCount(), h.GetSampleSum(), c.n)
		}
		// The parser takes +Inf as the count: the buckets before it
		// must rise to it.
		var prev uint64
		for _, b := range h.Bucket {
			if b.GetCumulativeCount() < prev || b.GetCumulativeCount() > h.GetSampleCount() {
				t.Errorf("histogram %s %s: bucket le=%v holds %d after %d, of %d", c.route, c.code, b.GetUpperBound(), b.GetCumulativeCount(), prev, h.GetSampleCount())
			}
			prev = b.GetCumulativeCount()
		}
	}
	// Two misses: the first read, and the one of no such item.
	for name, want := range map[string]float64{"items_cache_hits_total": 3, "items_cache_misses_total": 2} {
		if got := series(t, f, name).GetCounter().GetValue(); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if open := series(t, f, "items_postgres_pool_open_connections", "pool", "main").GetGauge().GetValue(); open < 1 {
		t.Errorf("main pool: %v connections open after requests", open)
	}
	if limit := series(t, f, "go_gc_gomemlimit_bytes").GetGauge().GetValue(); limit <= 0 {
		t.Errorf("GOMEMLIMIT reads %v", limit)
	}
	// The scrape itself is counted, after it is answered.
	if n := series(t, scrape(t, base), "items_http_requests_total", "route", "GET /metrics", "code", "200").GetCounter().GetValue(); n != 1 {
		t.Errorf("GET /metrics counted %v times after one scrape", n)
	}
}

// TestMetricsBuckets puts requests of known durations in the histogram and
// reads them back, with a route whose label value needs every escape.
func TestMetricsBuckets(t *testing.T) {
	m := newMetrics(nil)
	route := "GET /a\"b\\c\nd"
	for _, d := range []time.Duration{0, 500 * time.Microsecond, 501 * time.Microsecond, 3 * time.Millisecond, 10 * time.Second, time.Minute} {
		m.observe(route, 200, d)
	}
	var b exposition
	m.writeRequests(&b)
	f := parseMetrics(t, b.Bytes())
	h := series(t, f, "items_http_request_duration_seconds", "route", route, "code", "200").GetHistogram()
	want := map[float64]uint64{0.0005: 2, 0.001: 3, 0.0025: 3, 0.005: 4, 5: 4, 10: 5, math.Inf(1): 6}
	for _, bucket := range h.Bucket {
		if n, ok := want[bucket.GetUpperBound()]; ok && bucket.GetCumulativeCount() != n {
			t.Errorf("bucket le=%v: %d, want %d", bucket.GetUpperBound(), bucket.GetCumulativeCount(), n)
		}
	}
	if h.GetSampleCount() != 6 || math.Abs(h.GetSampleSum()-70.004001) > 1e-9 {
		t.Errorf("count %d sum %v, want 6 and 70.004001", h.GetSampleCount(), h.GetSampleSum())
	}
}

// TestMetricsWhileServing scrapes while requests are being counted: every
// scrape must parse, and counts never go down (run with -race).
func TestMetricsWhileServing(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	base := serveItems(t, log, newItems(newTestStore(t, cfg, log), newTestCache(t, cfg, log)))
	it := createItem(t, base, `{"name":"busy"}`)
	stop := make(chan struct{})
	wait := loadClients(4, stop, func(w, n int) bool {
		do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "")
		return true
	})
	var last float64
	for range 20 {
		var got float64
		if f := scrape(t, base)["items_http_requests_total"]; f != nil {
			for _, m := range f.Metric {
				if m.Label[0].GetValue() == "GET /items/{id}" && m.Label[1].GetValue() == "200" {
					got = m.GetCounter().GetValue()
				}
			}
		}
		if got < last {
			t.Errorf("count went down: %v after %v", got, last)
		}
		last = got
	}
	close(stop)
	wait()
	if final := series(t, scrape(t, base), "items_http_requests_total", "route", "GET /items/{id}", "code", "200").GetCounter().GetValue(); final < last || final == 0 {
		t.Errorf("%v requests counted at the end, %v while serving", final, last)
	}
}
