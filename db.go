package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" database/sql driver
)

// Item is one row of the items table and the JSON of every item the API
// sends: {"id":1,"name":"...","description":"..." or null}. Each field's db
// tag names its column; itemColumns and scanItem follow those tags, so a
// field is declared here once. Version counts the row's writes (schema.sql)
// and is not part of the API.
//
// To add a field: its column in schema.sql; a field here with a db tag (ID
// stays first: the cache checks that a value is its item's by the opening
// {"id":N,), in Input and in Input.item; its check in Input.check
// (items.go); and the column in the INSERT and UPDATEs below, with its value
// in their arguments (Create, Replace, Patch).
type Item struct {
	ID          int64   `json:"id" db:"id"`
	Name        string  `json:"name" db:"name"`
	Description *string `json:"description" db:"description"`
	Version     int64   `json:"-" db:"version"`
}

// Input is what a client sends to create or change an item: the body of
// POST, PUT and PATCH. Each field may be left out (Set false), null, or
// given, so that a PATCH (a JSON merge patch, RFC 7396) can keep a field,
// clear it or change it. id may be given only as the id in the URL.
type Input struct {
	ID          optional[int64]  `json:"id"`
	Name        optional[string] `json:"name"`
	Description optional[string] `json:"description"`
}

// item is the item that a POST or PUT of in makes: the fields it gives, and
// null for those it leaves out. in must have passed check with whole set.
func (in Input) item(id int64) Item {
	return Item{ID: id, Name: *in.Name.Value, Description: in.Description.Value}
}

// optional is a JSON field that may be absent (Set false), null (Set true,
// Value nil) or a value.
type optional[T any] struct {
	Set   bool
	Value *T
}

func (o *optional[T]) UnmarshalJSON(b []byte) error {
	o.Set, o.Value = true, nil
	if string(b) == "null" {
		return nil
	}
	o.Value = new(T)
	return json.Unmarshal(b, o.Value)
}

//go:embed schema.sql
var schemaSQL string

// schemaLockID is the key of the advisory lock held while schema.sql runs, so
// that replicas starting together do not race on CREATE TABLE IF NOT EXISTS
// (which is not safe under concurrency: it can fail with a unique violation
// on pg_type). Any fixed number works; this one is "items" in ASCII.
const schemaLockID = 0x6974656d73

var (
	// ErrNotFound means no row has the requested id.
	ErrNotFound = errors.New("not found")
	// ErrUnavailable means PostgreSQL could not be reached or did not answer
	// within the query timeout. It is temporary: the pool reconnects by itself.
	ErrUnavailable = errors.New("database unavailable")
	// ErrNotSent marks a write that failed before its statement was sent:
	// no pooled connection could be had. It comes with ErrUnavailable.
	ErrNotSent = errors.New("no connection to send the statement on")
)

// Store is the items table behind a bounded pool of PostgreSQL connections.
// Every method bounds its query by DB_QUERY_TIMEOUT on top of the caller's
// context, and returns ErrNotFound or an error wrapping ErrUnavailable where
// those apply.
type Store struct {
	db       *sql.DB
	timeout  time.Duration
	maxConns int
	lastDrop atomic.Int64 // when idle connections were last dropped, Unix ns
	errors   atomic.Int64 // queries that failed, not counting "not found"
}

// dsn builds the connection URL for pgx from the DB_* settings.
func (c Config) dsn() string {
	q := url.Values{"sslmode": {c.DBSSLMode}, "application_name": {"items-api"}}
	if c.DBSchema != "" {
		q.Set("search_path", c.DBSchema)
	}
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(c.DBUser, c.DBPassword),
		Host:     net.JoinHostPort(c.DBHost, strconv.Itoa(c.DBPort)),
		Path:     "/" + c.DBName,
		RawQuery: q.Encode(),
	}
	return u.String()
}

// openStore opens the pool, waits for PostgreSQL with exponential backoff
// (250 ms doubling to 5 s, logging each retry) for at most DB_CONNECT_TIMEOUT,
// then applies the embedded schema.sql. It returns ctx.Err() if ctx ends
// first, and an error naming the server if it never answers.
func openStore(ctx context.Context, cfg Config, log *slog.Logger) (*Store, error) {
	db, err := sql.Open("pgx", cfg.dsn())
	if err != nil {
		return nil, fmt.Errorf("open PostgreSQL: %w", err)
	}
	db.SetMaxOpenConns(cfg.DBMaxConns)
	db.SetMaxIdleConns(cfg.DBMaxConns)
	db.SetConnMaxIdleTime(5 * time.Minute)
	db.SetConnMaxLifetime(time.Hour)
	s := &Store{db: db, timeout: cfg.DBQueryTimeout, maxConns: cfg.DBMaxConns}

	if err := s.waitReady(ctx, cfg, log); err != nil {
		db.Close()
		return nil, err
	}
	if err := s.applySchema(ctx, cfg.DBSchema); err != nil {
		db.Close()
		return nil, fmt.Errorf("apply schema.sql: %w", err)
	}
	return s, nil
}

func (s *Store) waitReady(ctx context.Context, cfg Config, log *slog.Logger) error {
	deadline := time.Now().Add(cfg.DBConnectTimeout)
	backoff := 250 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := s.Ping(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !errors.Is(err, ErrUnavailable) {
			// Wrong password, missing database: waiting will not help.
			return fmt.Errorf("connect to PostgreSQL at %s:%d: %w", cfg.DBHost, cfg.DBPort, err)
		}
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("PostgreSQL at %s:%d did not answer within DB_CONNECT_TIMEOUT=%s: %w",
				cfg.DBHost, cfg.DBPort, cfg.DBConnectTimeout, err)
		}
		wait := min(backoff, left)
		log.Warn("waiting for PostgreSQL", "attempt", attempt, "retry_in", wait, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// applySchema runs schema.sql (and creates DB_SCHEMA first, if set) in one
// transaction under an advisory lock.
func (s *Store) applySchema(ctx context.Context, schema string) error {
	ctx, cancel := context.WithTimeout(ctx, max(s.timeout, 30*time.Second))
	defer cancel()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return classify(err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, "SELECT pg_advisory_xact_lock($1)", schemaLockID); err != nil {
		return classify(err)
	}
	if schema != "" {
		// schema passed validIdentifier, so it needs no quoting.
		if _, err := tx.ExecContext(ctx, "CREATE SCHEMA IF NOT EXISTS "+schema); err != nil {
			return classify(err)
		}
	}
	if _, err := tx.ExecContext(ctx, schemaSQL); err != nil {
		return classify(err)
	}
	return classify(tx.Commit())
}

// Close closes the pool, waiting for queries in progress.
func (s *Store) Close() error { return s.db.Close() }

// Ping checks that PostgreSQL answers within the query timeout.
func (s *Store) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	return s.classify(s.db.PingContext(ctx))
}

// itemColumns is the column list of every query that returns items: Item's
// db tags, in the order of its fields, which scanItem reads them in.
var itemColumns = strings.Join(dbTags(reflect.TypeFor[Item]()), ", ")

// The queries that return items, made once. They compare ids as
// $1::bigint: a table created by hand with SERIAL has an int4 id, and an
// int8 parameter compared with it still uses the primary key index, while
// an int4 parameter would fail to encode ids above 2^31-1.
var (
	insertItem  = "INSERT INTO items (name, description) VALUES ($1, $2) RETURNING " + itemColumns
	selectItem  = "SELECT " + itemColumns + " FROM items WHERE id = $1::bigint"
	selectItems = "SELECT " + itemColumns + " FROM items WHERE id > $1::bigint ORDER BY id LIMIT $2"
	replaceItem = "UPDATE items SET name = $2, description = $3, version = version + 1 WHERE id = $1::bigint RETURNING " + itemColumns
	patchItem   = `UPDATE items SET
			name = CASE WHEN $2 THEN $3 ELSE name END,
			description = CASE WHEN $4 THEN $5 ELSE description END,
			version = version + 1
		WHERE id = $1::bigint RETURNING ` + itemColumns
)

func dbTags(t reflect.Type) []string {
	tags := make([]string, t.NumField())
	for i := range tags {
		tags[i] = t.Field(i).Tag.Get("db")
	}
	return tags
}

// scanItem reads a row of itemColumns into an Item, field by field.
func (s *Store) scanItem(row interface{ Scan(...any) error }) (Item, error) {
	var it Item
	fields := reflect.ValueOf(&it).Elem()
	dests := make([]any, fields.NumField())
	for i := range dests {
		dests[i] = fields.Field(i).Addr().Interface()
	}
	return it, s.classify(row.Scan(dests...))
}

// Create inserts it (its ID and Version aside) and returns it as stored,
// with its new id and version 1.
func (s *Store) Create(ctx context.Context, it Item) (Item, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	return s.scanItem(s.db.QueryRowContext(ctx, insertItem, it.Name, it.Description))
}

// Get returns the item with the given id, or ErrNotFound.
func (s *Store) Get(ctx context.Context, id int64) (Item, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	return s.scanItem(s.db.QueryRowContext(ctx, selectItem, id))
}

// List returns at most limit items with ids greater than after, in id
// order: keyset pagination, so a page costs one index range scan however
// deep it is, and rows created or deleted meanwhile never shift a page.
func (s *Store) List(ctx context.Context, after int64, limit int) ([]Item, error) {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	rows, err := s.db.QueryContext(ctx, selectItems, after, limit)
	if err != nil {
		return nil, s.classify(err)
	}
	defer rows.Close()
	list := make([]Item, 0, limit)
	for rows.Next() {
		it, err := s.scanItem(rows)
		if err != nil {
			return nil, err
		}
		list = append(list, it)
	}
	return list, s.classify(rows.Err())
}

// Replace sets every field of item it.ID to it's (a nil description stores
// NULL), adds one to its version and returns it as stored, or ErrNotFound.
func (s *Store) Replace(ctx context.Context, it Item) (stored Item, err error) {
	err = s.write(ctx, func(ctx context.Context, c *sql.Conn) error {
		stored, err = s.scanItem(c.QueryRowContext(ctx, replaceItem, it.ID, it.Name, it.Description))
		return err
	})
	return stored, err
}

// Patch changes the fields that in sets (to NULL where it sets null), adds
// one to the version and returns the item as stored, or ErrNotFound. It is
// one statement, so concurrent patches of different fields never undo each
// other.
func (s *Store) Patch(ctx context.Context, id int64, in Input) (stored Item, err error) {
	err = s.write(ctx, func(ctx context.Context, c *sql.Conn) error {
		stored, err = s.scanItem(c.QueryRowContext(ctx, patchItem,
			id, in.Name.Set, in.Name.Value, in.Description.Set, in.Description.Value))
		return err
	})
	return stored, err
}

// Delete deletes item id and returns the version it had, or ErrNotFound.
// Only the version comes back: the delete has committed by then, so it
// must not fail on a row it cannot read (a table made by hand may hold one).
func (s *Store) Delete(ctx context.Context, id int64) (version int64, err error) {
	err = s.write(ctx, func(ctx context.Context, c *sql.Conn) error {
		return s.classify(c.QueryRowContext(ctx, "DELETE FROM items WHERE id = $1::bigint RETURNING version", id).Scan(&version))
	})
	return version, err
}

// write runs a statement that changes an item (its errors classified by
// the statement) on a connection taken from the pool first, within the
// query timeout. If no connection could be had (the pool stayed full, the
// client gave up while waiting, or PostgreSQL could not be reached), the
// error wraps ErrNotSent: nothing was written, and the cache may keep its
// value.
func (s *Store) write(ctx context.Context, statement func(context.Context, *sql.Conn) error) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	c, err := s.db.Conn(ctx)
	if err != nil {
		return s.classify(fmt.Errorf("%w: %w", ErrNotSent, err))
	}
	defer c.Close()
	return statement(ctx, c)
}

// classify is classify, and after a query that timed out it also drops the
// pool's idle connections (at most once a second): a connection that hung
// may have siblings that hang too, and each would cost a later request a
// whole DB_QUERY_TIMEOUT before the pool dropped it. New connections are
// made as needed; if PostgreSQL itself is hung, they time out as well.
func (s *Store) classify(err error) error {
	err = classify(err)
	if err != nil && !errors.Is(err, ErrNotFound) {
		s.errors.Add(1)
	}
	if errors.Is(err, ErrUnavailable) && (errors.Is(err, context.DeadlineExceeded) || pgconn.Timeout(err)) {
		now := time.Now().UnixNano()
		if last := s.lastDrop.Load(); now-last >= int64(time.Second) && s.lastDrop.CompareAndSwap(last, now) {
			go func() {
				s.db.SetMaxIdleConns(0) // closes the idle ones
				s.db.SetMaxIdleConns(s.maxConns)
			}()
		}
	}
	return err
}

// classify maps sql.ErrNoRows to ErrNotFound and every sign that PostgreSQL
// is unreachable, overloaded, shutting down or too slow to ErrUnavailable
// (keeping the cause in the chain); other errors are returned as they are.
func classify(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, sql.ErrNoRows):
		return ErrNotFound
	case unavailable(err):
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return err
}

func unavailable(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		// SQLSTATE classes 08 connection exception, 53 insufficient resources,
		// 57 operator intervention (admin shutdown, statement timeout, cannot
		// connect now): PostgreSQL Appendix A "Error Codes".
		switch pgErr.Code[:min(2, len(pgErr.Code))] {
		case "08", "53", "57":
			return true
		}
		return false
	}
	var netErr net.Error
	var connectErr *pgconn.ConnectError
	return errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, context.Canceled) ||
		errors.Is(err, driver.ErrBadConn) ||
		errors.Is(err, sql.ErrConnDone) ||
		errors.Is(err, io.EOF) ||
		errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, net.ErrClosed) ||
		errors.As(err, &netErr) ||
		errors.As(err, &connectErr) ||
		pgconn.Timeout(err) ||
		pgconn.SafeToRetry(err)
}
