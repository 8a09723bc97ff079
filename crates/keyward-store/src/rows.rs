//! Row decoding shared by the stores: one definition, instantiated for each
//! backend's row type (the column names and types are the same in both schemas).

macro_rules! row_mappers {
    ($row:ty) => {
        fn org_from(r: &$row) -> StoreResult<OrgRecord> {
            Ok(OrgRecord {
                org: Org {
                    id: r.try_get("id").map_err(corrupt)?,
                    name: r.try_get("name").map_err(corrupt)?,
                    created_at: from_micros(r.try_get("created_at").map_err(corrupt)?),
                },
                wrapped_key: r.try_get("wrapped_key").map_err(corrupt)?,
            })
        }

        fn secret_from(r: &$row) -> StoreResult<Secret> {
            let tags: String = r.try_get("tags").map_err(corrupt)?;
            Ok(Secret {
                id: r.try_get("id").map_err(corrupt)?,
                org_id: r.try_get("org_id").map_err(corrupt)?,
                name: r.try_get("name").map_err(corrupt)?,
                provider: r.try_get("provider").map_err(corrupt)?,
                upstream: r.try_get("upstream").map_err(corrupt)?,
                allow_internal: r.try_get("allow_internal").map_err(corrupt)?,
                inject: r.try_get("inject").map_err(corrupt)?,
                rotate_every_secs: r.try_get("rotate_every_secs").map_err(corrupt)?,
                auto_rotation: match r.try_get::<Option<String>, _>("auto_rotation").map_err(corrupt)? {
                    Some(j) => Some(serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(e.to_string()))?),
                    None => None,
                },
                description: r.try_get("description").map_err(corrupt)?,
                tags: serde_json::from_str(&tags).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                expires_at: r.try_get::<Option<i64>, _>("expires_at").map_err(corrupt)?.map(from_micros),
                created_at: from_micros(r.try_get("created_at").map_err(corrupt)?),
                updated_at: from_micros(r.try_get("updated_at").map_err(corrupt)?),
            })
        }

        fn user_from(r: &$row) -> StoreResult<User> {
            let role: String = r.try_get("role").map_err(corrupt)?;
            Ok(User {
                id: r.try_get("id").map_err(corrupt)?,
                org_id: r.try_get("org_id").map_err(corrupt)?,
                name: r.try_get("name").map_err(corrupt)?,
                role: Role::parse(&role).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                password_hash: r.try_get("password_hash").map_err(corrupt)?,
                created_at: from_micros(r.try_get("created_at").map_err(corrupt)?),
            })
        }

        fn version_from(r: &$row) -> StoreResult<SecretVersion> {
            let state: String = r.try_get("state").map_err(corrupt)?;
            Ok(SecretVersion {
                secret_id: r.try_get("secret_id").map_err(corrupt)?,
                version: r.try_get("version").map_err(corrupt)?,
                state: VersionState::parse(&state)
                    .ok_or_else(|| StoreError::Corrupt(format!("version state `{state}`")))?,
                ciphertext: r.try_get("ciphertext").map_err(corrupt)?,
                fingerprint: r.try_get("fingerprint").map_err(corrupt)?,
                created_at: from_micros(r.try_get("created_at").map_err(corrupt)?),
                revoked_at: r.try_get::<Option<i64>, _>("revoked_at").map_err(corrupt)?.map(from_micros),
                grace_until: r.try_get::<Option<i64>, _>("grace_until").map_err(corrupt)?.map(from_micros),
                expires_at: r.try_get::<Option<i64>, _>("expires_at").map_err(corrupt)?.map(from_micros),
            })
        }

        fn agent_from(r: &$row) -> StoreResult<Agent> {
            Ok(Agent {
                id: r.try_get("id").map_err(corrupt)?,
                org_id: r.try_get("org_id").map_err(corrupt)?,
                name: r.try_get("name").map_err(corrupt)?,
                description: r.try_get("description").map_err(corrupt)?,
                disabled: r.try_get("disabled").map_err(corrupt)?,
                allow_from: match r.try_get::<Option<String>, _>("allow_from").map_err(corrupt)? {
                    Some(j) => serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    None => Vec::new(),
                },
                created_at: from_micros(r.try_get("created_at").map_err(corrupt)?),
            })
        }

        fn grant_from(r: &$row) -> StoreResult<Grant> {
            Ok(Grant {
                id: r.try_get("id").map_err(corrupt)?,
                org_id: r.try_get("org_id").map_err(corrupt)?,
                agent_id: r.try_get("agent_id").map_err(corrupt)?,
                secret_id: r.try_get("secret_id").map_err(corrupt)?,
                modes: Modes {
                    proxy: r.try_get("mode_proxy").map_err(corrupt)?,
                    reveal: r.try_get("mode_reveal").map_err(corrupt)?,
                },
                expires_at: r.try_get::<Option<i64>, _>("expires_at").map_err(corrupt)?.map(from_micros),
                created_at: from_micros(r.try_get("created_at").map_err(corrupt)?),
            })
        }

        fn audit_from(r: &$row) -> StoreResult<AuditRecord> {
            let outcome: String = r.try_get("outcome").map_err(corrupt)?;
            Ok(AuditRecord {
                seq: r.try_get("seq").map_err(corrupt)?,
                event: AuditDraft {
                    time: from_micros(r.try_get("time").map_err(corrupt)?),
                    org_id: r.try_get("org_id").map_err(corrupt)?,
                    actor: Actor {
                        kind: r.try_get("actor_kind").map_err(corrupt)?,
                        id: r.try_get("actor_id").map_err(corrupt)?,
                        name: r.try_get("actor_name").map_err(corrupt)?,
                        token_id: r.try_get("token_id").map_err(corrupt)?,
                    },
                    action: r.try_get("action").map_err(corrupt)?,
                    secret_id: r.try_get("secret_id").map_err(corrupt)?,
                    secret_name: r.try_get("secret_name").map_err(corrupt)?,
                    secret_version: r.try_get("secret_version").map_err(corrupt)?,
                    purpose: r.try_get("purpose").map_err(corrupt)?,
                    source_ip: r.try_get("source_ip").map_err(corrupt)?,
                    user_agent: r.try_get("user_agent").map_err(corrupt)?,
                    // An unknown outcome is kept as "error" so that the hash check,
                    // not the decoder, reports the tampered row.
                    outcome: Outcome::parse(&outcome).unwrap_or(Outcome::Error),
                    reason: r.try_get("reason").map_err(corrupt)?,
                    request_id: r.try_get("request_id").map_err(corrupt)?,
                },
                prev_hash: hash32(r.try_get("prev_hash").map_err(corrupt)?)?,
                hash: hash32(r.try_get("hash").map_err(corrupt)?)?,
            })
        }

        fn agent_with_token_from(r: &$row) -> StoreResult<(Agent, AgentToken)> {
            let agent = agent_from(r)?;
            let token = AgentToken {
                id: r.try_get("t_id").map_err(corrupt)?,
                agent_id: agent.id.clone(),
                hash: hash32(r.try_get("t_hash").map_err(corrupt)?)?,
                created_at: from_micros(r.try_get("t_created_at").map_err(corrupt)?),
                expires_at: r.try_get::<Option<i64>, _>("t_expires_at").map_err(corrupt)?.map(from_micros),
                revoked: r.try_get("t_revoked").map_err(corrupt)?,
            };
            Ok((agent, token))
        }

        fn user_token_from(r: &$row) -> StoreResult<UserToken> {
            let role: String = r.try_get("role").map_err(corrupt)?;
            Ok(UserToken {
                id: r.try_get("id").map_err(corrupt)?,
                org_id: r.try_get("org_id").map_err(corrupt)?,
                name: r.try_get("name").map_err(corrupt)?,
                role: Role::parse(&role).map_err(|_| StoreError::Corrupt(format!("role `{role}`")))?,
                hash: hash32(r.try_get("hash").map_err(corrupt)?)?,
                created_at: from_micros(r.try_get("created_at").map_err(corrupt)?),
                expires_at: r.try_get::<Option<i64>, _>("expires_at").map_err(corrupt)?.map(from_micros),
            })
        }
    };
}

pub(crate) use row_mappers;

use keyward_core::audit::time_micros;
use keyward_core::store::{StoreError, StoreResult};
use time::OffsetDateTime;

pub(crate) fn micros(t: OffsetDateTime) -> i64 {
    time_micros(t)
}

pub(crate) fn opt_micros(t: Option<OffsetDateTime>) -> Option<i64> {
    t.map(time_micros)
}

pub(crate) fn hash32(v: Vec<u8>) -> StoreResult<[u8; 32]> {
    v.try_into().map_err(|_| StoreError::Corrupt("hash is not 32 bytes".into()))
}

pub(crate) fn corrupt(e: sqlx::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// Row writers and whole-store export/import shared by the stores. The SQL
/// uses `$N` placeholders, which SQLite also accepts (numbered in order of
/// first appearance) and PostgreSQL requires.
macro_rules! row_writers {
    ($conn:ty, $row:ty, $db:ty) => {
        async fn insert_org(c: &mut $conn, org: &OrgRecord) -> StoreResult<()> {
            sqlx::query("INSERT INTO orgs (id, name, wrapped_key, created_at) VALUES ($1, $2, $3, $4)")
                .bind(&org.org.id)
                .bind(&org.org.name)
                .bind(&org.wrapped_key)
                .bind(micros(org.org.created_at))
                .execute(&mut *c)
                .await
                .map_err(map_err)?;
            Ok(())
        }

        async fn insert_secret(c: &mut $conn, s: &Secret) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO secrets (id, org_id, name, provider, upstream, description, tags, expires_at, \
                 created_at, updated_at, allow_internal, inject, rotate_every_secs, auto_rotation) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            )
            .bind(&s.id)
            .bind(&s.org_id)
            .bind(&s.name)
            .bind(&s.provider)
            .bind(&s.upstream)
            .bind(&s.description)
            .bind(serde_json::to_string(&s.tags).expect("tags serialize"))
            .bind(opt_micros(s.expires_at))
            .bind(micros(s.created_at))
            .bind(micros(s.updated_at))
            .bind(s.allow_internal)
            .bind(&s.inject)
            .bind(s.rotate_every_secs)
            .bind(s.auto_rotation.as_ref().map(|a| serde_json::to_string(a).expect("json")))
            .execute(&mut *c)
            .await
            .map_err(map_err)?;
            Ok(())
        }

        async fn insert_version(c: &mut $conn, v: &SecretVersion) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO secret_versions (secret_id, version, state, ciphertext, fingerprint, created_at, \
                 revoked_at, grace_until, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(&v.secret_id)
            .bind(v.version)
            .bind(v.state.as_str())
            .bind(&v.ciphertext)
            .bind(&v.fingerprint)
            .bind(micros(v.created_at))
            .bind(opt_micros(v.revoked_at))
            .bind(opt_micros(v.grace_until))
            .bind(opt_micros(v.expires_at))
            .execute(&mut *c)
            .await
            .map_err(map_err)?;
            Ok(())
        }

        async fn insert_agent(c: &mut $conn, a: &Agent) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO agents (id, org_id, name, description, disabled, created_at, allow_from) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&a.id)
            .bind(&a.org_id)
            .bind(&a.name)
            .bind(&a.description)
            .bind(a.disabled)
            .bind(micros(a.created_at))
            .bind((!a.allow_from.is_empty()).then(|| serde_json::to_string(&a.allow_from).expect("json")))
            .execute(&mut *c)
            .await
            .map_err(map_err)?;
            Ok(())
        }

        async fn insert_agent_token(c: &mut $conn, t: &AgentToken) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO agent_tokens (id, agent_id, hash, created_at, expires_at, revoked) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&t.id)
            .bind(&t.agent_id)
            .bind(&t.hash[..])
            .bind(micros(t.created_at))
            .bind(opt_micros(t.expires_at))
            .bind(t.revoked)
            .execute(&mut *c)
            .await
            .map_err(map_err)?;
            Ok(())
        }

        /// The rotation's state changes around inserting `next` (see Store::rotate_secret).
        async fn rotate_versions(c: &mut $conn, next: &SecretVersion, at: OffsetDateTime, grace_until: Option<OffsetDateTime>) -> StoreResult<()> {
            sqlx::query("UPDATE secret_versions SET state = 'revoked', revoked_at = $1 WHERE secret_id = $2 AND state IN ('previous', 'pending')")
                .bind(micros(at))
                .bind(&next.secret_id)
                .execute(&mut *c)
                .await
                .map_err(map_err)?;
            match grace_until {
                Some(g) => sqlx::query("UPDATE secret_versions SET state = 'previous', grace_until = $1 WHERE secret_id = $2 AND state = 'current'")
                    .bind(micros(g))
                    .bind(&next.secret_id),
                None => sqlx::query("UPDATE secret_versions SET state = 'revoked', revoked_at = $1 WHERE secret_id = $2 AND state = 'current'")
                    .bind(micros(at))
                    .bind(&next.secret_id),
            }
            .execute(&mut *c)
            .await
            .map_err(map_err)?;
            insert_version(c, next).await?;
            sqlx::query("UPDATE secrets SET updated_at = $1 WHERE id = $2")
                .bind(micros(at))
                .bind(&next.secret_id)
                .execute(&mut *c)
                .await
                .map_err(map_err)?;
            Ok(())
        }

        async fn rollback_versions(c: &mut $conn, secret_id: &str, at: OffsetDateTime) -> StoreResult<Option<i64>> {
            let previous: Option<i64> = sqlx::query_scalar(
                "SELECT version FROM secret_versions WHERE secret_id = $1 AND state = 'previous' \
                 AND (grace_until IS NULL OR grace_until > $2) ORDER BY version DESC LIMIT 1",
            )
            .bind(secret_id)
            .bind(micros(at))
            .fetch_optional(&mut *c)
            .await
            .map_err(map_err)?;
            let Some(v) = previous else { return Ok(None) };
            sqlx::query("UPDATE secret_versions SET state = 'revoked', revoked_at = $1 WHERE secret_id = $2 AND state = 'current'")
                .bind(micros(at))
                .bind(secret_id)
                .execute(&mut *c)
                .await
                .map_err(map_err)?;
            sqlx::query("UPDATE secret_versions SET state = 'current', grace_until = NULL WHERE secret_id = $1 AND version = $2")
                .bind(secret_id)
                .bind(v)
                .execute(&mut *c)
                .await
                .map_err(map_err)?;
            Ok(Some(v))
        }

        async fn expire_grace_in(c: &mut $conn, now: OffsetDateTime) -> StoreResult<u64> {
            let done = sqlx::query(
                "UPDATE secret_versions SET state = 'revoked', revoked_at = grace_until \
                 WHERE state = 'previous' AND grace_until IS NOT NULL AND grace_until <= $1",
            )
            .bind(micros(now))
            .execute(&mut *c)
            .await
            .map_err(map_err)?;
            Ok(done.rows_affected())
        }

        async fn expiring_tokens(c: &mut $conn, before: OffsetDateTime) -> StoreResult<Vec<(Agent, AgentToken)>> {
            let rows = sqlx::query(
                "SELECT a.*, t.id AS t_id, t.hash AS t_hash, t.created_at AS t_created_at, \
                 t.expires_at AS t_expires_at, t.revoked AS t_revoked \
                 FROM agent_tokens t JOIN agents a ON a.id = t.agent_id \
                 WHERE t.revoked = FALSE AND t.expires_at IS NOT NULL AND t.expires_at < $1",
            )
            .bind(micros(before))
            .fetch_all(&mut *c)
            .await
            .map_err(map_err)?;
            rows.iter().map(agent_with_token_from).collect()
        }

        /// A new token for an agent; its other live tokens end at `old_until`.
        async fn rotate_agent_tokens(c: &mut $conn, new: &AgentToken, old_until: OffsetDateTime) -> StoreResult<()> {
            sqlx::query(
                "UPDATE agent_tokens SET expires_at = $1 \
                 WHERE agent_id = $2 AND revoked = FALSE AND (expires_at IS NULL OR expires_at > $3)",
            )
            .bind(micros(old_until))
            .bind(&new.agent_id)
            .bind(micros(old_until))
            .execute(&mut *c)
            .await
            .map_err(map_err)?;
            insert_agent_token(c, new).await
        }

        /// Inserts, or replaces the grant for the same (agent, secret).
        async fn upsert_grant(c: &mut $conn, g: &Grant) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO grants (id, org_id, agent_id, secret_id, mode_proxy, mode_reveal, expires_at, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (agent_id, secret_id) DO UPDATE SET \
                   mode_proxy = excluded.mode_proxy, mode_reveal = excluded.mode_reveal, \
                   expires_at = excluded.expires_at, created_at = excluded.created_at",
            )
            .bind(&g.id)
            .bind(&g.org_id)
            .bind(&g.agent_id)
            .bind(&g.secret_id)
            .bind(g.modes.proxy)
            .bind(g.modes.reveal)
            .bind(opt_micros(g.expires_at))
            .bind(micros(g.created_at))
            .execute(&mut *c)
            .await
            .map_err(map_err)?;
            Ok(())
        }

        async fn insert_user_token(c: &mut $conn, t: &UserToken) -> StoreResult<()> {
            sqlx::query(
                "INSERT INTO user_tokens (id, org_id, name, role, hash, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&t.id)
            .bind(&t.org_id)
            .bind(&t.name)
            .bind(t.role.as_str())
            .bind(&t.hash[..])
            .bind(micros(t.created_at))
            .bind(opt_micros(t.expires_at))
            .execute(&mut *c)
            .await
            .map_err(map_err)?;
            Ok(())
        }

        /// Inserts audit records, many rows per statement: one round trip
        /// per chunk instead of one per event keeps group commit cheap.
        async fn insert_audit(c: &mut $conn, records: &[AuditRecord]) -> StoreResult<()> {
            let mut rest = records;
            while !rest.is_empty() {
                let n = rest.len().min(AUDIT_STATEMENT_MAX_ROWS);
                let (chunk, tail) = rest.split_at(n);
                rest = tail;
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO audit_events (seq, time, org_id, actor_kind, actor_id, actor_name, token_id, action, \
                     secret_id, secret_name, secret_version, purpose, source_ip, user_agent, outcome, reason, \
                     request_id, prev_hash, hash) ",
                );
                q.push_values(chunk, |mut b, r| {
                    let e = &r.event;
                    // Borrowed, not cloned: a batch binds thousands of values.
                    b.push_bind(r.seq)
                        .push_bind(micros(e.time))
                        .push_bind(e.org_id.as_deref())
                        .push_bind(e.actor.kind.as_str())
                        .push_bind(e.actor.id.as_deref())
                        .push_bind(e.actor.name.as_deref())
                        .push_bind(e.actor.token_id.as_deref())
                        .push_bind(e.action.as_str())
                        .push_bind(e.secret_id.as_deref())
                        .push_bind(e.secret_name.as_deref())
                        .push_bind(e.secret_version)
                        .push_bind(e.purpose.as_deref())
                        .push_bind(e.source_ip.as_deref())
                        .push_bind(e.user_agent.as_deref())
                        .push_bind(e.outcome.as_str())
                        .push_bind(e.reason.as_deref())
                        .push_bind(e.request_id.as_deref())
                        .push_bind(&r.prev_hash[..])
                        .push_bind(&r.hash[..]);
                });
                q.build().execute(&mut *c).await.map_err(map_err)?;
            }
            Ok(())
        }

        /// Everything but the audit trail, read in one transaction.
        async fn export_state_from(c: &mut $conn) -> StoreResult<StateSnapshot> {
            async fn all(c: &mut $conn, sql: &'static str) -> StoreResult<Vec<$row>> {
                sqlx::query(sql).fetch_all(&mut *c).await.map_err(map_err)
            }
            let mut s = StateSnapshot::default();
            for r in all(c, "SELECT key, value FROM meta ORDER BY key").await? {
                s.meta.push((r.try_get("key").map_err(corrupt)?, r.try_get("value").map_err(corrupt)?));
            }
            s.orgs = all(c, "SELECT * FROM orgs ORDER BY created_at, id")
                .await?
                .iter()
                .map(org_from)
                .collect::<Result<_, _>>()?;
            s.secrets = all(c, "SELECT * FROM secrets ORDER BY created_at, id")
                .await?
                .iter()
                .map(secret_from)
                .collect::<Result<_, _>>()?;
            s.versions = all(c, "SELECT * FROM secret_versions ORDER BY secret_id, version")
                .await?
                .iter()
                .map(version_from)
                .collect::<Result<_, _>>()?;
            s.agents = all(c, "SELECT * FROM agents ORDER BY created_at, id")
                .await?
                .iter()
                .map(agent_from)
                .collect::<Result<_, _>>()?;
            s.agent_tokens = all(
                c,
                "SELECT a.*, t.id AS t_id, t.hash AS t_hash, t.created_at AS t_created_at, \
                 t.expires_at AS t_expires_at, t.revoked AS t_revoked \
                 FROM agent_tokens t JOIN agents a ON a.id = t.agent_id ORDER BY t.created_at, t.id",
            )
            .await?
            .iter()
            .map(|r| agent_with_token_from(r).map(|(_, t)| t))
            .collect::<Result<_, _>>()?;
            s.grants = all(c, "SELECT * FROM grants ORDER BY created_at, id")
                .await?
                .iter()
                .map(grant_from)
                .collect::<Result<_, _>>()?;
            s.user_tokens = all(c, "SELECT * FROM user_tokens ORDER BY created_at, id")
                .await?
                .iter()
                .map(user_token_from)
                .collect::<Result<_, _>>()?;
            Ok(s)
        }

        async fn import_state_into(c: &mut $conn, s: &StateSnapshot) -> StoreResult<()> {
            let existing: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM orgs").fetch_one(&mut *c).await.map_err(map_err)?;
            let meta: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM meta").fetch_one(&mut *c).await.map_err(map_err)?;
            if existing + meta > 0 {
                return Err(StoreError::Duplicate { what: "data in the target store (it must be empty)" });
            }
            for (k, v) in &s.meta {
                sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2)")
                    .bind(k)
                    .bind(v)
                    .execute(&mut *c)
                    .await
                    .map_err(map_err)?;
            }
            for o in &s.orgs {
                insert_org(c, o).await?;
            }
            for x in &s.secrets {
                insert_secret(c, x).await?;
            }
            for v in &s.versions {
                insert_version(c, v).await?;
            }
            for a in &s.agents {
                insert_agent(c, a).await?;
            }
            for t in &s.agent_tokens {
                insert_agent_token(c, t).await?;
            }
            for g in &s.grants {
                upsert_grant(c, g).await?;
            }
            for t in &s.user_tokens {
                insert_user_token(c, t).await?;
            }
            Ok(())
        }

        async fn table_counts(c: &mut $conn) -> StoreResult<Vec<(&'static str, i64)>> {
            let mut out = Vec::new();
            for (t, sql) in TABLE_COUNTS {
                let n: i64 = sqlx::query_scalar(*sql).fetch_one(&mut *c).await.map_err(map_err)?;
                out.push((*t, n));
            }
            Ok(out)
        }
    };
}

pub(crate) use row_writers;

/// Rows per audit INSERT statement at most (19 parameters a row: far below
/// both databases' limits). A batch up to this size is one statement of
/// exactly its size: one round trip to the database, committed without a
/// transaction around it (see `insert_audit_chained`). Each size is prepared
/// once per connection and then served from the statement cache, which
/// [`STATEMENT_CACHE`] makes large enough to keep all of them.
pub(crate) const AUDIT_STATEMENT_MAX_ROWS: usize = 64;

/// Prepared statements kept per connection: every audit INSERT size
/// (1..=[`AUDIT_STATEMENT_MAX_ROWS`]) plus the rest of keyward's queries.
pub(crate) const STATEMENT_CACHE: usize = 256;

/// Every table keyward keeps, with the query counting its rows.
pub(crate) const TABLE_COUNTS: &[(&str, &str)] = &[
    ("meta", "SELECT COUNT(*) FROM meta"),
    ("orgs", "SELECT COUNT(*) FROM orgs"),
    ("secrets", "SELECT COUNT(*) FROM secrets"),
    ("secret_versions", "SELECT COUNT(*) FROM secret_versions"),
    ("agents", "SELECT COUNT(*) FROM agents"),
    ("agent_tokens", "SELECT COUNT(*) FROM agent_tokens"),
    ("grants", "SELECT COUNT(*) FROM grants"),
    ("user_tokens", "SELECT COUNT(*) FROM user_tokens"),
    ("audit_events", "SELECT COUNT(*) FROM audit_events"),
    ("audit_checkpoints", "SELECT COUNT(*) FROM audit_checkpoints"),
    ("alerts", "SELECT COUNT(*) FROM alerts"),
    ("users", "SELECT COUNT(*) FROM users"),
];

pub(crate) const AUDIT_COLUMNS: &str = "seq, time, org_id, actor_kind, actor_id, actor_name, token_id, action, secret_id, \
     secret_name, secret_version, purpose, source_ip, user_agent, outcome, reason, request_id, prev_hash, hash";
