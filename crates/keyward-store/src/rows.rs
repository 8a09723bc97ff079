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
                description: r.try_get("description").map_err(corrupt)?,
                tags: serde_json::from_str(&tags).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                expires_at: r.try_get::<Option<i64>, _>("expires_at").map_err(corrupt)?.map(from_micros),
                created_at: from_micros(r.try_get("created_at").map_err(corrupt)?),
                updated_at: from_micros(r.try_get("updated_at").map_err(corrupt)?),
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
            })
        }

        fn agent_from(r: &$row) -> StoreResult<Agent> {
            Ok(Agent {
                id: r.try_get("id").map_err(corrupt)?,
                org_id: r.try_get("org_id").map_err(corrupt)?,
                name: r.try_get("name").map_err(corrupt)?,
                description: r.try_get("description").map_err(corrupt)?,
                disabled: r.try_get("disabled").map_err(corrupt)?,
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
