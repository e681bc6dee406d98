package main

import (
	"bytes"
	"cmp"
	"context"
	"database/sql"
	"database/sql/driver"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
)

// Item is one row of the items table and the JSON of every item the API
// sends: {"id":1,"name":"...","description":"..." or null}. Each field's db
// tag names its column; itemColumns and scanItem follow those tags, so a
// field is declared here once. Version counts the row's writes
// (schema.sql); it is not in the JSON, but is the item's ETag.
//
// To add a field: its column in a new migration; a field here with a db tag (ID
// stays first: the cache checks that a value is its item's by the opening
// {"id":N,), in Input and in Input.item; its check in Input.check
// (items.go); and the column in the INSERT and UPDATEs below, with its value
// in their arguments (insert, Replace, Patch), before the If-Match
// precondition, whose parameter number (whereMatches) moves up.
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

var (
	// ErrNotFound means no row has the requested id.
	ErrNotFound = errors.New("not found")
	// ErrUnavailable means PostgreSQL could not be reached or did not answer
	// within the query timeout. It is temporary: the pool reconnects by itself.
	ErrUnavailable = errors.New("database unavailable")
	// ErrNotSent marks a write that failed before its statement was sent:
	// no pooled connection could be had. It comes with ErrUnavailable.
	ErrNotSent = errors.New("no connection to send the statement on")
	// ErrReadOnly means PostgreSQL accepts no writes now: a standby, or a
	// primary being failed over. It comes with ErrUnavailable.
	ErrReadOnly = errors.New("PostgreSQL is read-only")
	// ErrConflict means the row breaks a constraint of the table.
	ErrConflict = errors.New("conflicts with a constraint of the table")
	// ErrRejected means a column cannot hold a value the API accepted.
	ErrRejected = errors.New("the database cannot store a value")
	// ErrOutcomeUnknown marks a write that was sent, lost its connection,
	// and was retried without success: the first try may have committed.
	ErrOutcomeUnknown = errors.New("a try of the write may have been applied")
	// ErrKeyInUse means a create under the same idempotency key is still
	// running: nothing was written.
	ErrKeyInUse = errors.New("a request with this idempotency key is still running")
	// ErrKeyReused means the idempotency key was first used with another
	// request: nothing was written.
	ErrKeyReused = errors.New("the idempotency key was used for another request")
)

// PreconditionError is the error of a conditional write (If-Match) that
// found its item at a version it did not list: nothing was written.
// Version is the item's version then.
type PreconditionError struct{ Version int64 }

func (e *PreconditionError) Error() string {
	return fmt.Sprintf("precondition failed: the item is at version %d", e.Version)
}

// Response is what a create under an idempotency key answered, as the key
// records it, to be sent again as it was to a retry.
type Response struct {
	Status   int
	Location string
	ETag     string
	Body     []byte
}

// Store is the items table behind a bounded pool of PostgreSQL connections.
// Every method's statement runs on a context of the Store's own (ended by
// Cut), bounded by DB_QUERY_TIMEOUT; the caller's context only decides
// whether a statement is sent once a connection is had (see withConn).
// Methods return ErrNotFound or an error wrapping ErrUnavailable where
// those apply.
type Store struct {
	stop     context.Context // ended by Cut
	cut      context.CancelFunc
	db       *sql.DB
	fresh    *sql.DB // keeps no idle connection: each of its connections is new
	timeout  time.Duration
	maxConns int
	// outboxInterval is OUTBOX_POLL_INTERVAL: how often each replica's
	// relay sweeps the outbox (outbox.go).
	outboxInterval time.Duration
	sweepIdle      time.Duration // how long a sweep's transaction may wait on Redis
	keyTTL         time.Duration // IDEMPOTENCY_KEY_TTL
	lastDrop       atomic.Int64  // when idle connections were last dropped, Unix ns
	errors         atomic.Int64  // queries that failed, not counting "not found"
	retries        atomic.Int64  // statements run again after a stale plan or a dead connection
	connects       atomic.Int64  // connections made, by both pools
}

// dsn builds the connection URL for pgx from the DB_* settings. With
// several hosts, pgx tries them in order for each new connection and keeps
// the first that accepts writes (target_session_attrs=read-write), so that
// after a failover the pool finds the new primary by itself; with one, any
// server will do, so that a read-only one still serves reads.
func (c Config) dsn() string {
	q := url.Values{"sslmode": {c.DBSSLMode}, "application_name": {"items-api"},
		"default_query_exec_mode": {c.DBQueryExecMode}}
	if c.DBSchema != "" {
		q.Set("search_path", c.DBSchema)
	}
	if strings.Contains(c.DBHost, ",") {
		q.Set("target_session_attrs", "read-write")
	}
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(c.DBUser, c.DBPassword),
		Host:     c.dbAddrs(),
		Path:     "/" + c.DBName,
		RawQuery: q.Encode(),
	}
	return u.String()
}

// openStore opens the pool, waits for PostgreSQL with exponential backoff
// (250 ms doubling to 5 s, logging each retry) for at most DB_CONNECT_TIMEOUT,
// then brings the schema up to date (migrate.go) unless MIGRATE_ON_START is
// false, in which case it checks that someone has. It returns ctx.Err() if
// ctx ends first, and an error naming the server if it never answers.
func openStore(ctx context.Context, cfg Config, log *slog.Logger) (*Store, error) {
	conf, err := pgx.ParseConfig(cfg.dsn())
	if err != nil {
		return nil, fmt.Errorf("PostgreSQL settings: %w", err)
	}
	s := &Store{timeout: cfg.DBQueryTimeout, maxConns: cfg.DBMaxConns, outboxInterval: cfg.OutboxInterval,
		sweepIdle: 2*cfg.RedisTimeout + time.Second, keyTTL: cfg.IdempotencyKeyTTL}
	s.stop, s.cut = context.WithCancel(context.Background())
	counted := stdlib.OptionAfterConnect(func(context.Context, *pgx.Conn) error {
		s.connects.Add(1)
		return nil
	})
	db := stdlib.OpenDB(*conf, stdlib.OptionShouldPing(shouldPing), counted)
	db.SetMaxOpenConns(cfg.DBMaxConns)
	db.SetMaxIdleConns(cfg.DBMaxConns)
	db.SetConnMaxIdleTime(5 * time.Minute)
	db.SetConnMaxLifetime(time.Hour)
	s.fresh = stdlib.OpenDB(*conf, counted)
	s.fresh.SetMaxOpenConns(max(1, cfg.DBMaxConns/4))
	s.fresh.SetMaxIdleConns(-1)
	s.db = db

	if err := s.waitReady(ctx, cfg, log); err != nil {
		s.Close()
		return nil, err
	}
	if cfg.MigrateOnStart {
		err = migrate(ctx, db, cfg.DBSchema, log)
	} else {
		err = checkMigrated(ctx, db, cfg.DBSchema)
	}
	if err != nil {
		s.Close()
		return nil, classify(err)
	}
	return s, nil
}

// shouldPing decides whether database/sql's pool checks a connection with
// a round trip before handing it out again: after a second idle (pgx's
// default), and whenever the server has sent something unasked on it. A
// backend that was terminated (pg_terminate_backend, idle_session_timeout,
// a restart or failover) or a pooler that restarted leaves its FATAL
// message or end of stream there; the ping then fails and the pool takes
// another connection, before any statement is sent on a dead one. Without
// this, each such connection fails one request.
func shouldPing(_ context.Context, p stdlib.ShouldPingParams) bool {
	return p.IdleDuration > time.Second || unread(p.Conn.PgConn().Conn())
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
			return fmt.Errorf("connect to PostgreSQL at %s: %w", cfg.dbAddrs(), err)
		}
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("PostgreSQL at %s did not answer within DB_CONNECT_TIMEOUT=%s: %w",
				cfg.dbAddrs(), cfg.DBConnectTimeout, err)
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

// PoolStats are the statistics of both connection pools: "main", that
// every statement uses first, and "fresh", whose connections are new, for
// a statement's second try (see withConn).
func (s *Store) PoolStats() map[string]sql.DBStats {
	return map[string]sql.DBStats{"main": s.db.Stats(), "fresh": s.fresh.Stats()}
}

// Close cuts the statements still running (as Cut does) and closes both
// pools. run calls it once no request is left, or after Cut.
func (s *Store) Close() error {
	s.cut()
	return errors.Join(s.db.Close(), s.fresh.Close())
}

// Cut ends every statement in flight now (see withConn: a client hanging
// up does not), for a shutdown that ran out of time: their writes end with
// an unknown outcome, so that their callers invalidate the cache before
// the process exits, rather than commit after it, unseen.
func (s *Store) Cut() { s.cut() }

// Ping checks that PostgreSQL answers within the query timeout.
func (s *Store) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	return s.classify(s.db.PingContext(ctx))
}

// Writable checks that PostgreSQL answers and accepts writes: not a hot
// standby, nor a primary with default_transaction_read_only on (a failover
// in progress, or a server protecting a full disk). Errors: ErrReadOnly,
// ErrUnavailable.
func (s *Store) Writable(ctx context.Context) error {
	var readOnly string
	err := s.withConn(ctx, idempotent, func(ctx context.Context, c *sql.Conn) error {
		return c.QueryRowContext(ctx, "SHOW transaction_read_only").Scan(&readOnly)
	})
	if err == nil && readOnly == "on" {
		err = fmt.Errorf("%w: %w", ErrUnavailable, ErrReadOnly)
	}
	return err
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
	replaceItem = withOutbox("UPDATE items SET name = $2, description = $3, version = version + 1 " + whereMatches(4))
	patchItem   = withOutbox(`UPDATE items SET
			name = CASE WHEN $2 THEN $3 ELSE name END,
			description = CASE WHEN $4 THEN $5 ELSE description END,
			version = version + 1 ` + whereMatches(6))
	deleteItem = `WITH d AS (DELETE FROM items ` + whereMatches(2) + ` RETURNING id, version),
		o AS (INSERT INTO cache_outbox (item_id, floor) SELECT id, version + 1 FROM d)
		SELECT version FROM d`
	selectVersion = "SELECT version FROM items WHERE id = $1::bigint"
	// sweepOutbox takes rows of the outbox, oldest first, locking them
	// (FOR UPDATE, then SKIP LOCKED or nothing: see SweepOutbox), and
	// deletes them when its transaction commits.
	sweepOutbox = `DELETE FROM cache_outbox WHERE id IN
		(SELECT id FROM cache_outbox ORDER BY id LIMIT $1 FOR UPDATE %s)
		RETURNING item_id, floor`
)

// whereMatches is the WHERE clause of a write of item $1 whose precondition
// is parameter n: a bigint[] of the versions it may change (If-Match), or
// NULL for any. PostgreSQL decides it on the row it locks, after any
// concurrent write of it has committed, so of concurrent writes listing the
// same version exactly one finds it.
func whereMatches(n int) string {
	return fmt.Sprintf("WHERE id = $1::bigint AND ($%d::bigint[] IS NULL OR version = ANY($%d::bigint[]))", n, n)
}

// withOutbox is update, an UPDATE of one item, returning the item as
// stored and adding, in the same statement, its outbox row (the
// invalidation it owes the cache). One statement, so no extra round trip.
func withOutbox(update string) string {
	return "WITH w AS (" + update + " RETURNING " + itemColumns + `),
		o AS (INSERT INTO cache_outbox (item_id, floor) SELECT id, version FROM w)
		SELECT ` + itemColumns + " FROM w"
}

func dbTags(t reflect.Type) []string {
	tags := make([]string, t.NumField())
	for i := range tags {
		tags[i] = t.Field(i).Tag.Get("db")
	}
	return tags
}

// scanItem reads a row of itemColumns into an Item, field by field. Its
// error is unclassified: run classifies.
func (s *Store) scanItem(row interface{ Scan(...any) error }) (Item, error) {
	var it Item
	fields := reflect.ValueOf(&it).Elem()
	dests := make([]any, fields.NumField())
	for i := range dests {
		dests[i] = fields.Field(i).Addr().Interface()
	}
	return it, row.Scan(dests...)
}

// Create inserts it (its ID and Version aside) and returns it as stored,
// with its new id and version 1.
func (s *Store) Create(ctx context.Context, it Item) (stored Item, err error) {
	err = s.withConn(ctx, atMostOnce, func(ctx context.Context, c *sql.Conn) error {
		stored, err = s.insert(ctx, c, it)
		return err
	})
	return stored, err
}

// The statements of a create under an idempotency key (CreateOnce), and
// of their expiry. Durations are in milliseconds.
var (
	// lookupKey bounds how long the transaction may sit idle (a replica
	// cut off mid-create must not hold its key for long), looks the key up,
	// and takes its advisory lock unless another transaction holds it: one
	// round trip. The lock is a 64-bit hash of the key and the schema
	// (schemas sharing a database, such as the tests', do not share keys);
	// two keys whose hashes collide only make one wait (409) while the
	// other runs. The lookup sees the statement's snapshot, which a create
	// committing just before the lock was taken may be missing from:
	// insertKey then finds its row.
	lookupKey = `SELECT set_config('idle_in_transaction_session_timeout', $3, true),
		pg_try_advisory_xact_lock(hashtextextended('idempotency key ' || current_schema() || ' ' || $1, 0)),
		k.fingerprint, k.status, k.location, k.etag, k.body
		FROM (SELECT) AS one LEFT JOIN idempotency_keys k
		ON k.key = $1 AND k.created > now() - $2 * interval '1 millisecond'`
	// insertKey records a key, replacing an expired row of it that
	// ExpireKeys has not deleted yet, but never a live one: then it changes
	// no row.
	// Its time is the clock's, not now() (the transaction's start): a
	// create that waited long (on a lock, say) must not record a key that
	// is already older than the TTL.
	insertKey = `INSERT INTO idempotency_keys (key, fingerprint, status, location, etag, body, created)
		VALUES ($1, $2, $3, $4, $5, $6, clock_timestamp()) ON CONFLICT (key) DO UPDATE
		SET fingerprint = $2, status = $3, location = $4, etag = $5, body = $6, created = clock_timestamp()
		WHERE idempotency_keys.created <= now() - $7 * interval '1 millisecond'`
	deleteExpiredKeys = `DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys
		WHERE created <= now() - $1 * interval '1 millisecond' ORDER BY created LIMIT $2 FOR UPDATE SKIP LOCKED)`
)

// CreateOnce is Create under an idempotency key. The first call with key
// inserts it, and in the same transaction records the key, fingerprint
// (of the request) and the response that respond makes of the stored
// item. A later call with key and the same fingerprint, within
// IDEMPOTENCY_KEY_TTL, inserts nothing and returns the recorded response,
// with replayed set. Errors: ErrKeyInUse (a call with key is running),
// ErrKeyReused (key was recorded with another fingerprint),
// ErrUnavailable. Running it twice is safe, so after a lost connection it
// runs again as a read does (withConn): the second run finds the first's
// record if it committed.
func (s *Store) CreateOnce(ctx context.Context, key string, fingerprint []byte, it Item,
	respond func(Item) (Response, error)) (res Response, replayed bool, err error) {
	err = s.withConn(ctx, idempotent, func(ctx context.Context, c *sql.Conn) error {
		for try := 1; ; try++ {
			res, replayed, err = s.createOnce(ctx, c, key, fingerprint, it, respond)
			switch {
			case err == errKeyRaced && try == 2:
				return ErrKeyInUse // still racing: the client tries again
			case err != errKeyRaced:
				return err
			}
		}
	})
	return res, replayed, err
}

// errKeyRaced is a create under a key that found no record of it, but
// whose record of its own met one: a create with the key committed after
// the lookup's snapshot. Nothing was written; another try replays it.
var errKeyRaced = errors.New("a create with the idempotency key committed meanwhile")

// createOnce is one transaction of CreateOnce on c. A record of the key
// answers at once, even while another request holds the key's lock (two
// retries of a finished create both replay it); only a key with no record
// yet is locked, and its record made.
func (s *Store) createOnce(ctx context.Context, c *sql.Conn, key string, fingerprint []byte, it Item,
	respond func(Item) (Response, error)) (res Response, replayed bool, err error) {
	tx, err := c.BeginTx(ctx, nil)
	if err != nil {
		return res, false, err
	}
	defer tx.Rollback()
	var setting string
	var locked bool
	var recorded, body []byte
	var status sql.NullInt32
	var location, etag sql.NullString
	idle := strconv.FormatInt(timeoutSetting(s.timeout), 10) // the caller has given up by then
	ttl := s.keyTTL.Milliseconds()
	if err := tx.QueryRowContext(ctx, lookupKey, key, ttl, idle).Scan(&setting, &locked,
		&recorded, &status, &location, &etag, &body); err != nil {
		return res, false, err
	}
	switch {
	case status.Valid && !bytes.Equal(recorded, fingerprint):
		return res, false, ErrKeyReused
	case status.Valid:
		return Response{Status: int(status.Int32), Location: location.String, ETag: etag.String, Body: body}, true, nil
	case !locked:
		return res, false, ErrKeyInUse
	}
	stored, err := s.insert(ctx, tx, it)
	if err != nil {
		return res, false, err
	}
	if res, err = respond(stored); err != nil {
		return res, false, err
	}
	r, err := tx.ExecContext(ctx, insertKey, key, fingerprint, res.Status, res.Location, res.ETag, string(res.Body), ttl)
	if err != nil {
		return res, false, err
	}
	if n, err := r.RowsAffected(); err != nil || n == 0 {
		return res, false, cmp.Or(err, errKeyRaced)
	}
	return res, false, tx.Commit()
}

// timeoutSetting is d as a PostgreSQL timeout setting, in milliseconds:
// at least 1 (0 would turn the timeout off) and at most the setting's
// maximum, 2^31-1 (about 24 days).
func timeoutSetting(d time.Duration) int64 {
	return min(max(d.Milliseconds(), 1), math.MaxInt32)
}

// keyBatch is the most idempotency keys one statement of ExpireKeys deletes.
const keyBatch = 1000

// ExpireKeys deletes the idempotency keys older than IDEMPOTENCY_KEY_TTL,
// oldest first, keyBatch rows per statement: each a short one that locks
// only the rows it deletes (none of items), and replicas expiring at once
// skip each other's rows. It returns how many it deleted.
func (s *Store) ExpireKeys() (int64, error) {
	var total int64
	for {
		ctx, cancel := context.WithTimeout(s.stop, s.timeout)
		res, err := s.db.ExecContext(ctx, deleteExpiredKeys, s.keyTTL.Milliseconds(), keyBatch)
		cancel()
		if err != nil {
			return total, s.classify(err)
		}
		n, err := res.RowsAffected()
		total += n
		if err != nil || n < keyBatch {
			return total, s.classify(err)
		}
	}
}

// insert runs insertItem for it on q, a connection or a transaction: the
// one place that gives the INSERT its arguments.
func (s *Store) insert(ctx context.Context, q interface {
	QueryRowContext(context.Context, string, ...any) *sql.Row
}, it Item) (Item, error) {
	return s.scanItem(q.QueryRowContext(ctx, insertItem, it.Name, it.Description))
}

// Get returns the item with the given id, or ErrNotFound.
func (s *Store) Get(ctx context.Context, id int64) (it Item, err error) {
	err = s.withConn(ctx, idempotent, func(ctx context.Context, c *sql.Conn) error {
		it, err = s.scanItem(c.QueryRowContext(ctx, selectItem, id))
		return err
	})
	return it, err
}

// List returns at most limit items with ids greater than after, in id
// order: keyset pagination, so a page costs one index range scan however
// deep it is, and rows created or deleted meanwhile never shift a page.
func (s *Store) List(ctx context.Context, after int64, limit int) (list []Item, err error) {
	err = s.withConn(ctx, idempotent, func(ctx context.Context, c *sql.Conn) error {
		rows, err := c.QueryContext(ctx, selectItems, after, limit)
		if err != nil {
			return err
		}
		defer rows.Close()
		list = make([]Item, 0, limit)
		for rows.Next() {
			it, err := s.scanItem(rows)
			if err != nil {
				return err
			}
			list = append(list, it)
		}
		return rows.Err()
	})
	return list, err
}

// Replace sets every field of item it.ID to it's (a nil description stores
// NULL), adds one to its version and returns it as stored. ifMatch, if not
// nil, lists the versions it may replace (see precondition).
// Errors: ErrNotFound, *PreconditionError.
func (s *Store) Replace(ctx context.Context, it Item, ifMatch []int64) (stored Item, err error) {
	err = s.withConn(ctx, idempotent, func(ctx context.Context, c *sql.Conn) error {
		stored, err = s.scanItem(c.QueryRowContext(ctx, replaceItem, it.ID, it.Name, it.Description, ifMatch))
		return precondition(ctx, c, it.ID, ifMatch, err)
	})
	return stored, err
}

// Patch changes the fields that in sets (to NULL where it sets null), adds
// one to the version and returns the item as stored. It is one statement,
// so concurrent patches of different fields never undo each other. Errors
// as Replace.
func (s *Store) Patch(ctx context.Context, id int64, in Input, ifMatch []int64) (stored Item, err error) {
	err = s.withConn(ctx, idempotent, func(ctx context.Context, c *sql.Conn) error {
		stored, err = s.scanItem(c.QueryRowContext(ctx, patchItem,
			id, in.Name.Set, in.Name.Value, in.Description.Set, in.Description.Value, ifMatch))
		return precondition(ctx, c, id, ifMatch, err)
	})
	return stored, err
}

// Replace, Patch and Delete also add the item's outbox row (withOutbox).

// Delete deletes item id and returns the version it had. Only the version
// comes back: the delete has committed by then, so it must not fail on a
// row it cannot read (a table made by hand may hold one). Errors as
// Replace.
func (s *Store) Delete(ctx context.Context, id int64, ifMatch []int64) (version int64, err error) {
	err = s.withConn(ctx, atMostOnce, func(ctx context.Context, c *sql.Conn) error {
		err := c.QueryRowContext(ctx, deleteItem, id, ifMatch).Scan(&version)
		return precondition(ctx, c, id, ifMatch, err)
	})
	return version, err
}

// precondition tells, after a conditional write of item id found no row
// (err is sql.ErrNoRows), whether the item is missing or at another
// version: it reads the version on the same connection, and returns
// *PreconditionError with it. The write itself decided (whereMatches):
// this read only names the version for the client, who may find it newer
// still. Any other err is returned as it is.
func precondition(ctx context.Context, c *sql.Conn, id int64, ifMatch []int64, err error) error {
	if ifMatch == nil || !errors.Is(err, sql.ErrNoRows) {
		return err
	}
	var version int64
	if err := c.QueryRowContext(ctx, selectVersion, id).Scan(&version); err != nil {
		return err
	}
	return &PreconditionError{Version: version}
}

// SweepOutbox takes up to limit rows of the outbox, passes apply their
// invalidations (item id -> the highest floor among its rows) and deletes
// the rows if apply returns nil; if it fails, they stay for the next sweep.
// It returns how many rows it took. The rows stay locked while apply runs,
// and rows another replica's relay holds are skipped (FOR UPDATE SKIP
// LOCKED), so that replicas sweeping at once share the rows rather than all
// apply each; unless wait is set: then it waits for them (at most
// DB_QUERY_TIMEOUT), so that fewer than limit rows means that every row
// committed before it began has been applied, by it or another relay. One
// transaction of two statements: it works through PgBouncer in transaction
// mode.
func (s *Store) SweepOutbox(limit int, wait bool, apply func(context.Context, map[int64]int64) error) (int, error) {
	ctx, cancel := context.WithTimeout(s.stop, s.timeout)
	defer cancel()
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, s.classify(err)
	}
	defer tx.Rollback()
	// A replica that stops mid-sweep (frozen, or cut off from PostgreSQL
	// with its session left open) must not hold the rows for long: the
	// others skip them meanwhile. The transaction is idle only while apply
	// calls Redis (REDIS_TIMEOUT at most).
	if _, err := tx.ExecContext(ctx, fmt.Sprintf("SET LOCAL idle_in_transaction_session_timeout = %d", timeoutSetting(s.sweepIdle))); err != nil {
		return 0, s.classify(err)
	}
	skip := "SKIP LOCKED"
	if wait {
		skip = "" // waits for the rows another relay holds, and takes those it did not delete (its Redis failed)
	}
	rows, err := tx.QueryContext(ctx, fmt.Sprintf(sweepOutbox, skip), limit)
	if err != nil {
		return 0, s.classify(err)
	}
	floors := map[int64]int64{}
	n := 0
	for rows.Next() {
		var id, floor int64
		if err := rows.Scan(&id, &floor); err != nil {
			rows.Close()
			return 0, s.classify(err)
		}
		floors[id] = max(floors[id], floor)
		n++
	}
	if err := rows.Err(); err != nil || n == 0 {
		return 0, s.classify(err)
	}
	if err := apply(ctx, floors); err != nil {
		return 0, err
	}
	return n, s.classify(tx.Commit())
}

// How a statement may be retried after its connection failed under it.
const (
	// idempotent statements may run twice: reads, and the UPDATEs of PUT
	// and PATCH, which set given values (a second run leaves the same row,
	// one version higher).
	idempotent = iota
	// atMostOnce statements are retried only if PostgreSQL certainly never
	// ran them: an INSERT run twice makes two items, and a DELETE run
	// twice answers "not found" for the item it deleted.
	atMostOnce
)

// withConn runs statement on a pooled connection within the query timeout,
// taking the connection first so that a write that never got one (or
// whose client left while it waited) is known not to have happened
// (ErrNotSent). The client sees no error for:
//   - a prepared statement that DDL made stale ("cached plan must not
//     change result type"): pgx has dropped it from this connection's cache
//     on the error, so it runs once more there, prepared anew;
//   - a server that refused the write as read-only (25006: a standby, or a
//     primary being failed over): the connection is dropped and the write
//     runs once more on a new connection, which with several DB_HOSTs
//     goes to the one that now accepts writes;
//   - a connection that died under the statement (a terminated backend, a
//     restarted pooler, a connection pgx closed when another request's
//     context ended), if the statement is idempotent or certainly was not
//     sent: it runs once more on a new connection (from s.fresh), made
//     after the failure. Not another pooled one: when a server, pooler or
//     operator ends many backends at once, the others may be dying too,
//     their FATAL message still on its way.
//
// Its errors are classified (classify).
func (s *Store) withConn(ctx context.Context, retry int, statement func(context.Context, *sql.Conn) error) error {
	// The connection is taken, and the statement run to its end, on a
	// context that the client's hanging up does not end (the query
	// timeout still does): a connection cancelled while pgx connects,
	// pings it or runs a statement on it is closed, so a crowd of clients
	// hanging up would make the pool reconnect all the time while the
	// others wait. A request whose client left while it waited sends
	// nothing (single-item reads are shared, so their context never ends:
	// see Items.Get). It also leaves a write's outcome known. Cut ends them.
	client := ctx
	ctx, cancel := context.WithTimeout(s.stop, s.timeout)
	defer cancel()
	c, err := s.db.Conn(ctx)
	if err == nil && client.Err() != nil {
		c.Close()
		err = client.Err()
	}
	if err != nil {
		return s.classify(fmt.Errorf("%w: %w", ErrNotSent, err))
	}
	err = statement(ctx, c)
	switch {
	case err == nil || ctx.Err() != nil:
	case stalePlan(err):
		s.retries.Add(1)
		err = statement(ctx, c)
	case deadConn(err) && (retry == idempotent || unsent(err)) || readOnly(err):
		s.retries.Add(1)
		// The first try may have committed if it was sent and its answer
		// lost; then whatever the retry's error, the outcome is unknown.
		applied := !Unchanged(classify(err))
		c.Raw(func(any) error { return driver.ErrBadConn }) // the pool drops it
		c.Close()
		if c, err = s.fresh.Conn(ctx); err != nil {
			err = fmt.Errorf("%w: %w", ErrNotSent, err)
		} else {
			err = statement(ctx, c)
			c.Close()
		}
		if err != nil && applied {
			err = fmt.Errorf("%w: %w", ErrOutcomeUnknown, err)
		}
		return s.classify(err)
	}
	c.Close()
	return s.classify(err)
}

// classify is classify, and after a query that timed out it also drops the
// pool's idle connections (at most once a second): a connection that hung
// may have siblings that hang too, and each would cost a later request a
// whole DB_QUERY_TIMEOUT before the pool dropped it. New connections are
// made as needed; if PostgreSQL itself is hung, they time out as well.
func (s *Store) classify(err error) error {
	err = classify(err)
	if err != nil && !answered(err) {
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

// classify sorts an error of database/sql or pgx by what the client can do
// about it (the SQLSTATE codes are PostgreSQL's Appendix A "Error Codes"):
//   - sql.ErrNoRows becomes ErrNotFound (404);
//   - conditions that pass by themselves become ErrUnavailable (503 with
//     Retry-After): no connection (refused, reset, timed out, the server
//     starting or shutting down: classes 08, 57), too many connections or
//     no memory or disk (53), an I/O error (58), a serialization failure or
//     deadlock (40), a lock or statement timeout (55P03, 57014), a read-only
//     transaction (25006: a standby, or a primary being failed over), a
//     transaction or idle timeout (25P03, 25P04), a snapshot too old (72);
//   - a row that breaks a constraint of the table (23) becomes ErrConflict
//     (409), and a value the column cannot hold (22: a column narrowed by
//     a migration) ErrRejected (422);
//
// anything else (a bug: a syntax error, a missing column, an internal
// error) is returned as it is: a 500. The cause stays in the chain.
func classify(err error) error {
	var pgErr *pgconn.PgError
	switch {
	case err == nil:
		return nil
	case errors.Is(err, sql.ErrNoRows):
		return ErrNotFound
	case errors.As(err, &pgErr):
		switch class := pgErr.Code[:min(2, len(pgErr.Code))]; {
		case pgErr.Code == "25006":
			return fmt.Errorf("%w: %w: %w", ErrUnavailable, ErrReadOnly, err)
		case temporary[pgErr.Code] || temporary[class]:
			return fmt.Errorf("%w: %w", ErrUnavailable, err)
		case class == "23":
			return fmt.Errorf("%w: %w", ErrConflict, err)
		case class == "22":
			return fmt.Errorf("%w: %w", ErrRejected, err)
		case (pgErr.Code == "26000" || pgErr.Code == "42P05") && strings.Contains(pgErr.Message, "stmtcache_"):
			// pgx's prepared statements, missing or doubled on the server
			// connection: a pooler in transaction mode hands out server
			// connections per transaction. A configuration error (500).
			return fmt.Errorf("%w (behind PgBouncer or another pooler in transaction mode? set DB_QUERY_EXEC_MODE=exec)", err)
		}
		return err
	case unavailable(err):
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return err
}

// temporary lists the SQLSTATE classes (two characters) and codes that
// classify makes ErrUnavailable.
var temporary = map[string]bool{
	"08": true, "40": true, "53": true, "57": true, "58": true, "72": true,
	"25P03": true, "25P04": true, "55P03": true, "55006": true,
}

func unavailable(err error) bool {
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

// stalePlan reports whether err is PostgreSQL refusing a prepared
// statement whose result type DDL changed (ALTER COLUMN ... TYPE): SQLSTATE
// 0A000 "cached plan must not change result type". The statement did not
// run.
func stalePlan(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "0A000" && strings.Contains(pgErr.Message, "cached plan")
}

// readOnly reports whether err is PostgreSQL refusing a write in a
// read-only transaction (25006). The statement did not run.
func readOnly(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "25006"
}

// deadConn reports whether err means the connection is gone: closed by
// the server (a FATAL error such as 57P01 admin_shutdown, or end of
// stream), reset, or closed by pgx. A timeout is not: the server may be
// hung, and another try would wait as long again.
func deadConn(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		sev := severity(pgErr)
		return sev == "FATAL" || sev == "PANIC" || strings.HasPrefix(pgErr.Code, "08")
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) || pgconn.Timeout(err) {
		return false
	}
	return unavailable(err)
}

// unsent reports whether err certainly came before PostgreSQL received
// the statement: database/sql or pgx found the connection closed first
// (driver.ErrBadConn, pgx's "safe to retry"), or none could be had.
func unsent(err error) bool {
	return errors.Is(err, driver.ErrBadConn) || errors.Is(err, ErrNotSent) ||
		errors.As(err, new(*pgconn.ConnectError)) || pgconn.SafeToRetry(err)
}

// pgMessage is PostgreSQL's message in err (which names the constraint or
// the column type, never a row's values: those are in its Detail).
func pgMessage(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Message
	}
	return err.Error()
}

// severity is ERROR, FATAL or PANIC, whatever the server's lc_messages
// (Severity is translated; SeverityUnlocalized exists from PostgreSQL 9.6).
func severity(e *pgconn.PgError) string {
	if e.SeverityUnlocalized != "" {
		return e.SeverityUnlocalized
	}
	return e.Severity
}

// answered reports whether err is an answer of PostgreSQL's about the data
// (no such item, another version, an idempotency key taken), rather than a
// failure: none of them is counted as an error (postgres_errors).
func answered(err error) bool {
	if errors.Is(err, ErrOutcomeUnknown) {
		return false // the answer of a retry, whose first try failed
	}
	return errors.Is(err, ErrNotFound) || errors.As(err, new(*PreconditionError)) ||
		errors.Is(err, ErrKeyInUse) || errors.Is(err, ErrKeyReused)
}

// Unchanged reports whether a write that returned err certainly left the
// table as it was: it found no row or another version, its idempotency key
// was taken, it was never sent, or PostgreSQL answered it with an ERROR,
// which rolls back the statement's transaction. A FATAL
// error, a broken connection or a timeout leaves the outcome unknown: the
// statement may have committed before the answer was lost.
func Unchanged(err error) bool {
	var pgErr *pgconn.PgError
	switch {
	case err == nil || errors.Is(err, ErrOutcomeUnknown):
		return false
	case answered(err) || unsent(err):
		return true
	case errors.As(err, &pgErr):
		return severity(pgErr) == "ERROR" && pgErr.Code != "40003" // statement_completion_unknown
	}
	return false
}
