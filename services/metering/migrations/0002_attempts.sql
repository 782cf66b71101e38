-- One row per attempt at a request: a retry before the first token (on another worker) is attempt 1, 2, ...
-- under the same request id, and is billed for what it did. Existing rows are attempt 0.
ALTER TABLE usage_events ADD COLUMN attempt integer NOT NULL DEFAULT 0 CHECK (attempt >= 0);
ALTER TABLE usage_events DROP CONSTRAINT usage_events_pkey;
ALTER TABLE usage_events ADD PRIMARY KEY (request_id, attempt);

-- A request as its caller saw it: the final (highest) attempt's outcome, worker and version, with the
-- tokens, media and cost of every attempt summed (the rollups count each attempt the same way).
CREATE VIEW usage_requests AS
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
    sum(cost_usd) OVER w AS cost_usd
FROM usage_events
WINDOW w AS (PARTITION BY request_id)
ORDER BY request_id, attempt DESC;
