CREATE TABLE tenants (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    limits      jsonb NOT NULL DEFAULT '{}',
    budget      jsonb NOT NULL DEFAULT '{}',
    metadata    jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO tenants (id, name) VALUES ('default', 'default');

ALTER TABLE api_keys
    ADD COLUMN tenant_id    text NOT NULL DEFAULT 'default' REFERENCES tenants(id),
    ADD COLUMN limits       jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN model_limits jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN budget       jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN metadata     jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN rotated_from text;
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

-- Who did what to tenants and keys (never the key itself).
CREATE TABLE tenancy_audit (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL,
    subject text NOT NULL,
    detail  jsonb NOT NULL DEFAULT '{}'
);
