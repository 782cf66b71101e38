-- Response cache per API key (services/gateway/cache.py): `cache` 'default' follows the request (deterministic
-- requests, or `x-inferbus-cache: on`), 'off' never uses the cache, 'on' opts every request in; `cache_ttl_s`
-- (NULL: the model's TTL) shortens the life of the entries the key writes and bounds the age of those it reads.
ALTER TABLE api_keys
    ADD COLUMN cache       text NOT NULL DEFAULT 'default' CHECK (cache IN ('default', 'off', 'on')),
    ADD COLUMN cache_ttl_s double precision CHECK (cache_ttl_s > 0);
