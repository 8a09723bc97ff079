-- Version lifecycle: pending → current → previous → revoked, grace periods,
-- version expiry, and a rotation policy per secret.
ALTER TABLE secret_versions DROP CONSTRAINT secret_versions_state_check;
ALTER TABLE secret_versions ADD CONSTRAINT secret_versions_state_check
    CHECK (state IN ('pending', 'current', 'previous', 'revoked'));
ALTER TABLE secret_versions ADD COLUMN grace_until BIGINT;
ALTER TABLE secret_versions ADD COLUMN expires_at BIGINT;
ALTER TABLE secrets ADD COLUMN rotate_every_secs BIGINT;
