-- keyward schema v1 (SQLite). Times are microseconds since the Unix epoch, UTC.
-- No column ever holds a plaintext value or token: versions keep AES-256-GCM
-- ciphertext, tokens keep their SHA-256.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    wrapped_key BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE secrets (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    name        TEXT NOT NULL,
    provider    TEXT NOT NULL,
    upstream    TEXT,
    description TEXT,
    tags        TEXT NOT NULL,
    expires_at  INTEGER,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (org_id, name)
);

CREATE TABLE secret_versions (
    secret_id   TEXT NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
    version     INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('current', 'revoked')),
    ciphertext  BLOB NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER,
    PRIMARY KEY (secret_id, version)
);

CREATE TABLE agents (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    name        TEXT NOT NULL,
    description TEXT,
    disabled    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    UNIQUE (org_id, name)
);

CREATE TABLE agent_tokens (
    id         TEXT PRIMARY KEY,
    agent_id   TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    hash       BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked    INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE grants (
    id         TEXT PRIMARY KEY,
    org_id     TEXT NOT NULL REFERENCES orgs(id),
    agent_id   TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    secret_id  TEXT NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
    mode_proxy  INTEGER NOT NULL,
    mode_reveal INTEGER NOT NULL,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    UNIQUE (agent_id, secret_id)
);

CREATE TABLE user_tokens (
    id         TEXT PRIMARY KEY,
    org_id     TEXT REFERENCES orgs(id),
    name       TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'auditor')),
    hash       BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER
);

CREATE TABLE audit_events (
    seq            INTEGER PRIMARY KEY,
    time           INTEGER NOT NULL,
    org_id         TEXT,
    actor_kind     TEXT NOT NULL,
    actor_id       TEXT,
    actor_name     TEXT,
    token_id       TEXT,
    action         TEXT NOT NULL,
    secret_id      TEXT,
    secret_name    TEXT,
    secret_version INTEGER,
    purpose        TEXT,
    source_ip      TEXT,
    user_agent     TEXT,
    outcome        TEXT NOT NULL,
    reason         TEXT,
    request_id     TEXT,
    prev_hash      BLOB NOT NULL,
    hash           BLOB NOT NULL
);
CREATE INDEX audit_events_org_seq ON audit_events (org_id, seq);
