-- Request logging: whether bodies go into the request log, and for how many days. A tenant always has a
-- setting; a key's NULL means its tenant's.
ALTER TABLE tenants
    ADD COLUMN log_bodies         boolean NOT NULL DEFAULT false,
    ADD COLUMN log_retention_days integer NOT NULL DEFAULT 7 CHECK (log_retention_days BETWEEN 1 AND 3650);
ALTER TABLE api_keys
    ADD COLUMN log_bodies         boolean,
    ADD COLUMN log_retention_days integer CHECK (log_retention_days BETWEEN 1 AND 3650);
