package main

import (
	"context"
	"database/sql"
	"embed"
	"fmt"
	"hash/crc32"
	"io/fs"
	"log/slog"

	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"
)

// schemaSQL is version 1 of the schema, the original design's schema.sql,
// run once as a migration of its own.
//
//go:embed schema.sql
var schemaSQL string

// migrations are the schema's later changes, forward only:
// migrations/NNNNN_name.sql from 00002, applied in the order of their
// numbers, each in a transaction of its own unless it says
// `-- +goose NO TRANSACTION` (CREATE INDEX CONCURRENTLY). goose records
// every version applied in the table goose_db_version. Never edit one that
// has been released: add the next. docs/migrations.md says how to write one
// that old and new replicas can both run during a rolling update.
//
//go:embed migrations
var migrations embed.FS

// migrate applies the pending migrations to db (in schema, created first
// if missing, when set) and logs each. Replicas starting together are
// safe: migrations run under a session-level advisory lock, which the
// others wait for (polling once a second, for at most 5 minutes) and then
// find nothing pending. The lock needs a session: behind PgBouncer in
// transaction mode, run `items migrate` against PostgreSQL itself.
//
// It is goose (pressly/goose) rather than a runner of our own: goose keeps
// the version table, the lock, the embedded files and the statements that
// cannot run in a transaction, and a team can use its CLI on the same files.
func migrate(ctx context.Context, db *sql.DB, schema string, log *slog.Logger) error {
	if schema != "" {
		if err := createSchema(ctx, db, schema); err != nil {
			return err
		}
	}
	p, err := migrator(db, schema)
	if err != nil {
		return err
	}
	results, err := p.Up(ctx)
	for _, r := range results {
		file := r.Source.Path
		if r.Source.Type == goose.TypeGo {
			file = "schema.sql" // version 1
		}
		log.Info("migrated", "version", r.Source.Version, "file", file, "duration", r.Duration)
	}
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	version, err := p.GetDBVersion(ctx)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	log.Info("schema up to date", "version", version, "applied", len(results))
	return nil
}

// checkMigrated returns an error if db's schema lacks migrations of this
// build (MIGRATE_ON_START=false, and the migrate job has not run yet). A
// schema newer than the build is fine: during a rolling update, old
// replicas run on the new schema (docs/migrations.md).
func checkMigrated(ctx context.Context, db *sql.DB, schema string) error {
	p, err := migrator(db, schema)
	if err != nil {
		return err
	}
	sources := p.ListSources()
	target := sources[len(sources)-1].Version
	current := int64(0)
	// Without the version table (or DB_SCHEMA), it is version 0. Checked
	// here: goose would create the table, and with DB_SCHEMA missing it
	// would look in public.
	table := "goose_db_version"
	if schema != "" {
		table = schema + "." + table
	}
	var migrated bool
	if err := db.QueryRowContext(ctx, "SELECT to_regclass($1) IS NOT NULL", table).Scan(&migrated); err != nil {
		return fmt.Errorf("read the schema version: %w", err)
	}
	if migrated {
		if current, err = p.GetDBVersion(ctx); err != nil {
			return fmt.Errorf("read the schema version: %w", err)
		}
	}
	if current < target {
		return fmt.Errorf("the schema is at version %d and this build needs %d: run `items migrate` first, or set MIGRATE_ON_START=true", current, target)
	}
	return nil
}

func migrator(db *sql.DB, schema string) (*goose.Provider, error) {
	files, err := fs.Sub(migrations, "migrations")
	if err != nil {
		return nil, err
	}
	// One lock per schema, so that schemas sharing a database (the tests')
	// do not wait for each other.
	locker, err := lock.NewPostgresSessionLocker(
		lock.WithLockID(int64(crc32.ChecksumIEEE([]byte("items migrations "+schema)))),
		lock.WithLockTimeout(1, 300))
	if err != nil {
		return nil, err
	}
	version1 := goose.NewGoMigration(1, &goose.GoFunc{RunTx: func(ctx context.Context, tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, schemaSQL)
		return err
	}}, nil)
	return goose.NewProvider(goose.DialectPostgres, db, files, goose.WithGoMigrations(version1),
		goose.WithSessionLocker(locker), goose.WithDisableGlobalRegistry(true))
}

// createSchema creates schema if it does not exist, under a
// transaction-level advisory lock: CREATE SCHEMA IF NOT EXISTS is not safe
// when replicas run it at once (it can fail with a unique violation).
// schema passed validIdentifier, so it needs no quoting.
func createSchema(ctx context.Context, db *sql.DB, schema string) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, "SELECT pg_advisory_xact_lock($1)", int64(crc32.ChecksumIEEE([]byte("items schema")))); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, "CREATE SCHEMA IF NOT EXISTS "+schema); err != nil {
		return err
	}
	return tx.Commit()
}
