-- The credential-injecting proxy: per-secret network policy and injection rule.
ALTER TABLE secrets ADD COLUMN allow_internal INTEGER NOT NULL DEFAULT 0;
ALTER TABLE secrets ADD COLUMN inject TEXT;
