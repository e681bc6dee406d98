package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// Tests of conditional requests (RFC 9110 section 13): ETag on every
// answer that carries an item, 304 for If-None-Match, 412 for If-Match,
// and 428 under REQUIRE_IF_MATCH.

// TestETagsAndNotModified reads an item as it changes, through a HIT, a
// MISS and a BYPASS, with and without If-None-Match.
func TestETagsAndNotModified(t *testing.T) {
	cfg := testConfig(t)
	log := slog.New(slog.DiscardHandler)
	store := newTestStore(t, cfg, log)
	base := testServer(t, log, store, newTestCache(t, cfg, log))
	noRedis := cfg
	noRedis.RedisPort = freePort(t) // nothing listens: every read is a BYPASS
	bypass, _ := serveWithCache(t, noRedis, log)

	created := do(t, "POST", base+"/items", `{"name":"Widget"}`)
	if created.status != 201 || created.header.Get("ETag") != `"1"` {
		t.Fatalf("POST: %d ETag %q; want 201 with ETag \"1\"", created.status, created.header.Get("ETag"))
	}
	url := base + created.header.Get("Location")
	path := created.header.Get("Location")
	updated := do(t, "PUT", url, `{"name":"Widget","description":"v2"}`)
	if updated.status != 200 || updated.header.Get("ETag") != `"2"` {
		t.Fatalf("PUT: %d ETag %q; want 200 with ETag \"2\"", updated.status, updated.header.Get("ETag"))
	}
	patched := do(t, "PATCH", url, `{"description":"v3"}`)
	if patched.status != 200 || patched.header.Get("ETag") != `"3"` {
		t.Fatalf("PATCH: %d ETag %q; want 200 with ETag \"3\"", patched.status, patched.header.Get("ETag"))
	}
	full := string(patched.body)

	for _, c := range []struct {
		name, base, method, ifNoneMatch string
		status                          int
		cache                           string
	}{
		{"no header, a MISS", base, "GET", "", 200, "MISS"},
		{"no header, a HIT", base, "GET", "", 200, "HIT"},
		{"the current tag on a HIT", base, "GET", `"3"`, 304, "HIT"},
		{"a weak tag matches (weak comparison)", base, "GET", `W/"3"`, 304, "HIT"},
		{"*", base, "GET", `*`, 304, "HIT"},
		{"a list holding it", base, "GET", ` "1" , ,"x",W/"3"`, 304, "HIT"},
		{"an older tag", base, "GET", `"2"`, 200, "HIT"},
		{"a tag that is not a version", base, "GET", `"03"`, 200, "HIT"},
		{"HEAD", base, "HEAD", `"3"`, 304, "HIT"},
		{"from PostgreSQL (BYPASS)", bypass, "GET", `"3"`, 304, "BYPASS"},
		{"older, from PostgreSQL", bypass, "GET", `"1", "2"`, 200, "BYPASS"},
		{"an empty list", base, "GET", `, ,`, 200, "HIT"},
	} {
		var headers []string
		if c.ifNoneMatch != "" {
			headers = []string{"If-None-Match", c.ifNoneMatch}
		}
		res := do(t, c.method, c.base+path, "", headers...)
		if res.status != c.status || res.header.Get("X-Cache") != c.cache || res.header.Get("ETag") != `"3"` {
			t.Errorf("%s: got %d X-Cache %q ETag %q; want %d %s \"3\"", c.name, res.status, res.header.Get("X-Cache"), res.header.Get("ETag"), c.status, c.cache)
		}
		wantBody := full
		if c.status == 304 || c.method == "HEAD" {
			wantBody = ""
		}
		if string(res.body) != wantBody {
			t.Errorf("%s: body %q; want %q", c.name, res.body, wantBody)
		}
	}

	// If-Match on a GET (strong comparison), before If-None-Match.
	for _, c := range []struct {
		ifMatch, ifNoneMatch string
		status               int
	}{
		{`"3"`, "", 200}, {`*`, "", 200}, {`"2", "3"`, "", 200}, {`"2"`, "", 412}, {`W/"3"`, "", 412},
		{`"3"`, `"3"`, 304}, {`"2"`, `"3"`, 412}, {`3`, "", 400},
	} {
		headers := []string{"If-Match", c.ifMatch}
		if c.ifNoneMatch != "" {
			headers = append(headers, "If-None-Match", c.ifNoneMatch)
		}
		if res := do(t, "GET", url, "", headers...); res.status != c.status || res.status != 400 && res.header.Get("ETag") != `"3"` {
			t.Errorf("GET If-Match %s If-None-Match %s: got %d ETag %q; want %d with ETag \"3\"", c.ifMatch, c.ifNoneMatch, res.status, res.header.Get("ETag"), c.status)
		}
	}

	// A write makes the old tag stale: 200 with the new one, from PostgreSQL.
	do(t, "PATCH", url, `{"name":"Widget 4"}`)
	res := do(t, "GET", url, "", "If-None-Match", `"3"`)
	if res.status != 200 || res.header.Get("ETag") != `"4"` || res.header.Get("X-Cache") != "MISS" || !strings.Contains(string(res.body), "Widget 4") {
		t.Errorf("after a write, If-None-Match \"3\": %d %s %q %s; want 200 MISS \"4\" with the new body", res.status, res.header.Get("X-Cache"), res.header.Get("ETag"), res.body)
	}

	for _, bad := range []string{`3`, `"3`, `"3" "4"`, `W/3`, `w/"3"`, `*, "3"`, `"a b"`, `"3"x`} {
		res := do(t, "GET", url, "", "If-None-Match", bad)
		if res.status != 400 || !strings.Contains(errorMessage(t, res), "If-None-Match") {
			t.Errorf("If-None-Match %q: got %d %s; want 400 naming the header", bad, res.status, res.body)
		}
	}
	if res := do(t, "GET", base+"/items/999999", "", "If-None-Match", "*"); res.status != 404 || res.header.Get("ETag") != "" {
		t.Errorf("a missing item with If-None-Match *: %d ETag %q; want 404 without an ETag", res.status, res.header.Get("ETag"))
	}
	if res := do(t, "GET", base+"/items", ""); res.status != 200 || res.header.Get("ETag") != "" {
		t.Errorf("GET /items: %d ETag %q; want 200 without an ETag (a page has none)", res.status, res.header.Get("ETag"))
	}
}

// TestIfMatch makes conditional writes of one item: each changes it only
// if If-Match names its version (strong comparison), and otherwise answers
// 412 with the current ETag and changes nothing, in PostgreSQL or Redis.
func TestIfMatch(t *testing.T) {
	cfg := testConfig(t)
	log := slog.New(slog.DiscardHandler)
	base := testServer(t, log, newTestStore(t, cfg, log), newTestCache(t, cfg, log))
	it := createItem(t, base, `{"name":"a"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)

	for _, c := range []struct {
		method, ifMatch, body string
		status                int
		etag                  string // the ETag of the answer
	}{
		{"PUT", `"1"`, `{"name":"b"}`, 200, `"2"`},
		{"PUT", `"1"`, `{"name":"lost update"}`, 412, `"2"`},
		{"PATCH", `W/"2"`, `{"name":"weak"}`, 412, `"2"`},
		{"PATCH", `"02"`, `{"name":"not a tag of ours"}`, 412, `"2"`},
		{"PATCH", `"7", "2"`, `{"name":"c"}`, 200, `"3"`},
		{"PUT", `*`, `{"name":"d"}`, 200, `"4"`},
		{"DELETE", `"3"`, ``, 412, `"4"`},
		{"PUT", ``, `{"name":"e"}`, 200, `"5"`}, // no If-Match: the last writer wins
	} {
		var headers []string
		if c.ifMatch != "" {
			headers = []string{"If-Match", c.ifMatch}
		}
		before := do(t, "GET", url, "") // cached now
		res := do(t, c.method, url, c.body, headers...)
		if res.status != c.status || res.header.Get("ETag") != c.etag {
			t.Fatalf("%s If-Match %s: got %d ETag %q %s; want %d with ETag %s", c.method, c.ifMatch, res.status, res.header.Get("ETag"), res.body, c.status, c.etag)
		}
		if c.status != 412 {
			continue
		}
		want := "changed since it was read"
		if strings.HasPrefix(c.ifMatch, "W/") {
			want = "only by a weak tag"
		}
		if msg := errorMessage(t, res); !strings.Contains(msg, want) || !strings.Contains(msg, c.etag) {
			t.Errorf("412 message %q; want it to say %q, with the ETag %s", msg, want, c.etag)
		}
		after := do(t, "GET", url, "")
		if after.header.Get("X-Cache") != "HIT" || string(after.body) != string(before.body) {
			t.Errorf("after a 412: GET %s %s; want the item unchanged and still cached: HIT %s", after.header.Get("X-Cache"), after.body, before.body)
		}
	}

	for _, bad := range []string{`2`, `"5`, `W/`, `"5",,"6" x`, `**`} {
		res := do(t, "PUT", url, `{"name":"bad header"}`, "If-Match", bad)
		if res.status != 400 || !strings.Contains(errorMessage(t, res), "If-Match") {
			t.Errorf("If-Match %q: got %d %s; want 400 naming the header", bad, res.status, res.body)
		}
	}
	if res := do(t, "PUT", url, `{"name":"x"}`, "If-None-Match", "*"); res.status != 400 {
		t.Errorf("PUT with If-None-Match: got %d %s; want 400 (GET only)", res.status, res.body)
	}
	if res := do(t, "PUT", base+"/items/999999", `{"name":"x"}`, "If-Match", `"1"`); res.status != 404 {
		t.Errorf("If-Match on a missing item: got %d %s; want 404", res.status, res.body)
	}
	if res := do(t, "GET", url, ""); !strings.Contains(string(res.body), `"e"`) || res.header.Get("ETag") != `"5"` {
		t.Fatalf("after the rejected writes: %s ETag %q; want item \"e\" at \"5\"", res.body, res.header.Get("ETag"))
	}
	if res := do(t, "DELETE", url, "", "If-Match", `"5"`); res.status != 204 {
		t.Errorf("DELETE If-Match \"5\": got %d %s; want 204", res.status, res.body)
	}
	if res := do(t, "GET", url, ""); res.status != 404 {
		t.Errorf("after the conditional DELETE: GET %d; want 404", res.status)
	}
}

// TestRequireIfMatch: under REQUIRE_IF_MATCH=true a write without If-Match
// is 428 and changes nothing; reads and creates are as ever.
func TestRequireIfMatch(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	newTestStore(t, cfg, log)
	newTestCache(t, cfg, log)
	base, _ := startRun(t, t.Context(), envFrom(cfg, "REQUIRE_IF_MATCH", "true"))
	it := createItem(t, base, `{"name":"a"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)
	for _, method := range []string{"PUT", "PATCH", "DELETE"} {
		res := do(t, method, url, `{"name":"unconditional"}`)
		if res.status != 428 || !strings.Contains(errorMessage(t, res), "If-Match") {
			t.Errorf("%s without If-Match: got %d %s; want 428 asking for If-Match", method, res.status, res.body)
		}
	}
	if res := do(t, "GET", url, ""); res.status != 200 || strings.Contains(string(res.body), "unconditional") {
		t.Errorf("after the 428s: %d %s; want the item unchanged", res.status, res.body)
	}
	if res := do(t, "PATCH", url, `{"name":"b"}`, "If-Match", `"1"`); res.status != 200 {
		t.Errorf("PATCH with If-Match: got %d %s; want 200", res.status, res.body)
	}
	if res := do(t, "DELETE", url, "", "If-Match", "*"); res.status != 204 {
		t.Errorf("DELETE with If-Match *: got %d %s; want 204", res.status, res.body)
	}
}

// TestConcurrentIfMatch sends, round after round, one PUT from each of
// many clients, spread over two replicas, all with If-Match naming the
// item's version of that round: exactly one may succeed.
func TestConcurrentIfMatch(t *testing.T) {
	cfg := testConfig(t)
	log := slog.New(slog.DiscardHandler)
	store := newTestStore(t, cfg, log)
	cache := newTestCache(t, cfg, log)
	replicas := []string{testServer(t, log, store, cache), serveItems(t, log, newReplica(t, cfg, log))}
	it := createItem(t, replicas[0], `{"name":"start"}`)
	const clients, rounds = 16, 25
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}, Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	var wins, lost, other int
	for round := range rounds {
		version := int64(round + 1)
		statuses := make([]int, clients)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for c := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				body := fmt.Sprintf(`{"name":"round %d by %d"}`, round, c)
				req, _ := http.NewRequest("PUT", fmt.Sprintf("%s/items/%d", replicas[c%2], it.ID), strings.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("If-Match", etag(version))
				<-start
				resp, err := client.Do(req)
				if err != nil {
					t.Errorf("PUT: %v", err)
					return
				}
				resp.Body.Close()
				statuses[c] = resp.StatusCode
			}()
		}
		close(start)
		wg.Wait()
		won := 0
		for _, s := range statuses {
			switch s {
			case 200:
				won++
			case 412:
				lost++
			default:
				other++
			}
		}
		wins += won
		if won != 1 {
			t.Errorf("round %d: %d of %d PUTs with If-Match %s succeeded (statuses %v); want exactly 1", round, won, clients, etag(version), statuses)
		}
		res := do(t, "GET", fmt.Sprintf("%s/items/%d", replicas[round%2], it.ID), "")
		var got Item
		json.Unmarshal(res.body, &got)
		if res.header.Get("ETag") != etag(version+1) || !strings.HasPrefix(got.Name, fmt.Sprintf("round %d by ", round)) {
			t.Errorf("round %d: the item is %s at %s; want a write of this round at %s", round, res.body, res.header.Get("ETag"), etag(version+1))
		}
	}
	if other > 0 {
		t.Errorf("%d answers other than 200 and 412", other)
	}
	t.Logf("%d rounds of %d concurrent PUTs with the same If-Match over 2 replicas: %d succeeded (one a round), %d got 412, %d other",
		rounds, clients, wins, lost, other)
}

// FuzzConditionalHeaders sends what the fuzzer makes up as If-None-Match
// on a GET and as If-Match on a PUT of a real item, straight to the
// handler (so that bytes Go's client would refuse to send get through),
// and as Idempotency-Key on a POST: never a 5xx or a panic, and a parse
// that succeeds must read back the same tags when they are written out
// again.
func FuzzConditionalHeaders(f *testing.F) {
	for _, seed := range []string{`"1"`, `W/"1"`, `*`, `"1", W/"2" ,, "x"`, `"`, `W/`, `"a"b`, "\"\x80\xff\"", `**`, ` , `, strings.Repeat(`"9",`, 50)} {
		f.Add(seed)
	}
	cfg := testConfig(f)
	log := slog.New(slog.DiscardHandler)
	store := newTestStore(f, cfg, log)
	h := newServer(Config{}, log, newItems(store, newTestCache(f, cfg, log)))
	it, err := store.Create(f.Context(), Item{Name: "fuzzed"})
	if err != nil {
		f.Fatal(err)
	}
	path := fmt.Sprintf("/items/%d", it.ID)
	f.Fuzz(func(t *testing.T, field string) {
		tags, present, err := parseETags(http.Header{"If-Match": {field}}, "If-Match")
		var ae *apiError
		switch {
		case !present:
			t.Fatalf("parseETags(%q): not present", field)
		case err != nil && (!errors.As(err, &ae) || ae.Status != 400):
			t.Fatalf("parseETags(%q): %v; want a 400", field, err)
		case err == nil && !tags.any:
			var out []string
			for _, tag := range tags.tags {
				s := `"` + tag.opaque + `"`
				if tag.weak {
					s = "W/" + s
				}
				out = append(out, s)
			}
			again, _, err := parseETags(http.Header{"If-Match": {strings.Join(out, ", ")}}, "If-Match")
			if err != nil || fmt.Sprint(again) != fmt.Sprint(tags) {
				t.Fatalf("parseETags(%q) = %v; written out and parsed again: %v, %v", field, tags, again, err)
			}
		}
		for _, req := range []*http.Request{
			httptest.NewRequest("GET", path, nil),
			httptest.NewRequest("PUT", path, strings.NewReader(`{"name":"fuzzed"}`)),
			httptest.NewRequest("POST", "/items", strings.NewReader(`{"name":"fuzzed key"}`)),
		} {
			req.Header.Set("Content-Type", "application/json")
			req.Header[map[string]string{"GET": "If-None-Match", "PUT": "If-Match", "POST": "Idempotency-Key"}[req.Method]] = []string{field}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code >= 500 {
				t.Fatalf("%s with %q: %d %s; want no 5xx", req.Method, field, rec.Code, rec.Body)
			}
			if rec.Code >= 400 && !json.Valid(rec.Body.Bytes()) {
				t.Fatalf("%s with %q: %d %q; want a JSON error", req.Method, field, rec.Code, rec.Body)
			}
		}
		key, err := idempotencyKey(http.Header{"Idempotency-Key": {field}})
		if err == nil && (len(key) == 0 || len(key) > maxKeyLength || strings.ContainsFunc(key, func(r rune) bool { return r < 0x21 || r > 0x7e })) {
			t.Fatalf("idempotencyKey(%q) = %q; want 1 to %d visible ASCII characters", field, key, maxKeyLength)
		}
	})
}
