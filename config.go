package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"
)

// Config is the service's whole configuration, read once at startup from the
// environment by loadConfig. Variable names and defaults follow the original
// Flask design (DB_HOST, REDIS_PORT, ...); the defaults reach the PostgreSQL
// and Redis that compose.yaml publishes on localhost, so `go run .` works
// next to `docker compose up -d postgres redis`.
type Config struct {
	Port int // PORT: TCP port the HTTP server listens on; 0 picks a free one.

	DBHost           string        // DB_HOST: a host, or several (host1,host2:5433): the first that accepts writes is used.
	DBPort           int           // DB_PORT
	DBName           string        // DB_NAME
	DBUser           string        // DB_USER
	DBPassword       string        // DB_PASSWORD, or the file DB_PASSWORD_FILE names (see secret); never logged.
	DBSchema         string        // DB_SCHEMA: created if missing and put first on search_path; empty keeps the server's default (public).
	DBSSLMode        string        // DB_SSLMODE: libpq sslmode (disable, allow, prefer, require, verify-ca, verify-full).
	DBMaxConns       int           // DB_MAX_CONNS: size of the connection pool; retries may open a quarter more (Store.withConn).
	DBConnectTimeout time.Duration // DB_CONNECT_TIMEOUT: how long startup waits for PostgreSQL.
	DBQueryTimeout   time.Duration // DB_QUERY_TIMEOUT: bound on each query, including the wait for a pooled connection.
	DBQueryExecMode  string        // DB_QUERY_EXEC_MODE: pgx's default_query_exec_mode; exec or simple_protocol behind PgBouncer in transaction mode.
	MigrateOnStart   bool          // MIGRATE_ON_START: apply pending migrations at startup (true), or only check that none is pending (false).
	OutboxInterval   time.Duration // OUTBOX_POLL_INTERVAL: how often each replica applies the cache outbox to Redis; bounds how long an invalidation its writer could not deliver takes.
	// REQUIRE_IF_MATCH: refuse (428) a PUT, PATCH or DELETE without
	// If-Match, so that no client can overwrite a change it has not seen.
	RequireIfMatch    bool
	IdempotencyKeyTTL time.Duration // IDEMPOTENCY_KEY_TTL: how long a POST's Idempotency-Key and its response are kept for retries.

	RedisHost     string // REDIS_HOST
	RedisPort     int    // REDIS_PORT
	RedisUsername string // REDIS_USERNAME: an ACL user (Redis 6+); empty is the default user.
	RedisPassword string // REDIS_PASSWORD, or the file REDIS_PASSWORD_FILE names; never logged.
	// REDIS_SENTINEL_ADDRS: host:port of each Sentinel, comma-separated. When
	// set, the cache asks them for the master named REDIS_MASTER_NAME and
	// follows its failovers; REDIS_HOST and REDIS_PORT are then unused.
	RedisSentinelAddrs    string
	RedisMasterName       string        // REDIS_MASTER_NAME
	RedisSentinelUsername string        // REDIS_SENTINEL_USERNAME
	RedisSentinelPassword string        // REDIS_SENTINEL_PASSWORD, or the file REDIS_SENTINEL_PASSWORD_FILE names; never logged.
	RedisDB               int           // REDIS_DB: logical database number.
	RedisTimeout          time.Duration // REDIS_TIMEOUT: dial, read and write timeout of each Redis call.
	RedisRetry            time.Duration // REDIS_RETRY_INTERVAL: after a Redis failure, how long the cache is bypassed before Redis is probed again.

	CacheTTL       time.Duration // CACHE_TTL: lifetime of a cached item.
	CacheKeyPrefix string        // CACHE_KEY_PREFIX: cached items live at prefix+id.

	// SHUTDOWN_DELAY: how long the service goes on serving after SIGTERM,
	// while load balancers and kube-proxy stop sending it requests, before
	// it stops accepting; meanwhile every answer closes its connection and
	// /ready is 503. 0 (the default) stops at once.
	ShutdownDelay   time.Duration
	ShutdownTimeout time.Duration // SHUTDOWN_TIMEOUT: how long in-flight requests may run after SIGTERM (and SHUTDOWN_DELAY).
	LogLevel        slog.Level    // LOG_LEVEL: debug, info, warn or error.
	LogFormat       string        // LOG_FORMAT: text or json.
}

// loadConfig reads the configuration through getenv. An empty variable means
// its default. It returns one error naming every variable that is invalid,
// so a misconfigured container says everything that is wrong in one restart.
func loadConfig(getenv func(string) string) (Config, error) {
	p := envParser{getenv: getenv}
	c := Config{
		Port:              p.servicePort(),
		DBHost:            p.str("DB_HOST", "localhost"),
		DBPort:            p.port("DB_PORT", 5432, false),
		DBName:            p.str("DB_NAME", "appdb"),
		DBUser:            p.str("DB_USER", "appuser"),
		DBPassword:        p.secret("DB_PASSWORD", "secret"),
		DBSchema:          p.str("DB_SCHEMA", ""),
		DBSSLMode:         p.oneOf("DB_SSLMODE", "prefer", "disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
		DBMaxConns:        p.intRange("DB_MAX_CONNS", 16, 1, 1000),
		DBConnectTimeout:  p.duration("DB_CONNECT_TIMEOUT", 30*time.Second, false),
		DBQueryTimeout:    p.duration("DB_QUERY_TIMEOUT", 3*time.Second, false),
		DBQueryExecMode:   p.oneOf("DB_QUERY_EXEC_MODE", "cache_statement", "cache_statement", "cache_describe", "describe_exec", "exec", "simple_protocol"),
		MigrateOnStart:    p.boolean("MIGRATE_ON_START", true),
		OutboxInterval:    p.duration("OUTBOX_POLL_INTERVAL", 250*time.Millisecond, false),
		RequireIfMatch:    p.boolean("REQUIRE_IF_MATCH", false),
		IdempotencyKeyTTL: p.duration("IDEMPOTENCY_KEY_TTL", 24*time.Hour, false),

		RedisHost:             p.str("REDIS_HOST", "localhost"),
		RedisPort:             p.port("REDIS_PORT", 6379, false),
		RedisUsername:         p.str("REDIS_USERNAME", ""),
		RedisPassword:         p.secret("REDIS_PASSWORD", ""),
		RedisSentinelAddrs:    p.str("REDIS_SENTINEL_ADDRS", ""),
		RedisMasterName:       p.str("REDIS_MASTER_NAME", "mymaster"),
		RedisSentinelUsername: p.str("REDIS_SENTINEL_USERNAME", ""),
		RedisSentinelPassword: p.secret("REDIS_SENTINEL_PASSWORD", ""),
		RedisDB:               p.intRange("REDIS_DB", 0, 0, 15),
		RedisTimeout:          p.duration("REDIS_TIMEOUT", 200*time.Millisecond, false),
		RedisRetry:            p.duration("REDIS_RETRY_INTERVAL", time.Second, false),

		CacheTTL:       p.duration("CACHE_TTL", 60*time.Second, false),
		CacheKeyPrefix: p.str("CACHE_KEY_PREFIX", "item:"),

		ShutdownDelay:   p.duration("SHUTDOWN_DELAY", 0, true),
		ShutdownTimeout: p.duration("SHUTDOWN_TIMEOUT", 5*time.Second, false),
		LogFormat:       p.oneOf("LOG_FORMAT", "text", "text", "json"),
	}
	if v := getenv("LOG_LEVEL"); v != "" {
		if err := c.LogLevel.UnmarshalText([]byte(v)); err != nil {
			p.fail("LOG_LEVEL", v, "must be debug, info, warn or error")
		}
	}
	for _, h := range strings.Split(c.DBHost, ",") {
		if host, port := splitHostPort(h); !validHost(host) || port != "" && !validPort(port) {
			p.fail("DB_HOST", c.DBHost, "must be a host or a comma-separated list of hosts, each with an optional :port")
			break
		}
	}
	if strings.TrimSpace(c.RedisSentinelAddrs) == "" {
		c.RedisSentinelAddrs = "" // blank is unset, as for every variable
	}
	if c.RedisSentinelAddrs != "" && strings.TrimSpace(c.RedisMasterName) == "" {
		p.fail("REDIS_MASTER_NAME", getenv("REDIS_MASTER_NAME"), "must name the master the Sentinels monitor")
	}
	if c.OutboxInterval > 0 && c.OutboxInterval < 10*time.Millisecond {
		p.fail("OUTBOX_POLL_INTERVAL", getenv("OUTBOX_POLL_INTERVAL"), "must be at least 10ms (each poll is a PostgreSQL transaction)")
	}
	for _, a := range c.sentinelAddrs() {
		if host, port := splitHostPort(a); !validHost(host) || !validPort(port) {
			p.fail("REDIS_SENTINEL_ADDRS", getenv("REDIS_SENTINEL_ADDRS"), "must be a comma-separated list of host:port (Sentinel's port is usually 26379)")
			break
		}
	}
	if c.DBSchema != "" && !validIdentifier(c.DBSchema) {
		p.fail("DB_SCHEMA", c.DBSchema, "must be lowercase letters, digits and underscores, not starting with a digit")
	}
	if c.IdempotencyKeyTTL > 0 && c.IdempotencyKeyTTL < time.Second {
		p.fail("IDEMPOTENCY_KEY_TTL", getenv("IDEMPOTENCY_KEY_TTL"), "must be at least 1s (keys are kept for retries, which come seconds to hours later)")
	}
	if c.CacheTTL > 0 && c.CacheTTL < time.Millisecond {
		p.fail("CACHE_TTL", getenv("CACHE_TTL"), "must be at least 1ms (Redis expiry resolution)")
	}
	return c, errors.Join(p.errs...)
}

// LogValue lists the effective configuration for the startup log line,
// leaving out DB_PASSWORD and REDIS_PASSWORD: it says only whether each is set.
func (c Config) LogValue() slog.Value {
	return slog.GroupValue(
		slog.Int("PORT", c.Port),
		slog.String("DB_HOST", c.DBHost),
		slog.Int("DB_PORT", c.DBPort),
		slog.String("DB_NAME", c.DBName),
		slog.String("DB_USER", c.DBUser),
		slog.Bool("DB_PASSWORD_SET", c.DBPassword != ""),
		slog.String("DB_SCHEMA", c.DBSchema),
		slog.String("DB_SSLMODE", c.DBSSLMode),
		slog.Int("DB_MAX_CONNS", c.DBMaxConns),
		slog.Duration("DB_CONNECT_TIMEOUT", c.DBConnectTimeout),
		slog.Duration("DB_QUERY_TIMEOUT", c.DBQueryTimeout),
		slog.String("DB_QUERY_EXEC_MODE", c.DBQueryExecMode),
		slog.Bool("MIGRATE_ON_START", c.MigrateOnStart),
		slog.Duration("OUTBOX_POLL_INTERVAL", c.OutboxInterval),
		slog.Bool("REQUIRE_IF_MATCH", c.RequireIfMatch),
		slog.Duration("IDEMPOTENCY_KEY_TTL", c.IdempotencyKeyTTL),
		slog.String("REDIS_HOST", c.RedisHost),
		slog.Int("REDIS_PORT", c.RedisPort),
		slog.String("REDIS_USERNAME", c.RedisUsername),
		slog.Bool("REDIS_PASSWORD_SET", c.RedisPassword != ""),
		slog.String("REDIS_SENTINEL_ADDRS", c.RedisSentinelAddrs),
		slog.String("REDIS_MASTER_NAME", c.RedisMasterName),
		slog.String("REDIS_SENTINEL_USERNAME", c.RedisSentinelUsername),
		slog.Bool("REDIS_SENTINEL_PASSWORD_SET", c.RedisSentinelPassword != ""),
		slog.Int("REDIS_DB", c.RedisDB),
		slog.Duration("REDIS_TIMEOUT", c.RedisTimeout),
		slog.Duration("REDIS_RETRY_INTERVAL", c.RedisRetry),
		slog.Duration("CACHE_TTL", c.CacheTTL),
		slog.String("CACHE_KEY_PREFIX", c.CacheKeyPrefix),
		slog.Duration("SHUTDOWN_DELAY", c.ShutdownDelay),
		slog.Duration("SHUTDOWN_TIMEOUT", c.ShutdownTimeout),
		slog.String("LOG_LEVEL", c.LogLevel.String()),
		slog.String("LOG_FORMAT", c.LogFormat),
	)
}

// dbAddrs is DB_HOST's hosts as host:port, comma-separated, with DB_PORT
// for those that give no port of their own.
func (c Config) dbAddrs() string {
	hosts := strings.Split(c.DBHost, ",")
	for i, h := range hosts {
		host, port := splitHostPort(h)
		if port == "" {
			port = strconv.Itoa(c.DBPort)
		}
		hosts[i] = net.JoinHostPort(host, port)
	}
	return strings.Join(hosts, ",")
}

// splitHostPort splits "host", "host:port", "[v6]" or "[v6]:port"; a bare
// IPv6 address ("::1") is a host.
func splitHostPort(s string) (host, port string) {
	s = strings.TrimSpace(s)
	if h, p, err := net.SplitHostPort(s); err == nil {
		return h, p
	}
	return strings.Trim(s, "[]"), ""
}

// validHost accepts a name or an IP address: no spaces or URL delimiters,
// and a colon only in an IPv6 address.
func validHost(h string) bool {
	if h == "" || strings.ContainsAny(h, "/?#@[] \t") {
		return false
	}
	return !strings.Contains(h, ":") || net.ParseIP(h) != nil
}

func validPort(s string) bool {
	n, err := strconv.Atoi(s)
	return err == nil && n >= 1 && n <= 65535
}

// redisAddr is REDIS_HOST:REDIS_PORT, bracketing an IPv6 host, or the
// master's name and its Sentinels, for logs.
func (c Config) redisAddr() string {
	if c.RedisSentinelAddrs != "" {
		return c.RedisMasterName + " via sentinels " + strings.Join(c.sentinelAddrs(), ",")
	}
	return net.JoinHostPort(c.RedisHost, strconv.Itoa(c.RedisPort))
}

// sentinelAddrs is REDIS_SENTINEL_ADDRS as a list of host:port, or nil.
func (c Config) sentinelAddrs() []string {
	if strings.TrimSpace(c.RedisSentinelAddrs) == "" {
		return nil
	}
	addrs := strings.Split(c.RedisSentinelAddrs, ",")
	for i, a := range addrs {
		addrs[i] = strings.TrimSpace(a)
	}
	return addrs
}

// envParser reads variables and collects one error per invalid value.
type envParser struct {
	getenv func(string) string
	errs   []error
}

func (p *envParser) fail(name, value, rule string) {
	p.errs = append(p.errs, fmt.Errorf("invalid %s=%q: %s", name, value, rule))
}

func (p *envParser) str(name, def string) string {
	if v := p.getenv(name); v != "" {
		return v
	}
	return def
}

// secret reads a password: the variable name, or the contents of the file
// that name_FILE names (a Docker or Kubernetes secret mounted as a file),
// less one trailing newline, as the postgres image reads
// POSTGRES_PASSWORD_FILE. Setting both is an error naming both, and so is a
// file that cannot be read; neither error shows the secret.
func (p *envParser) secret(name, def string) string {
	file := p.getenv(name + "_FILE")
	if file == "" {
		return p.str(name, def)
	}
	if p.getenv(name) != "" {
		p.fail(name+"_FILE", file, "cannot be set together with "+name+": set one of them")
		return def
	}
	// A regular file (a mounted secret is one, behind Kubernetes'
	// symlinks), so that a device or a pipe named by mistake can neither
	// fill the memory nor hold the start up; and not empty, which would be
	// a password of none.
	info, err := os.Stat(file)
	if err == nil && (!info.Mode().IsRegular() || info.Size() > maxSecretBytes) {
		err = fmt.Errorf("not a regular file of at most %d bytes", maxSecretBytes)
	}
	var b []byte
	if err == nil {
		b, err = os.ReadFile(file)
	}
	if err != nil {
		p.fail(name+"_FILE", file, "must name a readable file: "+err.Error())
		return def
	}
	secret := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	if secret == "" {
		p.fail(name+"_FILE", file, "names an empty file: put the secret in it, or leave "+name+"_FILE unset")
		return def
	}
	return secret
}

// maxSecretBytes bounds a secret's file: a password or a key, not data.
const maxSecretBytes = 64 << 10

// healthcheckPort reads PORT alone, for `items healthcheck`.
func healthcheckPort(getenv func(string) string) (int, error) {
	p := envParser{getenv: getenv}
	port := p.servicePort()
	return port, errors.Join(p.errs...)
}

// servicePort is PORT, the API's: 0 picks a free one.
func (p *envParser) servicePort() int { return p.port("PORT", 5000, true) }

func (p *envParser) intRange(name string, def, lo, hi int) int {
	v := p.getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || n < lo || n > hi {
		p.fail(name, v, fmt.Sprintf("must be a whole number from %d to %d", lo, hi))
		return def
	}
	return n
}

// port accepts 1-65535, and 0 too where zeroOK (listen on a free port).
func (p *envParser) port(name string, def int, zeroOK bool) int {
	lo := 1
	if zeroOK {
		lo = 0
	}
	return p.intRange(name, def, lo, 65535)
}

// duration accepts a Go duration ("1m30s", "250ms") or a bare whole number
// of seconds ("60"), as the original design's CACHE_TTL was. It must be positive.
func (p *envParser) duration(name string, def time.Duration, zeroOK bool) time.Duration {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if n, nerr := strconv.ParseInt(v, 10, 64); nerr == nil {
		d, err = time.Duration(n)*time.Second, nil
		if n > int64(1<<63-1)/int64(time.Second) {
			err = errors.New("too large")
		}
	}
	if err != nil || d < 0 || d == 0 && !zeroOK {
		rule := `must be a positive duration such as "60s", "500ms" or a number of seconds`
		if zeroOK {
			rule = `must be 0 or a duration such as "10s", "500ms" or a number of seconds`
		}
		p.fail(name, v, rule)
		return def
	}
	return d
}

// boolean accepts true or false (and 1, 0, yes, no, on, off).
func (p *envParser) boolean(name string, def bool) bool {
	switch v := strings.ToLower(strings.TrimSpace(p.getenv(name))); v {
	case "":
		return def
	case "true", "1", "yes", "on":
		return true
	case "false", "0", "no", "off":
		return false
	}
	p.fail(name, p.getenv(name), "must be true or false")
	return def
}

func (p *envParser) oneOf(name, def string, allowed ...string) string {
	v := strings.TrimSpace(p.getenv(name))
	if v == "" {
		return def
	}
	for _, a := range allowed {
		if strings.EqualFold(v, a) {
			return a
		}
	}
	p.fail(name, v, "must be one of "+strings.Join(allowed, ", "))
	return def
}

// validIdentifier reports whether s can be used unquoted as a PostgreSQL
// schema name without surprises (no quoting, no case folding): [a-z_][a-z0-9_]*, at most 63 bytes
// (NAMEDATALEN-1, PostgreSQL docs "Identifiers and Key Words").
func validIdentifier(s string) bool {
	if s == "" || len(s) > 63 {
		return false
	}
	for i, r := range s {
		switch {
		case r == '_', r >= 'a' && r <= 'z':
		case r >= '0' && r <= '9' && i > 0:
		default:
			return false
		}
	}
	return true
}
