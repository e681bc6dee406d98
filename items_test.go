package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestFailedCreateWritesNothing: a rejected POST leaves no row behind.
func TestFailedCreateWritesNothing(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	store := newTestStore(t, cfg, log)
	base := testServer(t, log, store, newTestCache(t, cfg, log))
	for _, body := range []string{`{"name":""}`, `{"name":"x","extra":1}`, `{"name":"x"}{}`, `{"name":"` + strings.Repeat("n", 201) + `"}`} {
		if res := do(t, "POST", base+"/items", body); res.status != 400 {
			t.Errorf("POST %.40s: got %d; want 400", body, res.status)
		}
	}
	var n int
	if err := store.db.QueryRowContext(t.Context(), "SELECT count(*) FROM items").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Errorf("rows after rejected POSTs: got %d; want 0", n)
	}
}

// TestWrites covers PUT, PATCH and DELETE. Each case writes to a fresh item
// whose value is cached (HIT) beforehand, then reads it back: after a 2xx the
// next GET is a MISS with exactly what the write answered (or 404 after a
// DELETE), and then a HIT; after an error the item is unchanged and still
// cached.
func TestWrites(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	base := testServer(t, log, newTestStore(t, cfg, log), newTestCache(t, cfg, log))
	const merge = "application/merge-patch+json"
	tests := []struct {
		name       string
		method     string
		path       string // {id} is the fresh item's id
		body       string
		header     []string
		wantStatus int
		wantBody   string // for 200, the whole body without the id: {"name":...}
		wantHeader []string
	}{
		{"put", "PUT", "{id}", `{"name":"new","description":"d1"}`, nil, 200, `"name":"new","description":"d1"}`, nil},
		{"put without description", "PUT", "{id}", `{"name":"new"}`, nil, 200, `"name":"new","description":null}`, nil},
		{"put with the same id", "PUT", "{id}", `{"id":{id},"name":"new"}`, nil, 200, `"name":"new","description":null}`, nil},
		{"put with another id", "PUT", "{id}", `{"id":1000000,"name":"new"}`, nil, 400, `id must be {id}, the id in the URL, or left out`, nil},
		{"put without name", "PUT", "{id}", `{"description":"d1"}`, nil, 400, `name is required`, nil},
		{"put with null name", "PUT", "{id}", `{"name":null}`, nil, 400, `name is required`, nil},
		{"put with blank name", "PUT", "{id}", `{"name":" "}`, nil, 400, `name must not be blank`, nil},
		{"put with long name", "PUT", "{id}", `{"name":"` + strings.Repeat("n", 201) + `"}`, nil, 400, `at most 200 characters`, nil},
		{"put with unknown field", "PUT", "{id}", `{"name":"x","colour":"red"}`, nil, 400, `unknown field \"colour\"`, nil},
		{"put with malformed JSON", "PUT", "{id}", `{"name":`, nil, 400, `not valid JSON`, nil},
		{"put with wrong type", "PUT", "{id}", `{"name":["x"]}`, nil, 400, `field \"name\" must be a string`, nil},
		{"put as form", "PUT", "{id}", `{"name":"x"}`, []string{"Content-Type", "text/plain"}, 415, `Content-Type: application/json`, nil},
		{"put as merge patch", "PUT", "{id}", `{"name":"x"}`, []string{"Content-Type", merge}, 415, `Content-Type: application/json`, nil},
		{"put to a missing item", "PUT", "1000000", `{"name":"x"}`, nil, 404, `item 1000000 not found`, nil},
		{"put to a bad id", "PUT", "abc", `{"name":"x"}`, nil, 400, `positive integer`, nil},
		{"put to a huge id", "PUT", "99999999999999999999", `{"name":"x"}`, nil, 404, `not found`, nil},

		{"patch name", "PATCH", "{id}", `{"name":"new"}`, nil, 200, `"name":"new","description":"d0"}`, nil},
		{"patch description", "PATCH", "{id}", `{"description":"d1"}`, nil, 200, `"name":"orig","description":"d1"}`, nil},
		{"patch clears description", "PATCH", "{id}", `{"description":null}`, nil, 200, `"name":"orig","description":null}`, nil},
		{"patch both", "PATCH", "{id}", `{"name":"new","description":""}`, []string{"Content-Type", merge}, 200, `"name":"new","description":""}`, nil},
		{"empty patch", "PATCH", "{id}", `{}`, nil, 200, `"name":"orig","description":"d0"}`, nil},
		{"merge patch content type", "PATCH", "{id}", `{"name":"new"}`, []string{"Content-Type", merge + "; charset=utf-8"}, 200, `"name":"new","description":"d0"}`, nil},
		{"patch with the same id", "PATCH", "{id}", `{"id":{id},"name":"new"}`, nil, 200, `"name":"new","description":"d0"}`, nil},
		{"patch with another id", "PATCH", "{id}", `{"id":1000000}`, nil, 400, `id must be {id}, the id in the URL`, nil},
		{"patch removing id", "PATCH", "{id}", `{"id":null}`, nil, 400, `id cannot be removed`, nil},
		{"patch with a fractional id", "PATCH", "{id}", `{"id":1.5}`, nil, 400, `field \"id\" must be an integer`, nil},
		{"patch removing name", "PATCH", "{id}", `{"name":null}`, nil, 400, `name cannot be removed`, nil},
		{"patch with blank name", "PATCH", "{id}", `{"name":""}`, nil, 400, `name must not be blank`, nil},
		{"patch with wrong type", "PATCH", "{id}", `{"name":5}`, nil, 400, `field \"name\" must be a string`, nil},
		{"patch with two problems", "PATCH", "{id}", `{"name":" ","description":"` + strings.Repeat("d", 2001) + `"}`, nil, 400, `"fields":{"description":"must be at most 2000 characters (got 2001)","name":"must not be blank"}`, nil},
		{"patch with NUL", "PATCH", "{id}", `{"description":"a\u0000"}`, nil, 400, `NUL`, nil},
		{"patch with unknown field", "PATCH", "{id}", `{"Name":"x"}`, nil, 400, `unknown field \"Name\"`, nil},
		{"patch with field twice", "PATCH", "{id}", `{"name":"x","name":"y"}`, nil, 400, `given twice`, nil},
		{"patch that is not an object", "PATCH", "{id}", `["name"]`, nil, 400, `must be a JSON object`, nil},
		{"patch that is null", "PATCH", "{id}", `null`, nil, 400, `must be a JSON object`, nil},
		{"JSON Patch", "PATCH", "{id}", `[{"op":"remove","path":"/name"}]`, []string{"Content-Type", "application/json-patch+json"}, 415, `merge patch`,
			[]string{"Accept-Patch", "application/merge-patch+json, application/json"}},
		{"patch to a missing item", "PATCH", "1000000", `{"name":"x"}`, nil, 404, `item 1000000 not found`, nil},

		{"delete", "DELETE", "{id}", "", nil, 204, "", nil},
		{"delete a missing item", "DELETE", "1000000", "", nil, 404, `item 1000000 not found`, nil},
		{"delete a bad id", "DELETE", "0", "", nil, 400, `positive integer`, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			it := createItem(t, base, `{"name":"orig","description":"d0"}`)
			id := strconv.FormatInt(it.ID, 10)
			url := base + "/items/" + id
			if got := do(t, "GET", url, "").header.Get("X-Cache") + " " + do(t, "GET", url, "").header.Get("X-Cache"); got != "MISS HIT" {
				t.Fatalf("priming the cache: got %s; want MISS HIT", got)
			}
			before := do(t, "GET", url, "").body
			wantBody := strings.ReplaceAll(tc.wantBody, "{id}", id)

			res := do(t, tc.method, base+"/items/"+strings.ReplaceAll(tc.path, "{id}", id), strings.ReplaceAll(tc.body, "{id}", id), tc.header...)
			if res.status != tc.wantStatus {
				t.Fatalf("%s: got %d %s; want %d", tc.method, res.status, res.body, tc.wantStatus)
			}
			for i := 0; i+1 < len(tc.wantHeader); i += 2 {
				if got := res.header.Get(tc.wantHeader[i]); got != tc.wantHeader[i+1] {
					t.Errorf("%s: got %q; want %q", tc.wantHeader[i], got, tc.wantHeader[i+1])
				}
			}
			after := do(t, "GET", url, "")
			switch {
			case res.status == 200:
				if want := `{"id":` + id + `,` + wantBody + "\n"; string(res.body) != want {
					t.Errorf("body: got %s; want %s", res.body, want)
				}
				if after.status != 200 || after.header.Get("X-Cache") != "MISS" || string(after.body) != string(res.body) {
					t.Errorf("GET after the write: got %d %s %s; want 200 MISS with what the write answered",
						after.status, after.header.Get("X-Cache"), after.body)
				}
				if got := do(t, "GET", url, "").header.Get("X-Cache"); got != "HIT" {
					t.Errorf("second GET after the write: X-Cache %q; want HIT", got)
				}
			case res.status == 204:
				if len(res.body) != 0 {
					t.Errorf("204 with a body: %q", res.body)
				}
				if after.status != 404 {
					t.Errorf("GET after DELETE: got %d %s; want 404", after.status, after.body)
				}
				if again := do(t, "DELETE", url, ""); again.status != 404 {
					t.Errorf("second DELETE: got %d; want 404", again.status)
				}
			default:
				if msg := errorMessage(t, res); !strings.Contains(string(res.body), wantBody) {
					t.Errorf("error: got %s (%q); want it to contain %s", res.body, msg, wantBody)
				}
				if after.status != 200 || after.header.Get("X-Cache") != "HIT" || string(after.body) != string(before) {
					t.Errorf("GET after a refused write: got %d %s %s; want 200 HIT %s (nothing changed)",
						after.status, after.header.Get("X-Cache"), after.body, before)
				}
			}
		})
	}
}

// TestListItems covers GET /items: keyset pages in id order with a Link to
// the next page, and every kind of bad parameter.
func TestListItems(t *testing.T) {
	cfg := testConfig(t)
	log := newLogBuffer(t).logger()
	base := testServer(t, log, newTestStore(t, cfg, log), newTestCache(t, cfg, log))
	list := func(query string) ([]Item, string) {
		t.Helper()
		res := do(t, "GET", base+"/items"+query, "")
		if res.status != 200 {
			t.Fatalf("GET /items%s: got %d %s; want 200", query, res.status, res.body)
		}
		var items []Item
		if err := json.Unmarshal(res.body, &items); err != nil || items == nil {
			t.Fatalf("GET /items%s: body %s is not a JSON array (%v)", query, res.body, err)
		}
		return items, res.header.Get("Link")
	}
	ids := func(items []Item) []int64 {
		var out []int64
		for _, it := range items {
			out = append(out, it.ID)
		}
		return out
	}

	if items, link := list(""); len(items) != 0 || link != "" {
		t.Errorf("empty table: got %v, Link %q; want [] and no Link", items, link)
	}
	var created []int64
	for i := range 25 {
		created = append(created, createItem(t, base, fmt.Sprintf(`{"name":"item %d"}`, i)).ID)
	}
	// A deleted item leaves a gap that pages step over.
	if res := do(t, "DELETE", fmt.Sprintf("%s/items/%d", base, created[3]), ""); res.status != 204 {
		t.Fatalf("DELETE: got %d", res.status)
	}
	created = slices.Delete(created, 3, 4)

	items, link := list("")
	if !slices.Equal(ids(items), created[:20]) {
		t.Errorf("default page: got ids %v; want the first 20 %v", ids(items), created[:20])
	}
	if want := fmt.Sprintf(`</items?after=%d&limit=20>; rel="next"`, created[19]); link != want {
		t.Errorf("default page Link: got %q; want %q", link, want)
	}
	if items[0].Name != "item 0" || items[0].Description != nil {
		t.Errorf("first item: got %+v; want item 0 with a null description", items[0])
	}

	// Following the links visits every item once, in order.
	var walked []int64
	query := "?limit=7"
	for pages := 0; query != ""; pages++ {
		if pages > 10 {
			t.Fatal("more than 10 pages of 7 for 24 items")
		}
		items, link := list(query)
		walked = append(walked, ids(items)...)
		query = ""
		if link != "" {
			target, ok := strings.CutPrefix(link, "</items")
			target, ok2 := strings.CutSuffix(target, `>; rel="next"`)
			if !ok || !ok2 {
				t.Fatalf("Link %q is not </items?...>; rel=\"next\"", link)
			}
			query = target
		}
	}
	if !slices.Equal(walked, created) {
		t.Errorf("walking the pages: got %v; want %v", walked, created)
	}

	last := created[len(created)-1]
	for _, tc := range []struct {
		query   string
		want    []int64
		hasNext bool
	}{
		{"?limit=24", created, false},                                        // exactly the rest: no next page
		{"?limit=23", created[:23], true},                                    // one short
		{fmt.Sprintf("?after=%d&limit=5", created[18]), created[19:], false}, // the last 5, exactly
		{fmt.Sprintf("?after=%d", last), nil, false},                         // after the last
		{"?after=99999999999999999999", nil, false},                          // after any possible id
		{"?after=0&limit=1", created[:1], true},
		{"?limit=100", created, false},
		{fmt.Sprintf("?after=%d&limit=1", created[2]), created[3:4], true}, // over the gap
	} {
		items, link := list(tc.query)
		if !slices.Equal(ids(items), tc.want) || (link != "") != tc.hasNext {
			t.Errorf("GET /items%s: got %v, Link %q; want %v, next page %v", tc.query, ids(items), link, tc.want, tc.hasNext)
		}
	}

	for query, want := range map[string]string{
		"?limit=0":                    "limit must be a whole number from 1 to 100",
		"?limit=101":                  "limit must be a whole number from 1 to 100",
		"?limit=abc":                  "limit must be a whole number from 1 to 100",
		"?limit=-1":                   "limit must be a whole number from 1 to 100",
		"?limit=":                     "limit must be a whole number from 1 to 100",
		"?limit=1e2":                  "limit must be a whole number from 1 to 100",
		"?limit=99999999999999999999": "limit must be a whole number from 1 to 100",
		"?after=abc":                  "after must be an item id",
		"?after=-5":                   "after must be an item id",
		"?after=":                     "after must be an item id",
		"?limit=5&limit=6":            `query parameter \"limit\" is given 2 times`,
		"?page=2":                     `unknown query parameter \"page\"`,
		"?limit=5;after=1":            "query string is malformed",
		"?after=%zz":                  "query string is malformed",
	} {
		res := do(t, "GET", base+"/items"+query, "")
		if res.status != 400 || !strings.Contains(string(res.body), want) {
			t.Errorf("GET /items%s: got %d %s; want 400 with %q", query, res.status, res.body, want)
		}
		errorMessage(t, res)
	}
	if res := do(t, "HEAD", base+"/items?limit=1", ""); res.status != 200 || res.header.Get("Link") == "" {
		t.Errorf("HEAD /items?limit=1: got %d, Link %q; want 200 with a Link", res.status, res.header.Get("Link"))
	}
}

// TestStampede: concurrent GETs of an item that is not cached make two
// PostgreSQL queries between them: the first request's, and one that all
// the others share, begun after they arrived (see flights). The table is
// locked so that the first query waits until every request has arrived.
func TestStampede(t *testing.T) {
	const n = 50
	cfg := testConfig(t)
	cfg.DBQueryTimeout = 20 * time.Second
	log := newLogBuffer(t).logger()
	store := newTestStore(t, cfg, log)
	items := newItems(store, newTestCache(t, cfg, log))
	base := serveItems(t, log, items)
	it := createItem(t, base, `{"name":"cold"}`)
	url := fmt.Sprintf("%s/items/%d", base, it.ID)

	unlock := lockItems(t, cfg)
	results := make(chan response, n)
	for range n {
		go func() { results <- do(t, "GET", url, "") }()
	}
	waitFor(t, fmt.Sprintf("%d requests to wait for the item", n), func() bool { return items.waiting.Load() == n })
	unlock()
	for range n {
		res := <-results
		if res.status != 200 || res.header.Get("X-Cache") != "MISS" || !strings.Contains(string(res.body), `"cold"`) {
			t.Errorf("concurrent GET: got %d %s %s; want 200 MISS with the item", res.status, res.header.Get("X-Cache"), res.body)
		}
	}
	if got := items.reads.Load(); got != 2 {
		t.Errorf("PostgreSQL queries for %d concurrent misses: got %d; want 2", n, got)
	}
	if got := do(t, "GET", url, "").header.Get("X-Cache"); got != "HIT" {
		t.Errorf("GET after the stampede: X-Cache %q; want HIT", got)
	}
	t.Logf("%d concurrent GETs of a cold item: %d PostgreSQL queries", n, items.reads.Load())
}

// TestNoJoiningAReadFromBeforeAWrite: a GET that arrives after a write has
// been acknowledged must not share a PostgreSQL read that began before the
// write, which would answer with the old row; also when an earlier write's
// outcome was unknown, so that Redis holds the same tombstone before and
// after the write.
func TestNoJoiningAReadFromBeforeAWrite(t *testing.T) {
	for _, unknownFirst := range []bool{false, true} {
		t.Run(map[bool]string{false: "after nothing", true: "after a write with an unknown outcome"}[unknownFirst], func(t *testing.T) {
			cfg := testConfig(t)
			cfg.DBQueryTimeout = 20 * time.Second
			log := newLogBuffer(t).logger()
			direct := newTestStore(t, cfg, log)
			pg := newProxy(t, net.JoinHostPort(cfg.DBHost, strconv.Itoa(cfg.DBPort)))
			cfg.DBHost, cfg.DBPort = "127.0.0.1", pg.port()
			cfg.DBMaxConns = 1
			cfg.OutboxInterval = time.Hour // no sweep through the stalled proxy but the first
			store, err := openStore(t.Context(), cfg, log)
			if err != nil {
				t.Fatal(err)
			}
			defer store.Close()
			cache := newTestCache(t, cfg, log)
			items := newItems(store, cache)
			base := serveItems(t, log, items)
			it := createItem(t, base, `{"name":"old"}`)
			url := fmt.Sprintf("%s/items/%d", base, it.ID)
			// pgx prepares a statement on its first use; prepare it now, so
			// that the reply held below is the row itself. Then empty the cache.
			do(t, "GET", url, "")
			cache.rdb.Del(t.Context(), cache.Key(it.ID))
			if unknownFirst {
				items.written(t.Context(), it.ID, 0, errors.New("the answer was lost")) // as Items.Replace after a timeout
			}
			items.reads.Store(0)

			pg.stallReplies()
			early := make(chan response, 1)
			go func() { early <- do(t, "GET", url, "") }()
			waitFor(t, "the first read's answer", func() bool { return pg.held.Load() > 0 })

			// The write commits (on another connection) and runs its
			// after-commit step, as Items.Replace does, while that read is
			// still in flight.
			updated, err := direct.Replace(t.Context(), Item{ID: it.ID, Name: "new"}, nil)
			if err != nil {
				t.Fatal(err)
			}
			items.written(t.Context(), it.ID, updated.Version, nil)

			late := make(chan response, 1)
			go func() { late <- do(t, "GET", url, "") }()
			waitFor(t, "the second GET to start its own read", func() bool { return items.reads.Load() == 2 || items.waiting.Load() == 2 })
			time.Sleep(100 * time.Millisecond) // let it start a read of its own, if it is to
			pg.resume()
			if res := <-late; res.status != 200 || !strings.Contains(string(res.body), `"new"`) {
				t.Errorf("GET after the write: got %d %s; want the new name", res.status, res.body)
			}
			if res := <-early; res.status != 200 || !strings.Contains(string(res.body), `"old"`) {
				t.Errorf("GET from before the write: got %d %s; want the old name (it read before the write)", res.status, res.body)
			}
			if got := items.reads.Load(); got != 2 {
				t.Errorf("PostgreSQL reads: got %d; want 2 (the later GET must not share the earlier read)", got)
			}
		})
	}
}

func TestPatchValidate(t *testing.T) {
	long := strings.Repeat("é", 2001)
	for body, want := range map[string]map[string]string{
		`{}`:                   nil,
		`{"description":null}`: nil,
		`{"id":3,"name":"x"}`:  nil,
		`{"id":4}`:             {"id": "must be 3, the id in the URL, or left out: an item's id never changes"},
		`{"id":null}`:          {"id": "cannot be removed"},
		`{"name":null}`:        {"name": "cannot be removed (null): an item always has a name; leave name out to keep it"},
		`{"name":"\t"}`:        {"name": "must not be blank"},
		`{"name":"a","description":"` + long + `"}`: {"description": "must be at most 2000 characters (got 2001)"},
	} {
		var in Input
		if err := json.Unmarshal([]byte(body), &in); err != nil {
			t.Fatalf("%s: %v", body, err)
		}
		var got map[string]string
		if err := in.check(3, false); err != nil {
			got = err.(*InvalidError).Fields
		}
		if !maps.Equal(got, want) {
			t.Errorf("check(%.40s): got %v; want %v", body, got, want)
		}
	}
}

// The fuzz targets below send what the fuzzer makes up to the API (against
// the real PostgreSQL and Redis, as every test) and check that it never
// answers 5xx, that every error is a JSON body, and that whatever it
// accepts is stored exactly as sent. Their seed corpus is in
// testdata/fuzz, so plain `go test` replays it; fuzz one with, e.g.,
// `go test -run '^$' -fuzz '^FuzzCreateItem$' -fuzztime 5m`.

// fuzzServer serves the API for a fuzz target, logging nothing.
func fuzzServer(f *testing.F) (string, *Store) {
	cfg := testConfig(f)
	log := slog.New(slog.DiscardHandler)
	store := newTestStore(f, cfg, log)
	return testServer(f, log, store, newTestCache(f, cfg, log)), store
}

// sentFields reads the name and description a request body gave, and
// whether it gave each, the way any JSON reader would.
func sentFields(t *testing.T, body string) (name, description *string, hasName, hasDescription bool) {
	t.Helper()
	var m map[string]json.RawMessage
	if err := json.Unmarshal([]byte(strings.TrimPrefix(body, "\xef\xbb\xbf")), &m); err != nil {
		t.Fatalf("the API accepted %q, which is not a JSON object: %v", body, err)
	}
	field := func(key string) (*string, bool) {
		raw, ok := m[key]
		var s *string
		if ok {
			if err := json.Unmarshal(raw, &s); err != nil {
				t.Fatalf("the API accepted %q, whose %s is not a string: %v", body, key, err)
			}
		}
		return s, ok
	}
	name, hasName = field("name")
	description, hasDescription = field("description")
	return
}

// checkAnswer fails on a 5xx or an error that is not JSON, and on a 2xx
// whose item is not want, or that a GET does not return byte for byte.
func checkAnswer(t *testing.T, base string, res response, body string, want Item) {
	t.Helper()
	if res.status >= 500 {
		t.Fatalf("body %q: got %d %s; want no 5xx", body, res.status, res.body)
	}
	if res.status >= 400 {
		errorMessage(t, res)
		return
	}
	var got Item
	if err := json.Unmarshal(res.body, &got); err != nil {
		t.Fatalf("body %q: answer %s: %v", body, res.body, err)
	}
	want.ID = got.ID
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("body %q: stored %+v (%s); want what was sent, %+v", body, got, res.body, want)
	}
	if again := do(t, "GET", fmt.Sprintf("%s/items/%d", base, got.ID), ""); string(again.body) != string(res.body) {
		t.Fatalf("body %q: GET answered %s; want %s", body, again.body, res.body)
	}
}

func FuzzCreateItem(f *testing.F) {
	for _, seed := range []string{`{"name":"pen","description":"blue"}`, `{"name":"x","description":null}`, `{"name":"\u00e9\ud83d\ude00"}`} {
		f.Add(seed)
	}
	base, _ := fuzzServer(f)
	f.Fuzz(func(t *testing.T, body string) {
		res := do(t, "POST", base+"/items", body)
		if res.status != http.StatusCreated {
			checkAnswer(t, base, res, body, Item{})
			return
		}
		name, description, _, _ := sentFields(t, body)
		if name == nil {
			t.Fatalf("body %q: created an item without a name: %s", body, res.body)
		}
		checkAnswer(t, base, res, body, Item{Name: *name, Description: description})
	})
}

// FuzzUpdateItem sends a PUT (patch false) or a PATCH to a fresh item,
// "orig" with description "d0": a 200 must hold exactly what was sent (for
// PATCH, over the old values), and any error must leave the item as it was.
func FuzzUpdateItem(f *testing.F) {
	for _, seed := range []string{`{"name":"new"}`, `{"description":null}`, `{}`} {
		f.Add(false, seed)
		f.Add(true, seed)
	}
	base, store := fuzzServer(f)
	f.Fuzz(func(t *testing.T, patch bool, body string) {
		d0 := "d0"
		orig, err := store.Create(t.Context(), Item{Name: "orig", Description: &d0})
		if err != nil {
			t.Fatal(err)
		}
		method := map[bool]string{false: "PUT", true: "PATCH"}[patch]
		url := fmt.Sprintf("%s/items/%d", base, orig.ID)
		res := do(t, method, url, body)
		if res.status/100 != 2 {
			checkAnswer(t, base, res, body, Item{})
			after := do(t, "GET", url, "")
			var got Item
			if after.status != 200 || json.Unmarshal(after.body, &got) != nil || got.Name != "orig" || got.Description == nil || *got.Description != "d0" {
				t.Fatalf("%s %q answered %d, but the item is now %d %s; want it unchanged", method, body, res.status, after.status, after.body)
			}
			return
		}
		name, description, hasName, hasDescription := sentFields(t, body)
		want := Item{Name: "orig", Description: &d0}
		if !patch || hasName {
			if name == nil {
				t.Fatalf("%s %q: accepted without a name: %s", method, body, res.body)
			}
			want.Name = *name
		}
		if !patch || hasDescription {
			want.Description = description
		}
		checkAnswer(t, base, res, body, want)
	})
}

// Benchmarks of the three paths through the whole handler (routing,
// request log, cache-aside), against the real PostgreSQL and Redis, with
// the request log written as in production, to io.Discard. Run with
// `go test -run '^$' -bench . -benchmem`.

func benchHandler(b *testing.B) (http.Handler, *Store, *Cache) {
	cfg := testConfig(b)
	cfg.CacheTTL = time.Hour
	quiet := slog.New(slog.DiscardHandler)
	store := newTestStore(b, cfg, quiet)
	cache := newTestCache(b, cfg, quiet)
	log := newLogger(Config{}, io.Discard)
	return newServer(Config{}, log, newItems(store, cache)), store, cache
}

func serveOnce(b *testing.B, h http.Handler, req *http.Request, want int) {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code != want {
		b.Fatalf("%s %s: got %d %s; want %d", req.Method, req.URL, rec.Code, rec.Body, want)
	}
}

// BenchmarkGetHit is GET /items/{id} answered from Redis.
func BenchmarkGetHit(b *testing.B) { benchmarkHit(b, "", 200) }

// BenchmarkGetNotModified is a conditional GET /items/{id} answered from
// Redis with 304 Not Modified: If-None-Match names the cached version.
func BenchmarkGetNotModified(b *testing.B) { benchmarkHit(b, `"1"`, 304) }

// benchmarkHit sends GETs of a cached item, with If-None-Match unless
// ifNoneMatch is "", that must answer want.
func benchmarkHit(b *testing.B, ifNoneMatch string, want int) {
	h, store, _ := benchHandler(b)
	it, err := store.Create(b.Context(), Item{Name: "Widget"})
	if err != nil {
		b.Fatal(err)
	}
	url := fmt.Sprintf("/items/%d", it.ID)
	serveOnce(b, h, httptest.NewRequest("GET", url, nil), 200) // fills the cache
	b.ReportAllocs()
	for b.Loop() {
		req := httptest.NewRequest("GET", url, nil)
		if ifNoneMatch != "" {
			req.Header.Set("If-None-Match", ifNoneMatch)
		}
		serveOnce(b, h, req, want)
	}
}

// BenchmarkCreateWithKey is POST /items with a new Idempotency-Key each time.
func BenchmarkCreateWithKey(b *testing.B) {
	h, _, _ := benchHandler(b)
	b.ReportAllocs()
	n := 0
	for b.Loop() {
		n++
		req := httptest.NewRequest("POST", "/items", strings.NewReader(`{"name":"Widget","description":"A useful widget"}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", "bench-"+strconv.Itoa(n))
		serveOnce(b, h, req, 201)
	}
}

// BenchmarkGetMiss is GET /items/{id} read from PostgreSQL, then cached:
// the key is deleted before each request.
func BenchmarkGetMiss(b *testing.B) {
	h, store, cache := benchHandler(b)
	it, err := store.Create(b.Context(), Item{Name: "Widget"})
	if err != nil {
		b.Fatal(err)
	}
	url := fmt.Sprintf("/items/%d", it.ID)
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		cache.rdb.Del(b.Context(), cache.Key(it.ID))
		b.StartTimer()
		serveOnce(b, h, httptest.NewRequest("GET", url, nil), 200)
	}
}

// BenchmarkCreate is POST /items.
func BenchmarkCreate(b *testing.B) {
	h, _, _ := benchHandler(b)
	b.ReportAllocs()
	for b.Loop() {
		req := httptest.NewRequest("POST", "/items", strings.NewReader(`{"name":"Widget","description":"A useful widget"}`))
		req.Header.Set("Content-Type", "application/json")
		serveOnce(b, h, req, 201)
	}
}

// TestNoJoiningAReadFromBeforeAnotherReplicasWrite: with two replicas, a
// GET on one that arrives after a write through the other has been
// acknowledged must not share a PostgreSQL read that began before the
// write (see flights), whether or not it can reach Redis.
func TestNoJoiningAReadFromBeforeAnotherReplicasWrite(t *testing.T) {
	for _, bypassing := range []bool{false, true} {
		t.Run(map[bool]string{false: "B reads Redis", true: "B cannot reach Redis"}[bypassing], func(t *testing.T) {
			cfg := testConfig(t)
			cfg.DBQueryTimeout = 20 * time.Second
			log := newLogBuffer(t).logger()
			direct := newTestStore(t, cfg, log)
			a := serveItems(t, log, newItems(direct, newTestCache(t, cfg, log)))

			pg := newProxy(t, net.JoinHostPort(cfg.DBHost, strconv.Itoa(cfg.DBPort)))
			proxied := cfg
			proxied.DBHost, proxied.DBPort = "127.0.0.1", pg.port()
			proxied.OutboxInterval = time.Hour // no sweep through the stalled proxy but the first
			proxied.DBMaxConns = 1             // which prepares no statement for the GETs
			if bypassing {
				proxied.RedisHost, proxied.RedisPort = "127.0.0.1", freePort(t)
			}
			replicaB := newReplica(t, proxied, log)
			b := serveItems(t, log, replicaB)

			it := createItem(t, a, `{"name":"old"}`)
			path := fmt.Sprintf("/items/%d", it.ID)
			do(t, "GET", b+path, "") // B prepares its statement (see TestNoJoiningAReadFromBeforeAWrite)
			replicaB.cache.rdb.Del(t.Context(), replicaB.cache.Key(it.ID))
			replicaB.reads.Store(0)

			pg.stallReplies()
			early := make(chan response, 1)
			go func() { early <- do(t, "GET", b+path, "") }()
			waitFor(t, "B's first read to be sent", func() bool { return pg.held.Load() > 0 })
			if res := do(t, "PUT", a+path, `{"name":"new"}`); res.status != 200 {
				t.Fatalf("PUT through A: got %d %s", res.status, res.body)
			}
			late := make(chan response, 1)
			go func() { late <- do(t, "GET", b+path, "") }()
			waitFor(t, "B's second GET to wait", func() bool { return replicaB.waiting.Load() == 2 })
			time.Sleep(100 * time.Millisecond) // let it start a read of its own, if it is to
			pg.resume()
			if res := <-late; res.status != 200 || !strings.Contains(string(res.body), `"new"`) {
				t.Errorf("GET on B after A's write was acknowledged: got %d %s; want the new name", res.status, res.body)
			}
			if res := <-early; res.status != 200 || !strings.Contains(string(res.body), `"old"`) {
				t.Errorf("GET on B from before the write: got %d %s; want the old name (it read before the write)", res.status, res.body)
			}
		})
	}
}
