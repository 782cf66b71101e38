-- Batch lines: each event keeps its batch (null: interactive), and a price may give batch work a discount.
ALTER TABLE usage_events ADD COLUMN batch_id text;

-- The fraction taken off a batch line's cost: 0 none (the default), 0.5 half price, 1 free.
ALTER TABLE prices ADD COLUMN batch_discount numeric NOT NULL DEFAULT 0
    CHECK (batch_discount >= 0 AND batch_discount <= 1);

-- Rollups keep batch and interactive traffic apart, so usage reports can split or filter them. Existing
-- rows are interactive: no batch ran before this migration.
ALTER TABLE usage_rollups ADD COLUMN batch boolean NOT NULL DEFAULT false;
ALTER TABLE usage_rollups DROP CONSTRAINT usage_rollups_pkey;
ALTER TABLE usage_rollups ADD PRIMARY KEY (granularity, bucket, tenant_id, key_id, model, kind, batch);

-- The request view carries the batch too (a new column goes last, so the view is replaced in place).
CREATE OR REPLACE VIEW usage_requests AS
SELECT DISTINCT ON (request_id)
    request_id,
    attempt AS final_attempt,
    count(*) OVER w AS attempts,
    kind, model, version, worker_id, outcome, tenant_id, key_id, shadow,
    min(started_at) OVER w AS started_at,
    finished_at,
    sum(prompt_tokens) OVER w AS prompt_tokens,
    sum(completion_tokens) OVER w AS completion_tokens,
    sum(audio_seconds_in) OVER w AS audio_seconds_in,
    sum(audio_seconds_out) OVER w AS audio_seconds_out,
    sum(characters_out) OVER w AS characters_out,
    sum(images) OVER w AS images,
    sum(cost_usd) OVER w AS cost_usd,
    batch_id
FROM usage_events
WINDOW w AS (PARTITION BY request_id)
ORDER BY request_id, attempt DESC;
