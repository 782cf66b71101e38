-- Remote provider secrets (api keys), encrypted with AES-256-GCM by the registry; the row's identity
-- (model, version, name) is the authenticated data, so a ciphertext cannot be moved to another row.
CREATE TABLE registry_secrets (
    model       text NOT NULL,
    version     text NOT NULL,
    name        text NOT NULL,
    nonce       bytea NOT NULL,
    ciphertext  bytea NOT NULL,
    key_id      text NOT NULL,   -- which key sealed it (the first bytes of its SHA-256)
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version, name),
    FOREIGN KEY (model, version) REFERENCES registry_versions (model, version)
);
