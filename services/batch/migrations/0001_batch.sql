-- Files: the bytes are in the JetStream object store INFERBUS_FILES under `id`; this is who owns them.
CREATE TABLE batch_files (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL,
    key_id      text,
    filename    text NOT NULL,
    purpose     text NOT NULL,
    bytes       bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    deleted_at  timestamptz
);
CREATE INDEX batch_files_tenant ON batch_files (tenant_id, created_at DESC, id DESC) WHERE deleted_at IS NULL;
CREATE INDEX batch_files_expiry ON batch_files (expires_at) WHERE deleted_at IS NULL AND expires_at IS NOT NULL;

CREATE TABLE batches (
    id                text PRIMARY KEY,
    tenant_id         text NOT NULL,
    key_id            text NOT NULL,
    scopes            text[] NOT NULL,
    endpoint          text NOT NULL,
    input_file_id     text NOT NULL,
    completion_window text NOT NULL,
    status            text NOT NULL,
    metadata          jsonb,
    errors            jsonb,
    models            text[] NOT NULL DEFAULT '{}',
    total             integer NOT NULL DEFAULT 0,
    enqueued          integer NOT NULL DEFAULT 0,  -- lines on the work queue so far (resumed after a crash)
    completed         integer NOT NULL DEFAULT 0,
    failed            integer NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    output_file_id    text,
    error_file_id     text,
    webhook_url       text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    in_progress_at    timestamptz,
    expires_at        timestamptz NOT NULL,
    finalizing_at     timestamptz,
    completed_at      timestamptz,
    failed_at         timestamptz,
    expired_at        timestamptz,
    cancelling_at     timestamptz,
    cancelled_at      timestamptz
);
CREATE INDEX batches_tenant ON batches (tenant_id, created_at DESC, id DESC);
CREATE INDEX batches_active ON batches (status) WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');

-- One row per answered line: the primary key makes every custom_id answered exactly once, whatever
-- is redelivered or re-run. `done` orders the output file by completion; `record` is its JSONL line.
CREATE TABLE batch_results (
    batch_id  text NOT NULL,
    line      integer NOT NULL,
    ok        boolean NOT NULL,
    record    bytea NOT NULL,
    done      bigserial,
    PRIMARY KEY (batch_id, line)
);

-- Lines that were retried: how often, and the next bus attempt number (so a re-run is never mistaken
-- for the attempt a worker already counted, nor counted twice when its fate is unknown).
CREATE TABLE batch_retries (
    batch_id text NOT NULL,
    line     integer NOT NULL,
    tries    integer NOT NULL,
    attempt  integer NOT NULL,
    PRIMARY KEY (batch_id, line)
);

-- Webhooks: one endpoint and signing secret (Standard Webhooks, whsec_...) per API key.
CREATE TABLE batch_webhooks (
    key_id     text PRIMARY KEY,
    tenant_id  text NOT NULL,
    url        text,
    secret     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE batch_deliveries (
    event_id      text PRIMARY KEY,
    batch_id      text NOT NULL,
    tenant_id     text NOT NULL,
    key_id        text NOT NULL,
    type          text NOT NULL,
    url           text NOT NULL,
    payload       bytea NOT NULL,
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    next_at       timestamptz NOT NULL DEFAULT now(),
    last_status   integer,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    delivered_at  timestamptz
);
CREATE INDEX batch_deliveries_due ON batch_deliveries (next_at) WHERE status = 'pending';
CREATE INDEX batch_deliveries_batch ON batch_deliveries (batch_id, created_at DESC);
