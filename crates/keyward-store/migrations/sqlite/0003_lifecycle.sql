-- Version lifecycle: pending → current → previous → revoked, grace periods,
-- version expiry, and a rotation policy per secret.
CREATE TABLE secret_versions_v3 (
    secret_id   TEXT NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
    version     INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'current', 'previous', 'revoked')),
    ciphertext  BLOB NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER,
    grace_until INTEGER,
    expires_at  INTEGER,
    PRIMARY KEY (secret_id, version)
);
INSERT INTO secret_versions_v3 (secret_id, version, state, ciphertext, fingerprint, created_at, revoked_at)
    SELECT secret_id, version, state, ciphertext, fingerprint, created_at, revoked_at FROM secret_versions;
DROP TABLE secret_versions;
ALTER TABLE secret_versions_v3 RENAME TO secret_versions;
ALTER TABLE secrets ADD COLUMN rotate_every_secs INTEGER;
