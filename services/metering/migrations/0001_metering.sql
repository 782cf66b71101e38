-- One row per request a worker accepted, whatever its outcome; the request id makes redeliveries no-ops.
CREATE TABLE usage_events (
    request_id        text PRIMARY KEY,
    kind              text NOT NULL,
    model             text NOT NULL,
    version           text NOT NULL,
    worker_id         text NOT NULL,
    outcome           text NOT NULL,
    tenant_id         text,
    key_id            text,
    started_at        timestamptz NOT NULL,
    finished_at       timestamptz NOT NULL,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    audio_seconds_in  double precision NOT NULL DEFAULT 0,
    audio_seconds_out double precision NOT NULL DEFAULT 0,
    characters_out    bigint NOT NULL DEFAULT 0,
    images            integer NOT NULL DEFAULT 0,
    shadow            boolean NOT NULL DEFAULT false,
    cost_usd          numeric NOT NULL DEFAULT 0,  -- priced at ingest; 0 for shadow copies and our own failures
    ingested_at       timestamptz NOT NULL DEFAULT now()
);

-- BRIN: events arrive roughly in time order, and a B-tree here would cost the ingest path dearly.
CREATE INDEX usage_events_finished ON usage_events USING brin (finished_at);
CREATE INDEX usage_events_shadow ON usage_events (finished_at) WHERE shadow;

-- Billed traffic summed per UTC minute, hour and day (bucket = its start); no tenant or key is ''.
CREATE TABLE usage_rollups (
    granularity       text NOT NULL CHECK (granularity IN ('minute', 'hour', 'day')),
    bucket            timestamptz NOT NULL,
    tenant_id         text NOT NULL,
    key_id            text NOT NULL,
    model             text NOT NULL,
    kind              text NOT NULL,
    requests          bigint NOT NULL,
    cancelled         bigint NOT NULL,
    failed            bigint NOT NULL,
    prompt_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    audio_seconds_in  double precision NOT NULL,
    audio_seconds_out double precision NOT NULL,
    characters        bigint NOT NULL,
    images            bigint NOT NULL,
    cost_usd          numeric NOT NULL,
    PRIMARY KEY (granularity, bucket, tenant_id, key_id, model, kind)
) WITH (fillfactor = 70);  -- room on each page, so adding to a row is a HOT update that touches no index

CREATE INDEX usage_rollups_tenant ON usage_rollups (tenant_id, granularity, bucket);

-- USD prices; version '*' applies to every version of the model without a row of its own.
CREATE TABLE prices (
    model            text NOT NULL,
    version          text NOT NULL,
    input_per_1m     numeric NOT NULL CHECK (input_per_1m >= 0),
    output_per_1m    numeric NOT NULL CHECK (output_per_1m >= 0),
    per_audio_second numeric NOT NULL DEFAULT 0 CHECK (per_audio_second >= 0),
    per_image        numeric NOT NULL DEFAULT 0 CHECK (per_image >= 0),
    currency         text NOT NULL DEFAULT 'USD' CHECK (currency = 'USD'),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    updated_by       text NOT NULL DEFAULT '',
    PRIMARY KEY (model, version)
);
