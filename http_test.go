package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestAPI covers every endpoint and status code of the API, in order, against
// real PostgreSQL and Redis.
func TestAPI(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	base := testServer(t, log, newTestStore(t, cfg, log), newTestCache(t, cfg, log))
	existing := createItem(t, base, `{"name":"existing","description":"d"}`)
	item := func(id int64) string { return fmt.Sprintf("/items/%d", id) }
	const ctJSON = "application/json"

	tests := []struct {
		name       string
		method     string
		path       string
		body       string
		header     []string // name, value pairs; a body sends Content-Type: application/json unless set here
		wantStatus int
		wantBody   string // a substring of the body
		wantHeader []string
	}{
		{"health", "GET", "/health", "", nil, 200, `{"status":"ok"}`, nil},
		{"ready", "GET", "/ready", "", nil, 200, `{"status":"ok","postgres":"up","redis":"up"}`, nil},
		{"create", "POST", "/items", `{"name":"pen","description":"blue"}`, nil, 201, `"name":"pen","description":"blue"}`, nil},
		{"create without description", "POST", "/items", `{"name":"pen"}`, nil, 201, `"description":null}`, nil},
		{"create with null description", "POST", "/items", `{"name":"pen","description":null}`, nil, 201, `"description":null}`, nil},
		{"create with empty description", "POST", "/items", `{"name":"pen","description":""}`, nil, 201, `"description":""}`, nil},
		{"charset parameter", "POST", "/items", `{"name":"pen"}`, []string{"Content-Type", "application/json; charset=utf-8"}, 201, `"name":"pen"`, nil},
		{"200 two-byte characters", "POST", "/items", `{"name":"` + strings.Repeat("é", 200) + `"}`, nil, 201, `"name":"é`, nil},
		{"2000-character description of 4000 bytes", "POST", "/items", `{"name":"n","description":"` + strings.Repeat("é", 2000) + `"}`, nil, 201, `"name":"n"`, nil},
		{"SQL text stored literally", "POST", "/items", `{"name":"x'); DROP TABLE items;--","description":"\" OR 1=1"}`, nil, 201, `"name":"x'); DROP TABLE items;--","description":"\" OR 1=1"`, nil},

		{"valid surrogate pair", "POST", "/items", `{"name":"\ud83d\ude00"}`, nil, 201, `"name":"😀"`, nil},
		{"escaped backslash before u", "POST", "/items", `{"name":"\\ud800"}`, nil, 201, `"name":"\\ud800"`, nil},
		{"byte order mark", "POST", "/items", "\xef\xbb\xbf" + `{"name":"bom"}`, nil, 201, `"name":"bom"`, nil},

		{"missing name", "POST", "/items", `{"description":"d"}`, nil, 400, `name is required`, nil},
		{"null name", "POST", "/items", `{"name":null}`, nil, 400, `name is required`, nil},
		{"blank name", "POST", "/items", `{"name":"  \t"}`, nil, 400, `name must not be blank`, nil},
		{"name of 201 characters", "POST", "/items", `{"name":"` + strings.Repeat("n", 201) + `"}`, nil, 400, `name must be at most 200 characters`, nil},
		{"description of 2001 characters", "POST", "/items", `{"name":"n","description":"` + strings.Repeat("é", 2001) + `"}`, nil, 400, `description must be at most 2000 characters`, nil},
		{"NUL in name", "POST", "/items", `{"name":"a\u0000b"}`, nil, 400, `NUL`, nil},
		{"malformed JSON", "POST", "/items", `{"name":}`, nil, 400, `not valid JSON`, nil},
		{"truncated JSON", "POST", "/items", `{"name":"x"`, nil, 400, `not valid JSON`, nil},
		{"empty body", "POST", "/items", "", []string{"Content-Type", ctJSON}, 400, `empty`, nil},
		{"trailing data", "POST", "/items", `{"name":"x"}{"name":"y"}`, nil, 400, `single JSON object`, nil},
		{"trailing garbage", "POST", "/items", `{"name":"x"} x`, nil, 400, `single JSON object`, nil},
		{"field name in another case", "POST", "/items", `{"NAME":"x"}`, nil, 400, `unknown field \"NAME\"`, nil},
		{"field given twice", "POST", "/items", `{"name":"x","name":"y"}`, nil, 400, `given twice`, nil},
		{"lone high surrogate", "POST", "/items", `{"name":"a\ud800b"}`, nil, 400, `surrogate`, nil},
		{"lone low surrogate", "POST", "/items", `{"name":"x","description":"\udc00"}`, nil, 400, `surrogate`, nil},
		{"null body", "POST", "/items", `null`, nil, 400, `must be a JSON object`, nil},
		{"unknown field", "POST", "/items", `{"name":"x","no_such_field":3}`, nil, 400, `unknown field \"no_such_field\"`, nil},
		{"wrong type of name", "POST", "/items", `{"name":42}`, nil, 400, `field \"name\" must be a string`, nil},
		{"wrong type of description", "POST", "/items", `{"name":"x","description":true}`, nil, 400, `field \"description\" must be a string`, nil},
		{"array body", "POST", "/items", `[{"name":"x"}]`, nil, 400, `must be a JSON object`, nil},
		{"invalid UTF-8", "POST", "/items", "{\"name\":\"\xff\"}", nil, 400, `UTF-8`, nil},
		{"body over 1 MiB", "POST", "/items", `{"name":"` + strings.Repeat("x", 1<<20) + `"}`, nil, 413, `1 MiB`, nil},
		{"form content type", "POST", "/items", `{"name":"x"}`, []string{"Content-Type", "application/x-www-form-urlencoded"}, 415, `Content-Type: application/json`, nil},
		{"text content type", "POST", "/items", `{"name":"x"}`, []string{"Content-Type", "text/plain"}, 415, `Content-Type: application/json`, nil},
		{"latin-1 charset", "POST", "/items", `{"name":"x"}`, []string{"Content-Type", "application/json; charset=iso-8859-1"}, 415, `UTF-8`, nil},
		{"utf8 charset alias", "POST", "/items", `{"name":"x"}`, []string{"Content-Type", "application/json; charset=utf8"}, 201, `"name":"x"`, nil},
		{"gzip content encoding", "POST", "/items", `{"name":"x"}`, []string{"Content-Encoding", "gzip"}, 415, `uncompressed`, nil},
		{"no content type", "POST", "/items", `{"name":"x"}`, []string{"Content-Type", ""}, 415, `Content-Type: application/json`, nil},

		{"get", "GET", item(existing.ID), "", nil, 200, fmt.Sprintf(`{"id":%d,"name":"existing","description":"d"}`, existing.ID), nil},
		{"get missing", "GET", item(existing.ID + 1000), "", nil, 404, `not found`, nil},
		{"id beyond bigint", "GET", "/items/99999999999999999999", "", nil, 404, `not found`, nil},
		{"id beyond int4", "GET", "/items/5000000000", "", nil, 404, `not found`, nil},
		{"id not a number", "GET", "/items/abc", "", nil, 400, `positive integer`, nil},
		{"id zero", "GET", "/items/0", "", nil, 400, `positive integer`, nil},
		{"id negative", "GET", "/items/-1", "", nil, 400, `positive integer`, nil},
		{"id with plus sign", "GET", "/items/+1", "", nil, 400, `positive integer`, nil},
		{"id with decimals", "GET", "/items/1.5", "", nil, 400, `positive integer`, nil},
		{"very long id", "GET", "/items/" + strings.Repeat("9", 2000), "", nil, 404, `not found`, nil},

		{"unknown path", "GET", "/nope", "", nil, 404, `no such endpoint`, nil},
		{"path to clean", "GET", "/items/../health", "", nil, 307, `served at /health`, []string{"Location", "/health"}},
		{"unknown nested path", "GET", "/items/1/extra", "", nil, 404, `no such endpoint`, nil},
		{"escaped slash", "GET", "/items%2F1", "", nil, 404, `GET /items%2F1`, nil},
		{"wrong method on item", "POST", item(existing.ID), "", nil, 405, `not allowed`, []string{"Allow", "DELETE, GET, HEAD, PATCH, PUT"}},
		{"wrong method on items", "DELETE", "/items", "", nil, 405, `not allowed`, []string{"Allow", "GET, HEAD, POST"}},
		{"id in a POST", "POST", "/items", `{"id":7,"name":"x"}`, nil, 400, `id is assigned by the server`, nil},
		{"wrong method on health", "POST", "/health", "", nil, 405, `not allowed`, []string{"Allow", "GET, HEAD"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := do(t, tc.method, base+tc.path, tc.body, tc.header...)
			if res.status != tc.wantStatus {
				t.Fatalf("%s %s: got %d %s; want %d", tc.method, tc.path, res.status, res.body, tc.wantStatus)
			}
			if ct := res.header.Get("Content-Type"); ct != ctJSON {
				t.Errorf("Content-Type: got %q; want %q", ct, ctJSON)
			}
			if !strings.Contains(string(res.body), tc.wantBody) {
				t.Errorf("body: got %s; want it to contain %s", res.body, tc.wantBody)
			}
			if tc.wantStatus >= 400 {
				errorMessage(t, res)
			}
			for i := 0; i+1 < len(tc.wantHeader); i += 2 {
				if got := res.header.Get(tc.wantHeader[i]); got != tc.wantHeader[i+1] {
					t.Errorf("%s: got %q; want %q", tc.wantHeader[i], got, tc.wantHeader[i+1])
				}
			}
			if tc.wantStatus == 201 {
				var it Item
				if err := json.Unmarshal(res.body, &it); err != nil {
					t.Fatal(err)
				}
				if loc := res.header.Get("Location"); loc != item(it.ID) {
					t.Errorf("Location: got %q; want %q", loc, item(it.ID))
				}
				// What was acknowledged is what is stored.
				got := do(t, "GET", base+item(it.ID), "")
				if got.status != 200 || string(got.body) != string(res.body) {
					t.Errorf("GET after create: got %d %s; want 200 %s", got.status, got.body, res.body)
				}
			}
		})
	}
}

// TestSlowBody: a body shorter than its Content-Length times out with 408 and
// a message that reveals nothing about the server's addresses; one announced
// as over 1 MiB is refused at once with 413.
func TestSlowBody(t *testing.T) {
	cfg := testConfig(t)
	logs := newLogBuffer(t)
	log := logs.logger()
	srv := &http.Server{Handler: newServer(cfg, log, newItems(newTestStore(t, cfg, log), newTestCache(t, cfg, log))), ReadTimeout: 300 * time.Millisecond}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprint(c, "POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"name\":\"x\"}")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusRequestTimeout || strings.Contains(string(body), "127.0.0.1") {
		t.Errorf("got %d %s; want 408 without addresses", resp.StatusCode, body)
	}
	waitFor(t, "the request's log line", func() bool { return logs.count("msg=request") > 0 })
	if n := logs.count("path=/items status=408"); n != 1 {
		t.Errorf("log lines with status=408: %d; want 1 (the status sent). Log:\n%s", n, logs)
	}

	c2, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	fmt.Fprint(c2, "POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{")
	c2.SetReadDeadline(time.Now().Add(200 * time.Millisecond)) // well before ReadTimeout
	resp, err = http.ReadResponse(bufio.NewReader(c2), nil)
	if err != nil || resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("Content-Length of 10 GB: got %v, %v; want an immediate 413", resp, err)
	}
}

func TestParsePage(t *testing.T) {
	tests := []struct {
		query      string
		wantAfter  int64
		wantLimit  int
		wantErrSub string
	}{
		{"", 0, 20, ""},
		{"limit=1", 0, 1, ""},
		{"limit=100&after=7", 7, 100, ""},
		{"after=0", 0, 20, ""},
		{"limit=007", 0, 7, ""},
		{"after=99999999999999999999", math.MaxInt64, 20, ""},
		{"limit=0", 0, 0, "limit must be a whole number from 1 to 100"},
		{"limit=101", 0, 0, "limit must be a whole number from 1 to 100"},
		{"limit=+5", 0, 0, "limit must be"},
		{"limit= 5", 0, 0, "limit must be"},
		{"after=1.5", 0, 0, "after must be an item id"},
		{"after=0x10", 0, 0, "after must be an item id"},
		{"limit=1&limit=1", 0, 0, "given 2 times"},
		{"LIMIT=5", 0, 0, `unknown query parameter "LIMIT"`},
		{"a%zz=1", 0, 0, "malformed"},
		{"limit=" + strings.Repeat("9", 100), 0, 0, `got "9999999999999999999999999999999999999999..."`},
	}
	for _, tc := range tests {
		after, limit, err := parsePage(tc.query)
		switch {
		case tc.wantErrSub == "" && (err != nil || after != tc.wantAfter || limit != tc.wantLimit):
			t.Errorf("parsePage(%q): got %d, %d, %v; want %d, %d", tc.query, after, limit, err, tc.wantAfter, tc.wantLimit)
		case tc.wantErrSub != "":
			var ae *apiError
			if !errors.As(err, &ae) || ae.Status != 400 || !strings.Contains(ae.Message, tc.wantErrSub) {
				t.Errorf("parsePage(%q): got %v; want a 400 containing %q", tc.query, err, tc.wantErrSub)
			}
		}
	}
}

func FuzzParseID(f *testing.F) {
	for _, seed := range []string{"1", "0", "-1", "abc", "9223372036854775807", "9223372036854775808", "007", "1e3", " 1"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := parseID(s)
		if err != nil {
			var ae *apiError
			if !errors.As(err, &ae) || (ae.Status != 400 && ae.Status != 404) {
				t.Fatalf("parseID(%q): %v; want a 400 or 404", s, err)
			}
			if strings.Trim(s, "0123456789") == "" && strings.TrimLeft(s, "0") != "" && ae.Status != 404 {
				t.Fatalf("parseID(%q): %v; a positive number too large for an id is a 404", s, err)
			}
			return
		}
		if id <= 0 || strings.TrimLeft(s, "0") != strconv.FormatInt(id, 10) {
			t.Fatalf("parseID(%q) = %d; want the positive integer it spells", s, id)
		}
	})
}

func FuzzParsePage(f *testing.F) {
	for _, seed := range []string{"", "limit=5", "after=3&limit=100", "limit=0", "after=-1", "a%zz", "limit=5;after=1"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, query string) {
		after, limit, err := parsePage(query)
		if err != nil {
			var ae *apiError
			if !errors.As(err, &ae) || ae.Status != 400 {
				t.Fatalf("parsePage(%q): %v; want a 400", query, err)
			}
			return
		}
		if after < 0 || limit < 1 || limit > maxPageSize {
			t.Fatalf("parsePage(%q) = %d, %d; want after >= 0 and 1 <= limit <= %d", query, after, limit, maxPageSize)
		}
	})
}

// TestInternalErrorsStayInternal: a panic or an unexpected error becomes a
// 500 with a generic JSON message; the detail goes only to the log.
func TestInternalErrorsStayInternal(t *testing.T) {
	logs := newLogBuffer(t)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /panic", func(http.ResponseWriter, *http.Request) { panic("secret detail") })
	mux.HandleFunc("GET /fail", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, r, errors.New("pq: secret detail"))
	})
	h := logRequests(logs.logger(), newMetrics(nil), mux)
	for _, path := range []string{"/panic", "/fail"} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		res := response{status: rec.Code, header: rec.Header(), body: rec.Body.Bytes()}
		if res.status != 500 {
			t.Errorf("GET %s: got %d; want 500", path, res.status)
		}
		if msg := errorMessage(t, res); msg != "internal server error" {
			t.Errorf("GET %s: message %q; want the generic one", path, msg)
		}
	}
	if n := logs.count("level=ERROR msg=request"); n != 2 || logs.count("secret detail") != 2 {
		t.Errorf("log: want 2 error lines with the detail; got:\n%s", logs)
	}
}

// TestDebugVars: GET /debug/vars is expvar's JSON with this server's
// counters under "items", which follow what the requests did.
func TestDebugVars(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	base := testServer(t, log, newTestStore(t, cfg, log), newTestCache(t, cfg, log))
	it := createItem(t, base, `{"name":"counted"}`)
	do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "")      // miss
	do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "")      // hit
	do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID), "")      // hit
	do(t, "GET", fmt.Sprintf("%s/items/%d", base, it.ID+1000), "") // miss, 404
	res := do(t, "GET", base+"/debug/vars", "")
	var vars struct {
		Cmdline  []string
		Memstats struct{ HeapAlloc uint64 }
		Items    map[string]int64
	}
	if res.status != 200 || json.Unmarshal(res.body, &vars) != nil {
		t.Fatalf("GET /debug/vars: got %d %s; want 200 with JSON", res.status, res.body)
	}
	want := map[string]int64{"cache_hits": 2, "cache_misses": 2, "cache_bypasses": 0, "redis_errors": 0,
		"postgres_errors": 0, "postgres_retries": 0, "postgres_item_reads": 2, "waiting_for_item_reads": 0, "outbox_applied": 0}
	// One connection for the requests; the relay's sweeps may take a second.
	if n := vars.Items["postgres_connects"]; n < 1 || n > 2 {
		t.Errorf("postgres_connects: got %d; want 1 or 2", n)
	}
	delete(vars.Items, "postgres_connects")
	if !maps.Equal(vars.Items, want) {
		t.Errorf("items counters: got %v; want %v", vars.Items, want)
	}
	if len(vars.Cmdline) == 0 || vars.Memstats.HeapAlloc == 0 {
		t.Errorf("expvar's own cmdline and memstats are missing: %s", res.body)
	}
}

func TestParseID(t *testing.T) {
	tests := []struct {
		in     string
		id     int64
		status int
	}{
		{"1", 1, 0}, {"007", 7, 0}, {"9223372036854775807", 9223372036854775807, 0},
		{"9223372036854775808", 0, 404}, {"99999999999999999999", 0, 404},
		{"0", 0, 400}, {"-1", 0, 400}, {"+1", 0, 400}, {"abc", 0, 400}, {"", 0, 400}, {"1e3", 0, 400}, {" 1", 0, 400}, {"١", 0, 400},
	}
	for _, tc := range tests {
		id, err := parseID(tc.in)
		status := 0
		if ae, ok := err.(*apiError); ok {
			status = ae.Status
		}
		if id != tc.id || status != tc.status {
			t.Errorf("parseID(%q): got %d, status %d; want %d, status %d", tc.in, id, status, tc.id, tc.status)
		}
	}
}
