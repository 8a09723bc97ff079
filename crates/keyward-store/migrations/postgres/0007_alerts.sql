-- Alerts raised by anomaly detection.
CREATE TABLE alerts (
    id              TEXT PRIMARY KEY,
    org_id          TEXT NOT NULL,
    rule            TEXT NOT NULL,
    agent_id        TEXT,
    agent_name      TEXT,
    event_seq       BIGINT NOT NULL,
    time            BIGINT NOT NULL,
    detail          TEXT NOT NULL,
    acknowledged_at BIGINT,
    acknowledged_by TEXT
);
CREATE INDEX alerts_org_time ON alerts (org_id, time);
