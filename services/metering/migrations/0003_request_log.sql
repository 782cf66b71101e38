-- One row per request the edge served (contracts.requestlog); (request_id, seq) makes redeliveries no-ops.
CREATE TABLE request_log (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id        text NOT NULL,
    seq               integer NOT NULL DEFAULT 0,
    ts                timestamptz NOT NULL,
    key_id            text,
    tenant_id         text,
    kind              text NOT NULL,
    model             text NOT NULL,
    version           text NOT NULL DEFAULT '',
    provider          text,
    worker_id         text,
    attempts          integer NOT NULL DEFAULT 1,
    fallbacks         jsonb NOT NULL DEFAULT '[]',  -- [{"target": "model:version", "code": "<error code>"}, ...]
    status            text NOT NULL CHECK (status IN ('ok', 'error')),
    error_code        text,
    http_status       smallint NOT NULL DEFAULT 200,
    latency_ms        double precision NOT NULL DEFAULT 0,
    ttft_ms           double precision,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    streamed          boolean NOT NULL DEFAULT false,
    -- Bodies only when the key or tenant asked for them; the retention job clears them at expires_at.
    request_body      text,
    response_body     text,
    bodies_truncated  boolean NOT NULL DEFAULT false,
    expires_at        timestamptz,
    ingested_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (request_id, seq)
);

-- Newest first, paged by (ts, id) keyset: a backward scan of each index serves ORDER BY ts DESC, id DESC.
CREATE INDEX request_log_ts ON request_log (ts, id);
CREATE INDEX request_log_tenant ON request_log (tenant_id, ts, id);
CREATE INDEX request_log_key ON request_log (key_id, ts, id);
-- Only rows that still hold bodies: what the retention job clears.
CREATE INDEX request_log_expiring ON request_log (expires_at) WHERE expires_at IS NOT NULL;
