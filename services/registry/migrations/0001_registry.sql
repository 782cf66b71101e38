CREATE TABLE registry_models (
    name        text PRIMARY KEY,
    kind        text NOT NULL,
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE registry_versions (
    model       text NOT NULL REFERENCES registry_models(name),
    version     text NOT NULL,
    engine      text NOT NULL,
    params      jsonb NOT NULL DEFAULT '{}',
    status      text NOT NULL DEFAULT 'registered',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);

-- One traffic policy per model; `revision` orders the routing tables gateways receive.
CREATE TABLE registry_policies (
    model       text PRIMARY KEY REFERENCES registry_models(name),
    policy      jsonb NOT NULL,
    revision    bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Every change, append-only: updates and deletes are refused by the database itself.
CREATE TABLE registry_audit (
    id      bigserial PRIMARY KEY,
    model   text NOT NULL,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL,
    reason  text NOT NULL DEFAULT '',
    before  jsonb,
    after   jsonb
);
CREATE INDEX registry_audit_model ON registry_audit (model, id DESC);

CREATE FUNCTION registry_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'registry_audit is append-only';
END $$;
CREATE TRIGGER registry_audit_no_change BEFORE UPDATE OR DELETE ON registry_audit
    FOR EACH ROW EXECUTE FUNCTION registry_audit_append_only();

CREATE TABLE registry_shadow (
    id                  bigserial PRIMARY KEY,
    model               text NOT NULL,
    at                  timestamptz NOT NULL DEFAULT now(),
    request_id          text NOT NULL,
    version             text NOT NULL,
    shadow_version      text NOT NULL,
    latency_ms          real NOT NULL,
    shadow_latency_ms   real NOT NULL,
    error               text,
    shadow_error        text,
    output_chars        integer NOT NULL,
    shadow_output_chars integer NOT NULL,
    similarity          real
);
CREATE INDEX registry_shadow_model ON registry_shadow (model, id DESC);
