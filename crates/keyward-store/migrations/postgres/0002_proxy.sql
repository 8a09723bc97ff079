-- The credential-injecting proxy: per-secret network policy and injection rule.
ALTER TABLE secrets ADD COLUMN allow_internal BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE secrets ADD COLUMN inject TEXT;
