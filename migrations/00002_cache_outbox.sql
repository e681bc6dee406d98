-- +goose Up
-- The cache's transactional outbox: every UPDATE or DELETE of an item adds
-- a row here in the same statement, so the invalidation it owes Redis
-- commits with the change. The replica that made the write invalidates
-- Redis itself, at once; every replica's relay also applies the rows to
-- Redis and deletes them (outbox.go), so an invalidation that the writer
-- could not deliver (Redis unreachable from it, or the process killed
-- after the commit) still reaches Redis, within OUTBOX_POLL_INTERVAL.
-- floor: the item's cached versions below it are stale.
CREATE TABLE IF NOT EXISTS cache_outbox (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    item_id BIGINT NOT NULL,
    floor   BIGINT NOT NULL,
    created TIMESTAMPTZ NOT NULL DEFAULT now()
);
