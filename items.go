package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Item is one row of the items table and the JSON shape of every item
// response: {"id":1,"name":"...","description":"..." or null}.
type Item struct {
	ID          int64   `json:"id"`
	Name        string  `json:"name"`
	Description *string `json:"description"`
}

// Limits on an item's fields, in characters (Unicode code points), not bytes.
const (
	maxNameChars        = 200
	maxDescriptionChars = 2000
)

// createItemRequest is the body of POST /items. Pointers tell a missing or
// null field from an empty one.
type createItemRequest struct {
	Name        *string `json:"name"`
	Description *string `json:"description"`
}

// validate returns one message per invalid field, or nil.
func (in createItemRequest) validate() map[string]string {
	problems := map[string]string{}
	switch {
	case in.Name == nil:
		problems["name"] = "is required"
	case strings.TrimSpace(*in.Name) == "":
		problems["name"] = "must not be blank"
	default:
		checkText(problems, "name", *in.Name, maxNameChars)
	}
	if in.Description != nil {
		checkText(problems, "description", *in.Description, maxDescriptionChars)
	}
	if len(problems) == 0 {
		return nil
	}
	return problems
}

// checkText records a problem if s is longer than limit characters or holds
// a NUL character, which PostgreSQL text cannot store.
func checkText(problems map[string]string, field, s string, limit int) {
	if n := utf8.RuneCountInString(s); n > limit {
		problems[field] = fmt.Sprintf("must be at most %d characters (got %d)", limit, n)
	} else if strings.ContainsRune(s, 0) {
		problems[field] = `must not contain the NUL character (\u0000)`
	}
}

// handleCreateItem answers POST /items: 201 with the stored item and a
// Location header; 400, 413 or 415 for a bad request; 503 if PostgreSQL is
// unavailable. The new item is not cached: its first GET is a MISS.
func handleCreateItem(store *Store) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var in createItemRequest
		if err := decode(w, r, &in); err != nil {
			writeError(w, r, err)
			return
		}
		if problems := in.validate(); problems != nil {
			writeError(w, r, invalidFields(problems))
			return
		}
		it, err := store.CreateItem(r.Context(), *in.Name, in.Description)
		if err != nil {
			writeError(w, r, err)
			return
		}
		w.Header().Set("Location", "/items/"+strconv.FormatInt(it.ID, 10))
		encode(w, r, http.StatusCreated, it)
	})
}

// handleGetItem answers GET /items/{id} by cache-aside: Redis first; on a
// miss PostgreSQL, then Redis is filled with the TTL. X-Cache says which
// (HIT, MISS or BYPASS), and the body is the same bytes either way.
func handleGetItem(log *slog.Logger, store *Store, cache *Cache) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := parseID(r.PathValue("id"))
		if err != nil {
			writeError(w, r, err)
			return
		}
		body, outcome := cache.Get(r.Context(), id)
		if outcome == Hit {
			if validCachedItem(body, id) {
				w.Header().Set("X-Cache", string(Hit))
				writeJSON(w, http.StatusOK, body)
				return
			}
			log.Warn("cached value is not this item's JSON; replacing it", "key", cache.Key(id))
			outcome = Miss
		}
		w.Header().Set("X-Cache", string(outcome))
		it, err := store.GetItem(r.Context(), id)
		if errors.Is(err, ErrNotFound) {
			err = &apiError{Status: http.StatusNotFound, Message: fmt.Sprintf("item %d not found", id)}
		}
		if err != nil {
			writeError(w, r, err)
			return
		}
		body, err = json.Marshal(it)
		if err != nil {
			writeError(w, r, err)
			return
		}
		if outcome == Miss {
			cache.Set(r.Context(), id, body)
		}
		writeJSON(w, http.StatusOK, body)
	})
}

// validCachedItem reports whether body is exactly what this service caches
// for item id: the item's JSON as json.Marshal writes it. Anything else (a
// value written by another program, truncated, or for another id) is
// treated as a miss and replaced, so that a HIT is byte-identical to a MISS.
func validCachedItem(body []byte, id int64) bool {
	var it Item
	if json.Unmarshal(body, &it) != nil || it.ID != id {
		return false
	}
	canonical, err := json.Marshal(it)
	return err == nil && bytes.Equal(canonical, body)
}

// parseID reads a path id: a positive decimal integer. Anything else is a
// 400; a number too large for the id column's type cannot name a row, so it
// is a 404.
func parseID(s string) (int64, error) {
	shown := s
	if len(shown) > 40 {
		shown = shown[:40] + "..."
	}
	bad := &apiError{Status: http.StatusBadRequest,
		Message: fmt.Sprintf("item id must be a positive integer, got %q", shown)}
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, bad
	}
	id, err := strconv.ParseInt(s, 10, 64)
	if errors.Is(err, strconv.ErrRange) {
		return 0, &apiError{Status: http.StatusNotFound, Message: "item not found: no item has an id that large"}
	}
	if err != nil || id <= 0 {
		return 0, bad
	}
	return id, nil
}
