package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
)

// latestMigration is the newest version this build knows.
func latestMigration(t *testing.T, store *Store) int64 {
	t.Helper()
	p, err := migrator(store.db, "")
	if err != nil {
		t.Fatal(err)
	}
	sources := p.ListSources()
	return sources[len(sources)-1].Version
}

func schemaVersion(t *testing.T, store *Store) int64 {
	t.Helper()
	var v int64
	if err := store.db.QueryRowContext(t.Context(), "SELECT max(version_id) FROM goose_db_version").Scan(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestAdoptSchemaSQL: a database made by schema.sql as earlier versions
// ran it at every startup, with rows and writes, is adopted by the
// migrations without loss.
func TestAdoptSchemaSQL(t *testing.T) {
	cfg := testConfig(t)
	rawSQL(t, cfg, "CREATE SCHEMA "+cfg.DBSchema, schemaSQL,
		"INSERT INTO items (name, description, version) VALUES ('old', 'from schema.sql', 7)")
	store := newTestStore(t, cfg, newLogBuffer(t).logger())
	it, err := store.Get(t.Context(), 1)
	if err != nil || it.Name != "old" || *it.Description != "from schema.sql" || it.Version != 7 {
		t.Errorf("the old row: got %+v, %v; want it as it was", it, err)
	}
	if v := schemaVersion(t, store); v != latestMigration(t, store) {
		t.Errorf("schema version %d; want %d", v, latestMigration(t, store))
	}
	if _, err := store.Create(t.Context(), Item{Name: "new"}); err != nil {
		t.Errorf("create after adoption: %v", err)
	}
}

// TestReplicasMigrateTogether: replicas starting at once on an empty
// schema all start, and each migration runs once.
func TestReplicasMigrateTogether(t *testing.T) {
	cfg := testConfig(t)
	first := newTestStore(t, cfg, newLogBuffer(t).logger()) // drops the schema at the end
	log := newLogBuffer(t)
	rawSQL(t, cfg, "DROP SCHEMA "+cfg.DBSchema+" CASCADE")
	var wg sync.WaitGroup
	errs := make([]error, 6)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := openStore(t.Context(), cfg, log.logger())
			if err == nil {
				s.Close()
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("replica %d: %v", i, err)
		}
	}
	var applied int
	if err := first.db.QueryRowContext(t.Context(), "SELECT count(*) FROM goose_db_version WHERE version_id > 0").Scan(&applied); err != nil {
		t.Fatal(err)
	}
	if applied != int(latestMigration(t, first)) {
		t.Errorf("%d migrations recorded; want each of the %d once", applied, latestMigration(t, first))
	}
	if n := log.count(`msg=migrated`); n != int(latestMigration(t, first)) {
		t.Errorf("%d migrations logged as applied; want %d", n, latestMigration(t, first))
	}
}

// TestMigrateCommand: with MIGRATE_ON_START=false the service refuses to
// start on a schema that lacks migrations, saying what to run; `items
// migrate` applies them and exits; then the service starts.
func TestMigrateCommand(t *testing.T) {
	cfg := testConfig(t)
	store := newTestStore(t, cfg, newLogBuffer(t).logger()) // drops the schema at the end
	newTestCache(t, cfg, newLogBuffer(t).logger())          // deletes the keys the service writes
	rawSQL(t, cfg, "DROP SCHEMA "+cfg.DBSchema+" CASCADE")

	noMigrate := envFrom(cfg, "MIGRATE_ON_START", "false")
	for _, state := range []string{"no schema", "an empty schema"} {
		err := run(t.Context(), []string{"items"}, noMigrate, io.Discard)
		if err == nil || !strings.Contains(err.Error(), "run `items migrate` first") {
			t.Fatalf("start with MIGRATE_ON_START=false on %s: %v; want an error saying to run `items migrate`", state, err)
		}
		rawSQL(t, cfg, "CREATE SCHEMA IF NOT EXISTS "+cfg.DBSchema)
	}
	var out strings.Builder
	if err := run(t.Context(), []string{"items", "migrate"}, noMigrate, &out); err != nil {
		t.Fatalf("items migrate: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), `"msg":"schema up to date"`) || !strings.Contains(out.String(), fmt.Sprintf(`"version":%d`, latestMigration(t, store))) {
		t.Errorf("items migrate logged:\n%s\nwant the migrations applied and the version", out.String())
	}
	ctx, cancel := context.WithCancel(t.Context())
	base, done := startRun(t, ctx, noMigrate)
	if res := do(t, "POST", base+"/items", `{"name":"after the job"}`); res.status != 201 {
		t.Errorf("POST after the migrate job: %d %s", res.status, res.body)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("run: %v", err)
	}
}
