-- The Responses API's stored responses (store: true, the default): what GET /v1/responses/{id} returns, and the
-- conversation up to and including it, which a request with previous_response_id continues. Tenant-scoped.
CREATE TABLE IF NOT EXISTS responses (
    id                   text PRIMARY KEY,
    tenant_id            text NOT NULL,
    key_id               text,
    model                text NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    previous_response_id text,
    response             jsonb NOT NULL,
    input_items          jsonb NOT NULL,
    history              jsonb NOT NULL   -- the conversation as bus Messages (contracts.llm.Message), in order
);
CREATE INDEX IF NOT EXISTS responses_tenant_created ON responses (tenant_id, created_at);
