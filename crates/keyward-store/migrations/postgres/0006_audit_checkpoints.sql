-- Signed checkpoints of the audit chain (Ed25519 over seq, chain hash, time).
CREATE TABLE audit_checkpoints (
    seq        BIGINT PRIMARY KEY,
    hash       BYTEA NOT NULL,
    time       BIGINT NOT NULL,
    signature  BYTEA NOT NULL
);
