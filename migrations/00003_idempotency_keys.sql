-- +goose Up
-- Idempotency keys of POST /items (the Idempotency-Key header, IETF
-- draft-ietf-httpapi-idempotency-key-header): a row per key, written in the
-- transaction that inserts the item, holding a fingerprint of the request
-- and the response it got, so that a retry with the same key and request
-- gets that response again and creates nothing. Rows older than
-- IDEMPOTENCY_KEY_TTL are deleted in small batches by every replica
-- (Store.ExpireKeys), by the index on created.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key         TEXT PRIMARY KEY,
    fingerprint BYTEA NOT NULL,       -- SHA-256 of the request, as Items.CreateOnce makes it
    status      INTEGER NOT NULL,     -- the response: status, Location, ETag and body
    location    TEXT NOT NULL,
    etag        TEXT NOT NULL,
    body        TEXT NOT NULL,
    created     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created);
