// Command items is a JSON API for items, stored in PostgreSQL and cached
// in Redis by cache-aside. See README.md for the API and the walkthrough.
//
// The files, each using only those after it: main.go (the process),
// http.go (routes, handlers, JSON, errors, the request log), metrics.go
// (GET /metrics), items.go
// (cache-aside reads, invalidation after writes, validation), cache.go and
// cache_outages.go (Redis), db.go (PostgreSQL), migrate.go (the schema's
// migrations: schema.sql, then migrations/), config.go (the environment).
package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args, os.Getenv, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "items:", err)
		os.Exit(1)
	}
}

// run is the whole program: `items` serves until ctx ends, then, after
// SHUTDOWN_DELAY of serving on as a leaving replica, shuts down gracefully
// and returns nil; `items migrate` applies the pending schema
// migrations and exits (a deployment's one-off job before it starts new
// replicas); `items healthcheck` asks /health on this machine and returns
// an error unless it answers 200 (the container image has no shell or
// curl for a health check). Logs go to stdout.
func run(ctx context.Context, args []string, getenv func(string) string, stdout io.Writer) error {
	command := ""
	if len(args) > 1 {
		command = args[1]
	}
	switch command {
	case "", "migrate":
	case "healthcheck":
		// PORT alone: the rest (a secret's file, say) is the service's
		// business, read at its start, not every health check's.
		port, err := healthcheckPort(getenv)
		if err != nil {
			return err
		}
		return healthcheck(ctx, port)
	default:
		return fmt.Errorf("unknown command %q; run with no arguments to serve, or with migrate or healthcheck", command)
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	out := newLogWriter(stdout, logFlushInterval)
	defer out.Close()
	log := newLogger(cfg, out)
	if command == "migrate" {
		log.Info("migrating", "config", cfg)
		cfg.MigrateOnStart = true
		store, err := openStore(ctx, cfg, log)
		if err != nil {
			return err
		}
		return store.Close()
	}
	log.Info("starting", "config", cfg)
	if cfg.ShutdownTimeout <= cfg.DBQueryTimeout {
		log.Warn("SHUTDOWN_TIMEOUT is not above DB_QUERY_TIMEOUT: requests still waiting on PostgreSQL at shutdown may be cut off",
			"SHUTDOWN_TIMEOUT", cfg.ShutdownTimeout, "DB_QUERY_TIMEOUT", cfg.DBQueryTimeout)
	}

	store, err := openStore(ctx, cfg, log)
	if err != nil {
		if ctx.Err() != nil {
			log.Info("stopped while waiting for PostgreSQL")
			return nil
		}
		return err
	}
	defer store.Close()
	cache := newCache(cfg, itemShape, log)
	defer cache.Close()
	// Redis is optional: if it is down, Ping logs so and the service starts
	// without it, probing again every REDIS_RETRY_INTERVAL.
	cache.Ping(ctx)

	ln, err := net.Listen("tcp", ":"+strconv.Itoa(cfg.Port))
	if err != nil {
		return err
	}
	// Shutdown starts draining; request bodies still arriving then get
	// drainGrace to finish (see decode).
	draining := newDrainer()
	defer draining.cancel() // releases the context if shutdown never began
	var fresh sync.Map      // connections with no request yet: net.Conn -> true
	items := newItems(store, cache)
	srv := &http.Server{
		Handler:           newServer(cfg, log, items),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       15 * time.Second,
		WriteTimeout:      cfg.DBQueryTimeout + 15*time.Second,
		IdleTimeout:       90 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		BaseContext: func(net.Listener) context.Context {
			return context.WithValue(context.Background(), drainingKey{}, draining)
		},
		ConnState: func(c net.Conn, state http.ConnState) {
			switch state {
			case http.StateNew:
				fresh.Store(c, true)
			case http.StateActive, http.StateHijacked, http.StateClosed:
				// Not StateIdle: a connection is idle only after it was
				// active, so it has left fresh already; this runs twice
				// per request.
				fresh.Delete(c)
			}
		},
	}
	// Shutdown closes idle connections, but waits up to 5 s for one that
	// has sent no request yet (a browser's preconnect, say), which would
	// outlast SHUTDOWN_TIMEOUT; such connections hold no request, so they
	// are closed at once.
	srv.RegisterOnShutdown(func() {
		draining.start()
		fresh.Range(func(c, _ any) bool {
			c.(net.Conn).Close()
			return true
		})
	})
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Info("listening", "addr", ln.Addr().String())

	select {
	case err := <-serveErr:
		return err
	case <-ctx.Done():
	}
	if cfg.ShutdownDelay > 0 {
		log.Info("leaving: serving on for SHUTDOWN_DELAY while load balancers drop this replica; every answer closes its connection", "delay", cfg.ShutdownDelay)
		draining.leave()
		select {
		case err := <-serveErr:
			return err
		case <-time.After(cfg.ShutdownDelay):
		}
	}
	log.Info("shutting down; finishing in-flight requests", "timeout", cfg.ShutdownTimeout)
	shutdownCtx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		// Cut the requests off, and their statements: a write still
		// running in PostgreSQL could commit after the process exits and
		// never invalidate the cache. Cut, it ends with an unknown outcome,
		// and invalidates its item (one Redis call, bounded by
		// REDIS_TIMEOUT) before the cache is closed.
		srv.Close()
		store.Cut()
		items.WaitWrites(cfg.RedisTimeout + time.Second)
		return fmt.Errorf("shutdown: requests still running after SHUTDOWN_TIMEOUT=%s were cut off: %w", cfg.ShutdownTimeout, err)
	}
	if err := <-serveErr; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	store.Cut() // no request is left; this stops the outbox relay before the cache is closed
	log.Info("stopped")
	return nil
}

// newLogger is slog in the LOG_FORMAT and at the LOG_LEVEL of cfg.
func newLogger(cfg Config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// logFlushInterval bounds how long a log line waits in logWriter's buffer.
const logFlushInterval = 100 * time.Millisecond

// logWriter buffers log lines and writes them out at least every interval
// and when the buffer fills, rather than with one write system call per
// line, which under load cost as much as the rest of a cache hit. Lines
// keep their order; Close writes out the rest.
type logWriter struct {
	mu   sync.Mutex
	buf  *bufio.Writer
	stop chan struct{}
	done chan struct{}
}

func newLogWriter(w io.Writer, interval time.Duration) *logWriter {
	lw := &logWriter{buf: bufio.NewWriterSize(w, 64<<10), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(lw.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-lw.stop:
				return
			case <-t.C:
				lw.mu.Lock()
				lw.buf.Flush()
				lw.mu.Unlock()
			}
		}
	}()
	return lw
}

func (lw *logWriter) Write(p []byte) (int, error) {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return lw.buf.Write(p)
}

// Close stops the flushing and writes out what is buffered.
func (lw *logWriter) Close() error {
	close(lw.stop)
	<-lw.done
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return lw.buf.Flush()
}

// healthcheck exits the container's health check: nil if GET /health on
// localhost answers 200 within 2 s.
func healthcheck(ctx context.Context, port int) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	url := "http://127.0.0.1:" + strconv.Itoa(port) + "/health"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: %s answered %s", url, resp.Status)
	}
	return nil
}
