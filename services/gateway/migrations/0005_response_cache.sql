-- The semantic response cache (services/gateway/cache.py): needs pgvector, which the embedded PostgreSQL
-- ships. On a server without it the table is not made and the cache is exact-only (a miss, logged).
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS vector;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'pgvector is not available (%): the semantic response cache is off', SQLERRM;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') THEN
        EXECUTE $sql$
            CREATE TABLE IF NOT EXISTS response_cache (
                id          bigserial PRIMARY KEY,
                scope       bytea NOT NULL,         -- tenant, model, parameters, conversation before the question
                guard       text NOT NULL,          -- numbers, negations, names, units of the question
                version     text NOT NULL,          -- the version that answered
                question    text NOT NULL,
                embedding   vector NOT NULL,
                answer      bytea NOT NULL,         -- the cached answer (msgpack)
                created_at  timestamptz NOT NULL DEFAULT now(),
                expires_at  timestamptz NOT NULL
            )
        $sql$;
        EXECUTE 'CREATE INDEX IF NOT EXISTS response_cache_scope ON response_cache (scope, guard)';
        EXECUTE 'CREATE INDEX IF NOT EXISTS response_cache_expiry ON response_cache (expires_at)';
    END IF;
END
$$;
