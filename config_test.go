package main

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

func envMap(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestLoadConfigDefaults(t *testing.T) {
	cfg, err := loadConfig(envMap(nil))
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		Port: 5000, DBHost: "localhost", DBPort: 5432, DBName: "appdb", DBUser: "appuser", DBPassword: "secret",
		DBSSLMode: "prefer", DBMaxConns: 16, DBConnectTimeout: 30 * time.Second, DBQueryTimeout: 3 * time.Second,
		RedisHost: "localhost", RedisPort: 6379, RedisTimeout: 200 * time.Millisecond, RedisRetry: time.Second,
		CacheTTL: time.Minute, CacheKeyPrefix: "item:", ShutdownTimeout: 5 * time.Second,
		LogLevel: slog.LevelInfo, LogFormat: "text", DBQueryExecMode: "cache_statement", MigrateOnStart: true,
		RedisMasterName: "mymaster", OutboxInterval: 250 * time.Millisecond, IdempotencyKeyTTL: 24 * time.Hour,
	}
	if cfg != want {
		t.Errorf("defaults:\ngot  %+v\nwant %+v", cfg, want)
	}
}

func TestLoadConfigValues(t *testing.T) {
	cfg, err := loadConfig(envMap(map[string]string{
		"PORT": "8080", "DB_HOST": "db", "DB_PORT": "6432", "CACHE_TTL": "300", "DB_QUERY_TIMEOUT": "750ms",
		"REDIS_TIMEOUT": "1s", "LOG_LEVEL": "debug", "LOG_FORMAT": "JSON", "DB_SCHEMA": "items_dev",
		"SHUTDOWN_DELAY": "0",
	}))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Port != 8080 || cfg.DBHost != "db" || cfg.DBPort != 6432 || cfg.CacheTTL != 300*time.Second ||
		cfg.DBQueryTimeout != 750*time.Millisecond || cfg.RedisTimeout != time.Second ||
		cfg.LogLevel != slog.LevelDebug || cfg.LogFormat != "json" || cfg.DBSchema != "items_dev" || cfg.ShutdownDelay != 0 {
		t.Errorf("got %+v", cfg)
	}
}

func TestLoadConfigErrors(t *testing.T) {
	tests := []struct{ name, value string }{
		{"PORT", "http"}, {"PORT", "70000"}, {"PORT", "-1"},
		{"DB_PORT", "0"}, {"DB_PORT", "5432x"},
		{"REDIS_PORT", "redis"},
		{"CACHE_TTL", "soon"}, {"CACHE_TTL", "0"}, {"CACHE_TTL", "-5s"}, {"CACHE_TTL", "10ns"}, {"CACHE_TTL", "99999999999999999"},
		{"DB_CONNECT_TIMEOUT", "forever"}, {"DB_QUERY_TIMEOUT", "0s"}, {"REDIS_TIMEOUT", "1x"}, {"SHUTDOWN_DELAY", "-1s"},
		{"DB_MAX_CONNS", "0"}, {"REDIS_DB", "16"}, {"DB_SSLMODE", "maybe"},
		{"DB_SCHEMA", "Robert'); DROP"}, {"DB_SCHEMA", "1abc"},
		{"LOG_LEVEL", "loud"}, {"LOG_FORMAT", "xml"},
		{"REDIS_SENTINEL_ADDRS", "s1"}, {"OUTBOX_POLL_INTERVAL", "1ns"}, {"OUTBOX_POLL_INTERVAL", "0"}, {"IDEMPOTENCY_KEY_TTL", "500ms"}, {"IDEMPOTENCY_KEY_TTL", "0"}, {"REQUIRE_IF_MATCH", "maybe"}, {"REDIS_SENTINEL_ADDRS", "s1:26379,,s2:26379"}, {"DB_HOST", "a,,b"}, {"DB_HOST", "db:x"}, {"DB_HOST", "db:0"}, {"DB_HOST", ","},
		{"DB_HOST", "db:5432:5433"}, {"DB_HOST", "db/x"}, {"DB_HOST", "db?x=1"}, {"DB_HOST", "a b"},
		{"DB_QUERY_EXEC_MODE", "fast"}, {"MIGRATE_ON_START", "maybe"},
	}
	for _, tc := range tests {
		_, err := loadConfig(envMap(map[string]string{tc.name: tc.value, "DB_PASSWORD": "hunter2"}))
		if err == nil {
			t.Errorf("%s=%q: no error; want one naming %s", tc.name, tc.value, tc.name)
			continue
		}
		if !strings.Contains(err.Error(), tc.name) {
			t.Errorf("%s=%q: error %q does not name %s", tc.name, tc.value, err, tc.name)
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("%s=%q: error %q shows the password", tc.name, tc.value, err)
		}
	}

	_, err := loadConfig(envMap(map[string]string{"PORT": "x", "CACHE_TTL": "y"}))
	if err == nil || !strings.Contains(err.Error(), "PORT") || !strings.Contains(err.Error(), "CACHE_TTL") {
		t.Errorf("two bad variables: %v; want both named", err)
	}
}

// TestDSN: what pgx is given, for one host and for several.
func TestDSN(t *testing.T) {
	for _, tc := range []struct{ env, want, wantNot string }{
		{"DB_HOST=db", "@db:5432/appdb?", "target_session_attrs"},
		{"DB_HOST=db1,db2:5433", "@db1:5432,db2:5433/appdb?", ""},
		{"DB_HOST=db1,db2", "target_session_attrs=read-write", ""},
		{"DB_HOST=::1", "@[::1]:5432/", ""},
		{"DB_HOST=[::1]:6432,db", "@[::1]:6432,db:5432/", ""},
		{"DB_QUERY_EXEC_MODE=exec", "default_query_exec_mode=exec", ""},
		{"", "default_query_exec_mode=cache_statement", ""},
	} {
		env := map[string]string{}
		if k, v, ok := strings.Cut(tc.env, "="); ok {
			env[k] = v
		}
		cfg, err := loadConfig(envMap(env))
		if err != nil {
			t.Fatalf("%s: %v", tc.env, err)
		}
		if dsn := cfg.dsn(); !strings.Contains(dsn, tc.want) || tc.wantNot != "" && strings.Contains(dsn, tc.wantNot) {
			t.Errorf("%s: DSN %s; want it to contain %q and not %q", tc.env, dsn, tc.want, tc.wantNot)
		}
		if _, err := pgx.ParseConfig(cfg.dsn()); err != nil {
			t.Errorf("%s: pgx cannot parse the DSN: %v", tc.env, err)
		}
	}
	cfg, _ := loadConfig(envMap(map[string]string{"DB_HOST": "db1,db2:5433"}))
	conf, _ := pgx.ParseConfig(cfg.dsn())
	hosts := []string{fmt.Sprintf("%s:%d", conf.Host, conf.Port)}
	for _, f := range conf.Fallbacks { // sslmode=prefer: each host with TLS, then without
		if h := fmt.Sprintf("%s:%d", f.Host, f.Port); h != hosts[len(hosts)-1] {
			hosts = append(hosts, h)
		}
	}
	if strings.Join(hosts, ",") != "db1:5432,db2:5433" {
		t.Errorf("pgx's hosts: %v; want db1:5432 then db2:5433", hosts)
	}
}

// TestConfigLogHidesSecrets: the startup log line shows the configuration
// but never a password.
func TestConfigLogHidesSecrets(t *testing.T) {
	cfg, err := loadConfig(envMap(map[string]string{"DB_PASSWORD": "pg-s3cret", "REDIS_PASSWORD": "redis-s3cret"}))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	slog.New(slog.NewJSONHandler(&buf, nil)).Info("starting", "config", cfg)
	out := buf.String()
	if strings.Contains(out, "s3cret") {
		t.Errorf("log line shows a password: %s", out)
	}
	for _, want := range []string{`"DB_HOST":"localhost"`, `"CACHE_TTL":60000000000`, `"DB_PASSWORD_SET":true`} {
		if !strings.Contains(out, want) {
			t.Errorf("log line %s lacks %s", out, want)
		}
	}
	if strings.Contains(cfg.dsn(), "pg-s3cret") == false {
		t.Errorf("DSN %q lacks the password", cfg.dsn())
	}
}

func TestSentinelConfig(t *testing.T) {
	if cfg, err := loadConfig(envMap(map[string]string{"REDIS_SENTINEL_ADDRS": "  "})); err != nil || cfg.sentinelAddrs() != nil || cfg.redisAddr() != "localhost:6379" {
		t.Errorf("blank REDIS_SENTINEL_ADDRS: %v, %q, %q; want it unset", err, cfg.sentinelAddrs(), cfg.redisAddr())
	}
	if _, err := loadConfig(envMap(map[string]string{"REDIS_SENTINEL_ADDRS": "s1:26379", "REDIS_MASTER_NAME": " "})); err == nil || !strings.Contains(err.Error(), "REDIS_MASTER_NAME") {
		t.Errorf("blank REDIS_MASTER_NAME with Sentinels: %v; want an error naming it", err)
	}
	cfg, err := loadConfig(envMap(map[string]string{"REDIS_SENTINEL_ADDRS": " s1:26379, s2:26380 ", "REDIS_MASTER_NAME": "items"}))
	if got := cfg.sentinelAddrs(); err != nil || len(got) != 2 || got[0] != "s1:26379" || got[1] != "s2:26380" {
		t.Errorf("REDIS_SENTINEL_ADDRS: %v %q", err, got)
	}
}

// TestSecretFiles: each password may come from a file named by its _FILE
// variable, one trailing newline dropped; both set, or a file that cannot
// be read, is an error naming the variables and not the secret.
func TestSecretFiles(t *testing.T) {
	dir := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cfg, err := loadConfig(envMap(map[string]string{
		"DB_PASSWORD_FILE":             file("db", "s3cret\n"),
		"REDIS_PASSWORD_FILE":          file("redis", "r-pass\r\n"),
		"REDIS_SENTINEL_PASSWORD_FILE": file("sentinel", "two\nlines\n"),
	}))
	if err != nil || cfg.DBPassword != "s3cret" || cfg.RedisPassword != "r-pass" || cfg.RedisSentinelPassword != "two\nlines" {
		t.Fatalf("from files: %q %q %q, %v; want s3cret, r-pass and the two lines", cfg.DBPassword, cfg.RedisPassword, cfg.RedisSentinelPassword, err)
	}
	for _, c := range []struct {
		env  map[string]string
		want []string
	}{
		{map[string]string{"DB_PASSWORD": "inline", "DB_PASSWORD_FILE": file("db2", "s3cret")}, []string{"DB_PASSWORD_FILE", "DB_PASSWORD:"}},
		{map[string]string{"REDIS_PASSWORD_FILE": filepath.Join(dir, "missing")}, []string{"REDIS_PASSWORD_FILE", "readable"}},
		{map[string]string{"DB_PASSWORD_FILE": file("empty", "\n")}, []string{"DB_PASSWORD_FILE", "empty file"}},
		{map[string]string{"DB_PASSWORD_FILE": "/dev/zero"}, []string{"DB_PASSWORD_FILE", "regular file"}},
		{map[string]string{"DB_PASSWORD_FILE": dir}, []string{"DB_PASSWORD_FILE", "regular file"}},
		{map[string]string{"DB_PASSWORD_FILE": file("big", strings.Repeat("x", maxSecretBytes+1))}, []string{"DB_PASSWORD_FILE", "at most"}},
	} {
		_, err := loadConfig(envMap(c.env))
		for _, w := range c.want {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Errorf("%v: %v; want an error naming %q", c.env, err, w)
			}
		}
		if err != nil && (strings.Contains(err.Error(), "s3cret") || strings.Contains(err.Error(), "inline")) {
			t.Errorf("%v: %v; want no secret in the error", c.env, err)
		}
	}
}
