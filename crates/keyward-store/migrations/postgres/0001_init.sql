-- keyward schema v1 (PostgreSQL). Times are microseconds since the Unix epoch, UTC.
-- No column ever holds a plaintext value or token: versions keep AES-256-GCM
-- ciphertext, tokens keep their SHA-256.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    wrapped_key BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE secrets (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    name        TEXT NOT NULL,
    provider    TEXT NOT NULL,
    upstream    TEXT,
    description TEXT,
    tags        TEXT NOT NULL,
    expires_at  BIGINT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    UNIQUE (org_id, name)
);

CREATE TABLE secret_versions (
    secret_id   TEXT NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
    version     BIGINT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('current', 'revoked')),
    ciphertext  BYTEA NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT,
    PRIMARY KEY (secret_id, version)
);

CREATE TABLE agents (
    id          TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs(id),
    name        TEXT NOT NULL,
    description TEXT,
    disabled    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  BIGINT NOT NULL,
    UNIQUE (org_id, name)
);

CREATE TABLE agent_tokens (
    id         TEXT PRIMARY KEY,
    agent_id   TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    hash       BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked    BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE TABLE grants (
    id         TEXT PRIMARY KEY,
    org_id     TEXT NOT NULL REFERENCES orgs(id),
    agent_id   TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    secret_id  TEXT NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
    mode_proxy  BOOLEAN NOT NULL,
    mode_reveal BOOLEAN NOT NULL,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    UNIQUE (agent_id, secret_id)
);

CREATE TABLE user_tokens (
    id         TEXT PRIMARY KEY,
    org_id     TEXT REFERENCES orgs(id),
    name       TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'auditor')),
    hash       BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT
);

CREATE TABLE audit_events (
    seq            BIGINT PRIMARY KEY,
    time           BIGINT NOT NULL,
    org_id         TEXT,
    actor_kind     TEXT NOT NULL,
    actor_id       TEXT,
    actor_name     TEXT,
    token_id       TEXT,
    action         TEXT NOT NULL,
    secret_id      TEXT,
    secret_name    TEXT,
    secret_version BIGINT,
    purpose        TEXT,
    source_ip      TEXT,
    user_agent     TEXT,
    outcome        TEXT NOT NULL,
    reason         TEXT,
    request_id     TEXT,
    prev_hash      BYTEA NOT NULL,
    hash           BYTEA NOT NULL
);
CREATE INDEX audit_events_org_seq ON audit_events (org_id, seq);
