-- Signed checkpoints of the audit chain (Ed25519 over seq, chain hash, time).
CREATE TABLE audit_checkpoints (
    seq        INTEGER PRIMARY KEY,
    hash       BLOB NOT NULL,
    time       INTEGER NOT NULL,
    signature  BLOB NOT NULL
);
