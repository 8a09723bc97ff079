//! The one implementation of the Store trait, instantiated for SQLite and
//! PostgreSQL. The SQL is shared: `$N` placeholders (SQLite numbers them in
//! order of first appearance) and `CAST(… AS …)` work in both. What differs
//! is supplied by each backend's inherent methods: `reader()`/`writer()`
//! pools, `begin_write()` (a write transaction), `insert_audit_chained`
//! (records already chained, written atomically), `changed(tx)` (PostgreSQL notifies the other replicas),
//! `lock_audit_tail(tx)` (PostgreSQL serialises appenders across replicas),
//! `audit_tail_cache()` (SQLite's one process keeps the chain's tail) and
//! `watch()`.

macro_rules! store_impl {
    ($ty:ty, $backend:literal) => {
        #[async_trait::async_trait]
        impl Store for $ty {
            fn backend(&self) -> &'static str {
                $backend
            }

            fn watch_changes(&self) -> Option<tokio::sync::broadcast::Receiver<()>> {
                self.watch()
            }
            async fn get_meta(&self, key: &str) -> StoreResult<Option<String>> {
                let row = sqlx::query("SELECT value FROM meta WHERE key = $1")
                    .bind(key)
                    .fetch_optional(self.reader())
                    .await
                    .map_err(map_err)?;
                row.map(|r| r.try_get("value").map_err(corrupt)).transpose()
            }

            async fn put_meta(&self, key: &str, value: &str) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
                .bind(key)
                .bind(value)
                .execute(self.writer())
                .await
                .map_err(map_err)?;
                Ok(())
            }

            async fn insert_meta(&self, key: &str, value: &str) -> StoreResult<()> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2)")
                    .bind(key)
                    .bind(value)
                    .execute(&mut *tx).await.map_err(map_err)?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)?;
                Ok(())
            }

            async fn create_org(&self, org: &OrgRecord) -> StoreResult<()> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                insert_org(&mut tx, org).await?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)
            }

            async fn org_by_name(&self, name: &str) -> StoreResult<Option<OrgRecord>> {
                let row = sqlx::query("SELECT * FROM orgs WHERE name = $1")
                    .bind(name)
                    .fetch_optional(self.reader())
                    .await
                    .map_err(map_err)?;
                row.as_ref().map(org_from).transpose()
            }

            async fn org_by_id(&self, id: &str) -> StoreResult<Option<OrgRecord>> {
                let row = sqlx::query("SELECT * FROM orgs WHERE id = $1")
                    .bind(id)
                    .fetch_optional(self.reader())
                    .await
                    .map_err(map_err)?;
                row.as_ref().map(org_from).transpose()
            }

            async fn list_orgs(&self) -> StoreResult<Vec<Org>> {
                let rows = sqlx::query("SELECT * FROM orgs ORDER BY name").fetch_all(self.reader()).await.map_err(map_err)?;
                rows.iter().map(|r| org_from(r).map(|o| o.org)).collect()
            }

            async fn create_secret(&self, s: &Secret, v: &SecretVersion) -> StoreResult<()> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                insert_secret(&mut tx, s).await?;
                insert_version(&mut tx, v).await?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)
            }

            async fn find_secret(&self, org_id: &str, name_or_id: &str) -> StoreResult<Option<Secret>> {
                let row = sqlx::query("SELECT * FROM secrets WHERE org_id = $1 AND (name = $2 OR id = $3)")
                    .bind(org_id)
                    .bind(name_or_id)
                    .bind(name_or_id)
                    .fetch_optional(self.reader())
                    .await
                    .map_err(map_err)?;
                row.as_ref().map(secret_from).transpose()
            }

            async fn list_secrets(&self, org_id: &str) -> StoreResult<Vec<Secret>> {
                let rows = sqlx::query("SELECT * FROM secrets WHERE org_id = $1 ORDER BY name")
                    .bind(org_id)
                    .fetch_all(self.reader())
                    .await
                    .map_err(map_err)?;
                rows.iter().map(secret_from).collect()
            }

            async fn current_version(&self, secret_id: &str) -> StoreResult<Option<SecretVersion>> {
                let row = sqlx::query(
                    "SELECT * FROM secret_versions WHERE secret_id = $1 AND state = 'current' ORDER BY version DESC LIMIT 1",
                )
                .bind(secret_id)
                .fetch_optional(self.reader())
                .await
                .map_err(map_err)?;
                row.as_ref().map(version_from).transpose()
            }

            async fn list_versions(&self, secret_id: &str) -> StoreResult<Vec<SecretVersion>> {
                let rows = sqlx::query("SELECT * FROM secret_versions WHERE secret_id = $1 ORDER BY version")
                    .bind(secret_id)
                    .fetch_all(self.reader())
                    .await
                    .map_err(map_err)?;
                rows.iter().map(version_from).collect()
            }

            async fn rotate_secret(
                &self,
                next: &SecretVersion,
                at: OffsetDateTime,
                grace_until: Option<OffsetDateTime>,
            ) -> StoreResult<()> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                rotate_versions(&mut tx, next, at, grace_until).await?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)
            }

            async fn rollback_secret(&self, secret_id: &str, at: OffsetDateTime) -> StoreResult<Option<i64>> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                let v = rollback_versions(&mut tx, secret_id, at).await?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)?;
                Ok(v)
            }

            async fn add_pending_version(&self, pending: &SecretVersion) -> StoreResult<()> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                insert_version(&mut tx, &SecretVersion { state: VersionState::Pending, ..pending.clone() }).await?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)
            }

            async fn promote_pending(&self, secret_id: &str, version: i64, at: OffsetDateTime) -> StoreResult<bool> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                let state: Option<String> =
                    sqlx::query_scalar("SELECT state FROM secret_versions WHERE secret_id = $1 AND version = $2")
                        .bind(secret_id)
                        .bind(version)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(map_err)?;
                if state.as_deref() != Some("pending") {
                    return Ok(false);
                }
                sqlx::query(
                    "UPDATE secret_versions SET state = 'revoked', revoked_at = $1 \
                     WHERE secret_id = $2 AND version <> $3 AND state IN ('current', 'previous', 'pending')",
                )
                .bind(micros(at))
                .bind(secret_id)
                .bind(version)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
                sqlx::query("UPDATE secret_versions SET state = 'current' WHERE secret_id = $1 AND version = $2")
                    .bind(secret_id)
                    .bind(version)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                sqlx::query("UPDATE secrets SET updated_at = $1 WHERE id = $2")
                    .bind(micros(at))
                    .bind(secret_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)?;
                Ok(true)
            }

            async fn set_rotation_policy(
                &self,
                secret_id: &str,
                rotate_every_secs: Option<i64>,
                auto: Option<&AutoRotation>,
                at: OffsetDateTime,
            ) -> StoreResult<bool> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                let done = sqlx::query(
                    "UPDATE secrets SET rotate_every_secs = $1, auto_rotation = $2, updated_at = $3 WHERE id = $4",
                )
                .bind(rotate_every_secs)
                .bind(auto.map(|a| serde_json::to_string(a).expect("json")))
                .bind(micros(at))
                .bind(secret_id)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)?;
                Ok(done.rows_affected() == 1)
            }

            async fn get_version(&self, secret_id: &str, version: i64) -> StoreResult<Option<SecretVersion>> {
                let row = sqlx::query("SELECT * FROM secret_versions WHERE secret_id = $1 AND version = $2")
                    .bind(secret_id)
                    .bind(version)
                    .fetch_optional(self.reader())
                    .await
                    .map_err(map_err)?;
                row.as_ref().map(version_from).transpose()
            }

            async fn expire_grace(&self, now: OffsetDateTime) -> StoreResult<u64> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                let n = expire_grace_in(&mut tx, now).await?;
                if n > 0 {
                    Self::changed(&mut tx).await?;
                }
                tx.commit().await.map_err(map_err)?;
                Ok(n)
            }

            async fn revoke_versions(&self, secret_id: &str, version: Option<i64>, at: OffsetDateTime) -> StoreResult<u64> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                let done = sqlx::query(
                    "UPDATE secret_versions SET state = 'revoked', revoked_at = $1 \
                     WHERE secret_id = $2 AND state <> 'revoked' AND (CAST($3 AS BIGINT) IS NULL OR version = $4)",
                )
                .bind(micros(at))
                .bind(secret_id)
                .bind(version)
                .bind(version)
                .execute(&mut *tx).await.map_err(map_err)?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)?;
                Ok(done.rows_affected())
            }

            async fn delete_secret(&self, secret_id: &str) -> StoreResult<bool> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                for sql in ["DELETE FROM grants WHERE secret_id = $1", "DELETE FROM secret_versions WHERE secret_id = $1"] {
                    sqlx::query(sql).bind(secret_id).execute(&mut *tx).await.map_err(map_err)?;
                }
                let done = sqlx::query("DELETE FROM secrets WHERE id = $1")
                    .bind(secret_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)?;
                Ok(done.rows_affected() > 0)
            }

            async fn create_agent(&self, a: &Agent, t: &AgentToken) -> StoreResult<()> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                insert_agent(&mut tx, a).await?;
                insert_agent_token(&mut tx, t).await?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)
            }

            async fn find_agent(&self, org_id: &str, name_or_id: &str) -> StoreResult<Option<Agent>> {
                let row = sqlx::query("SELECT * FROM agents WHERE org_id = $1 AND (name = $2 OR id = $3)")
                    .bind(org_id)
                    .bind(name_or_id)
                    .bind(name_or_id)
                    .fetch_optional(self.reader())
                    .await
                    .map_err(map_err)?;
                row.as_ref().map(agent_from).transpose()
            }

            async fn list_agents(&self, org_id: &str) -> StoreResult<Vec<Agent>> {
                let rows = sqlx::query("SELECT * FROM agents WHERE org_id = $1 ORDER BY name")
                    .bind(org_id)
                    .fetch_all(self.reader())
                    .await
                    .map_err(map_err)?;
                rows.iter().map(agent_from).collect()
            }

            async fn set_agent_disabled(&self, agent_id: &str, disabled: bool) -> StoreResult<bool> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                let done = sqlx::query("UPDATE agents SET disabled = $1 WHERE id = $2")
                    .bind(disabled)
                    .bind(agent_id)
                    .execute(&mut *tx).await.map_err(map_err)?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)?;
                Ok(done.rows_affected() > 0)
            }

            async fn agent_by_token_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<(Agent, AgentToken)>> {
                let row = sqlx::query(
                    "SELECT a.*, t.id AS t_id, t.hash AS t_hash, t.created_at AS t_created_at, \
                            t.expires_at AS t_expires_at, t.revoked AS t_revoked \
                     FROM agent_tokens t JOIN agents a ON a.id = t.agent_id WHERE t.hash = $1",
                )
                .bind(&hash[..])
                .fetch_optional(self.reader())
                .await
                .map_err(map_err)?;
                row.as_ref().map(agent_with_token_from).transpose()
            }

            async fn expiring_agent_tokens(&self, before: OffsetDateTime) -> StoreResult<Vec<(Agent, AgentToken)>> {
                let mut c = self.reader().acquire().await.map_err(map_err)?;
                expiring_tokens(&mut c, before).await
            }

            async fn rotate_agent_token(&self, new: &AgentToken, old_until: OffsetDateTime) -> StoreResult<()> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                rotate_agent_tokens(&mut tx, new, old_until).await?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)
            }

            async fn put_grant(&self, g: &Grant) -> StoreResult<()> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                upsert_grant(&mut tx, g).await?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)
            }

            async fn find_grant(&self, agent_id: &str, secret_id: &str) -> StoreResult<Option<Grant>> {
                let row = sqlx::query("SELECT * FROM grants WHERE agent_id = $1 AND secret_id = $2")
                    .bind(agent_id)
                    .bind(secret_id)
                    .fetch_optional(self.reader())
                    .await
                    .map_err(map_err)?;
                row.as_ref().map(grant_from).transpose()
            }

            async fn list_grants(
                &self,
                org_id: &str,
                agent_id: Option<&str>,
                secret_id: Option<&str>,
            ) -> StoreResult<Vec<Grant>> {
                let rows = sqlx::query(
                    "SELECT * FROM grants WHERE org_id = $1 AND (CAST($2 AS TEXT) IS NULL OR agent_id = $3) AND (CAST($4 AS TEXT) IS NULL OR secret_id = $5) \
                     ORDER BY created_at",
                )
                .bind(org_id)
                .bind(agent_id)
                .bind(agent_id)
                .bind(secret_id)
                .bind(secret_id)
                .fetch_all(self.reader())
                .await
                .map_err(map_err)?;
                rows.iter().map(grant_from).collect()
            }

            async fn delete_grant(&self, agent_id: &str, secret_id: &str) -> StoreResult<bool> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                let done = sqlx::query("DELETE FROM grants WHERE agent_id = $1 AND secret_id = $2")
                    .bind(agent_id)
                    .bind(secret_id)
                    .execute(&mut *tx).await.map_err(map_err)?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)?;
                Ok(done.rows_affected() > 0)
            }

            async fn create_user_token(&self, t: &UserToken) -> StoreResult<()> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                insert_user_token(&mut tx, t).await?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)
            }

            async fn user_token_by_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<UserToken>> {
                let row = sqlx::query("SELECT * FROM user_tokens WHERE hash = $1")
                    .bind(&hash[..])
                    .fetch_optional(self.reader())
                    .await
                    .map_err(map_err)?;
                row.as_ref().map(user_token_from).transpose()
            }

            async fn append_audit(&self, batch: Vec<AuditDraft>) -> StoreResult<Vec<AuditRecord>> {
                let Some(cache) = self.audit_tail_cache() else {
                    return self.append_audit_reading_tail(batch).await;
                };
                let known = *cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let batch = match known {
                    Some(tail) => {
                        let (records, written) = self.append_audit_after(chain_owned(tail.0, tail.1, batch)).await;
                        match written {
                            Ok(true) => {
                                cache_tail(cache, records.last().map(|r| (r.seq, r.hash)));
                                return Ok(records);
                            }
                            // The tail moved under the cache (someone else
                            // wrote the trail): chain again after the real one.
                            Ok(false) => records.into_iter().map(|r| r.event).collect(),
                            Err(e) => {
                                cache_tail(cache, None);
                                return Err(e);
                            }
                        }
                    }
                    None => batch,
                };
                let appended = self.append_audit_reading_tail(batch).await;
                cache_tail(cache, appended.as_ref().ok().and_then(|r| r.last()).map(|r| (r.seq, r.hash)));
                appended
            }

            async fn query_audit(&self, q: &AuditQuery) -> StoreResult<Vec<AuditRecord>> {
                let sql = format!(
                    "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE \
                     (CAST($1 AS TEXT) IS NULL OR org_id = $1) \
                     AND (CAST($2 AS TEXT) IS NULL OR secret_id = $2 OR secret_name = $2) \
                     AND (CAST($3 AS TEXT) IS NULL OR (actor_kind = 'agent' AND (actor_id = $3 OR actor_name = $3))) \
                     AND (CAST($4 AS TEXT) IS NULL OR action = $4) \
                     AND (CAST($5 AS TEXT) IS NULL OR outcome = $5) \
                     AND (CAST($6 AS BIGINT) IS NULL OR time >= $6) \
                     AND (CAST($7 AS BIGINT) IS NULL OR seq < $7) \
                     AND (CAST($8 AS TEXT) IS NULL OR source_ip = $8) \
                     AND (CAST($9 AS BIGINT) IS NULL OR time < $9) \
                     AND (CAST($10 AS BIGINT) IS NULL OR seq > $10) \
                     ORDER BY seq {} LIMIT $11",
                    if q.after_seq.is_some() { "ASC" } else { "DESC" }
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(&q.org_id)
                    .bind(&q.secret)
                    .bind(&q.agent)
                    .bind(&q.action)
                    .bind(q.outcome.map(Outcome::as_str))
                    .bind(opt_micros(q.since))
                    .bind(q.before_seq)
                    .bind(&q.source_ip)
                    .bind(opt_micros(q.until))
                    .bind(q.after_seq)
                    .bind(i64::from(q.limit.max(1)))
                    .fetch_all(self.reader())
                    .await
                    .map_err(map_err)?;
                rows.iter().map(audit_from).collect()
            }

            async fn audit_page(&self, after_seq: i64, limit: u32) -> StoreResult<Vec<AuditRecord>> {
                let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2");
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(after_seq)
                    .bind(i64::from(limit))
                    .fetch_all(self.reader())
                    .await
                    .map_err(map_err)?;
                rows.iter().map(audit_from).collect()
            }

            async fn audit_last_before(&self, before: OffsetDateTime) -> StoreResult<Option<(i64, [u8; 32])>> {
                let row = sqlx::query("SELECT seq, hash FROM audit_events WHERE time < $1 ORDER BY seq DESC LIMIT 1")
                    .bind(micros(before))
                    .fetch_optional(self.reader())
                    .await
                    .map_err(map_err)?;
                row.map(|r| Ok((r.try_get("seq").map_err(corrupt)?, hash32(r.try_get("hash").map_err(corrupt)?)?)))
                    .transpose()
            }

            async fn prune_audit(&self, through_seq: i64) -> StoreResult<u64> {
                if let Some(cache) = self.audit_tail_cache() {
                    cache_tail(cache, None);
                }
                let mut tx = self.begin_write().await.map_err(map_err)?;
                let anchored: Option<i64> = sqlx::query_scalar("SELECT seq FROM audit_checkpoints WHERE seq = $1")
                    .bind(through_seq)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(map_err)?;
                if anchored.is_none() {
                    return Err(StoreError::Other(format!("no checkpoint at sequence {through_seq} to anchor the pruned trail")));
                }
                let done = sqlx::query("DELETE FROM audit_events WHERE seq <= $1")
                    .bind(through_seq)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                sqlx::query("DELETE FROM audit_checkpoints WHERE seq < $1")
                    .bind(through_seq)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                tx.commit().await.map_err(map_err)?;
                Ok(done.rows_affected())
            }

            async fn audit_tail(&self) -> StoreResult<(i64, [u8; 32])> {
                let row = sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
                    .fetch_optional(self.reader())
                    .await
                    .map_err(map_err)?;
                match row {
                    Some(r) => Ok((r.try_get("seq").map_err(corrupt)?, hash32(r.try_get("hash").map_err(corrupt)?)?)),
                    None => Ok((0, GENESIS_HASH)),
                }
            }

            async fn add_checkpoint(&self, cp: &keyward_core::checkpoint::Checkpoint) -> StoreResult<bool> {
                let done = sqlx::query(
                    "INSERT INTO audit_checkpoints (seq, hash, time, signature) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (seq) DO NOTHING",
                )
                .bind(cp.seq)
                .bind(&cp.hash[..])
                .bind(micros(cp.time))
                .bind(&cp.signature)
                .execute(self.writer())
                .await
                .map_err(map_err)?;
                Ok(done.rows_affected() == 1)
            }

            async fn list_checkpoints(&self) -> StoreResult<Vec<keyward_core::checkpoint::Checkpoint>> {
                let rows = sqlx::query("SELECT seq, hash, time, signature FROM audit_checkpoints ORDER BY seq")
                    .fetch_all(self.reader())
                    .await
                    .map_err(map_err)?;
                rows.iter()
                    .map(|r| {
                        Ok(keyward_core::checkpoint::Checkpoint {
                            seq: r.try_get("seq").map_err(corrupt)?,
                            hash: hash32(r.try_get("hash").map_err(corrupt)?)?,
                            time: from_micros(r.try_get("time").map_err(corrupt)?),
                            signature: r.try_get("signature").map_err(corrupt)?,
                        })
                    })
                    .collect()
            }

            async fn create_user(&self, u: &User) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO users (id, org_id, name, role, password_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&u.id)
                .bind(&u.org_id)
                .bind(&u.name)
                .bind(u.role.as_str())
                .bind(&u.password_hash)
                .bind(micros(u.created_at))
                .execute(self.writer())
                .await
                .map_err(map_err)?;
                Ok(())
            }

            async fn user_by_name(&self, name: &str) -> StoreResult<Option<User>> {
                let row = sqlx::query("SELECT * FROM users WHERE name = $1")
                    .bind(name)
                    .fetch_optional(self.reader())
                    .await
                    .map_err(map_err)?;
                row.as_ref().map(user_from).transpose()
            }

            async fn user_by_id(&self, id: &str) -> StoreResult<Option<User>> {
                let row = sqlx::query("SELECT * FROM users WHERE id = $1")
                    .bind(id)
                    .fetch_optional(self.reader())
                    .await
                    .map_err(map_err)?;
                row.as_ref().map(user_from).transpose()
            }

            async fn list_users(&self) -> StoreResult<Vec<User>> {
                let rows = sqlx::query("SELECT * FROM users ORDER BY name")
                    .fetch_all(self.reader())
                    .await
                    .map_err(map_err)?;
                rows.iter().map(user_from).collect()
            }

            async fn create_session(&self, s: &Session) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO sessions (hash, user_id, csrf, created_at, last_seen, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&s.hash[..])
                .bind(&s.user_id)
                .bind(&s.csrf)
                .bind(micros(s.created_at))
                .bind(micros(s.last_seen))
                .bind(micros(s.expires_at))
                .execute(self.writer())
                .await
                .map_err(map_err)?;
                Ok(())
            }

            async fn session_by_hash(&self, hash: &[u8; 32]) -> StoreResult<Option<Session>> {
                let row = sqlx::query("SELECT * FROM sessions WHERE hash = $1")
                    .bind(&hash[..])
                    .fetch_optional(self.reader())
                    .await
                    .map_err(map_err)?;
                row.map(|r| {
                    Ok(Session {
                        hash: hash32(r.try_get("hash").map_err(corrupt)?)?,
                        user_id: r.try_get("user_id").map_err(corrupt)?,
                        csrf: r.try_get("csrf").map_err(corrupt)?,
                        created_at: from_micros(r.try_get("created_at").map_err(corrupt)?),
                        last_seen: from_micros(r.try_get("last_seen").map_err(corrupt)?),
                        expires_at: from_micros(r.try_get("expires_at").map_err(corrupt)?),
                    })
                })
                .transpose()
            }

            async fn touch_session(&self, hash: &[u8; 32], at: OffsetDateTime) -> StoreResult<()> {
                sqlx::query("UPDATE sessions SET last_seen = $1 WHERE hash = $2")
                    .bind(micros(at))
                    .bind(&hash[..])
                    .execute(self.writer())
                    .await
                    .map_err(map_err)?;
                Ok(())
            }

            async fn delete_session(&self, hash: &[u8; 32]) -> StoreResult<()> {
                sqlx::query("DELETE FROM sessions WHERE hash = $1")
                    .bind(&hash[..])
                    .execute(self.writer())
                    .await
                    .map_err(map_err)?;
                Ok(())
            }

            async fn uses_per_day(
                &self,
                org_id: &str,
                secret_id: Option<&str>,
                since: OffsetDateTime,
            ) -> StoreResult<Vec<(i64, i64)>> {
                let rows = sqlx::query(
                    "SELECT CAST(time / 86400000000 AS BIGINT) AS day, COUNT(*) AS n FROM audit_events \
                     WHERE org_id = $1 AND time >= $2 AND outcome = 'allowed' \
                     AND action IN ('secret.resolve', 'secret.proxy') \
                     AND (CAST($3 AS TEXT) IS NULL OR secret_id = $3) \
                     GROUP BY CAST(time / 86400000000 AS BIGINT) ORDER BY day",
                )
                .bind(org_id)
                .bind(micros(since))
                .bind(secret_id)
                .fetch_all(self.reader())
                .await
                .map_err(map_err)?;
                rows.iter()
                    .map(|r| Ok((r.try_get("day").map_err(corrupt)?, r.try_get("n").map_err(corrupt)?)))
                    .collect()
            }

            async fn add_alert(&self, a: &keyward_core::anomaly::Alert) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO alerts (id, org_id, rule, agent_id, agent_name, event_seq, time, detail, \
                     acknowledged_at, acknowledged_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(&a.id)
                .bind(&a.org_id)
                .bind(&a.rule)
                .bind(&a.agent_id)
                .bind(&a.agent_name)
                .bind(a.event_seq)
                .bind(micros(a.time))
                .bind(&a.detail)
                .bind(opt_micros(a.acknowledged_at))
                .bind(&a.acknowledged_by)
                .execute(self.writer())
                .await
                .map_err(map_err)?;
                Ok(())
            }

            async fn list_alerts(
                &self,
                org_id: &str,
                include_acknowledged: bool,
                limit: u32,
            ) -> StoreResult<Vec<keyward_core::anomaly::Alert>> {
                let rows = sqlx::query(
                    "SELECT * FROM alerts WHERE org_id = $1 AND ($2 OR acknowledged_at IS NULL) \
                     ORDER BY time DESC, id DESC LIMIT $3",
                )
                .bind(org_id)
                .bind(include_acknowledged)
                .bind(i64::from(limit.max(1)))
                .fetch_all(self.reader())
                .await
                .map_err(map_err)?;
                rows.iter()
                    .map(|r| {
                        Ok(keyward_core::anomaly::Alert {
                            id: r.try_get("id").map_err(corrupt)?,
                            org_id: r.try_get("org_id").map_err(corrupt)?,
                            rule: r.try_get("rule").map_err(corrupt)?,
                            agent_id: r.try_get("agent_id").map_err(corrupt)?,
                            agent_name: r.try_get("agent_name").map_err(corrupt)?,
                            event_seq: r.try_get("event_seq").map_err(corrupt)?,
                            time: from_micros(r.try_get("time").map_err(corrupt)?),
                            detail: r.try_get("detail").map_err(corrupt)?,
                            acknowledged_at: r
                                .try_get::<Option<i64>, _>("acknowledged_at")
                                .map_err(corrupt)?
                                .map(from_micros),
                            acknowledged_by: r.try_get("acknowledged_by").map_err(corrupt)?,
                        })
                    })
                    .collect()
            }

            async fn ack_alert(&self, org_id: &str, id: &str, by: &str, at: OffsetDateTime) -> StoreResult<bool> {
                let done = sqlx::query(
                    "UPDATE alerts SET acknowledged_at = $1, acknowledged_by = $2 \
                     WHERE org_id = $3 AND id = $4 AND acknowledged_at IS NULL",
                )
                .bind(micros(at))
                .bind(by)
                .bind(org_id)
                .bind(id)
                .execute(self.writer())
                .await
                .map_err(map_err)?;
                Ok(done.rows_affected() == 1)
            }

            async fn export_state(&self) -> StoreResult<StateSnapshot> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                let s = export_state_from(&mut tx).await?;
                tx.commit().await.map_err(map_err)?;
                Ok(s)
            }

            async fn import_state(&self, snapshot: &StateSnapshot) -> StoreResult<()> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                import_state_into(&mut tx, snapshot).await?;
                Self::changed(&mut tx).await?;
                tx.commit().await.map_err(map_err)
            }

            async fn import_audit(&self, records: &[AuditRecord]) -> StoreResult<()> {
                if let Some(cache) = self.audit_tail_cache() {
                    cache_tail(cache, None);
                }
                let mut tx = self.begin_write().await.map_err(map_err)?;
                insert_audit(&mut tx, records).await?;
                tx.commit().await.map_err(map_err)
            }

            async fn table_counts(&self) -> StoreResult<Vec<(&'static str, i64)>> {
                let mut c = self.reader().acquire().await.map_err(map_err)?;
                table_counts(&mut c).await
            }
        }

        impl $ty {
            /// Appends after the tail read inside the transaction (and, on
            /// PostgreSQL, under the lock that serialises replicas).
            async fn append_audit_reading_tail(&self, batch: Vec<AuditDraft>) -> StoreResult<Vec<AuditRecord>> {
                let mut tx = self.begin_write().await.map_err(map_err)?;
                // Held until commit: one appender at a time (across every replica).
                Self::lock_audit_tail(&mut tx).await?;
                let tail = sqlx::query("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(map_err)?;
                let (last_seq, last_hash) = match tail {
                    Some(r) => (r.try_get("seq").map_err(corrupt)?, hash32(r.try_get("hash").map_err(corrupt)?)?),
                    None => (0, GENESIS_HASH),
                };
                let records = chain_owned(last_seq, last_hash, batch);
                insert_audit(&mut tx, &records).await?;
                tx.commit().await.map_err(map_err)?;
                Ok(records)
            }

            /// Appends records already chained after the tail this process
            /// last wrote; hands them back. If anyone else appended since,
            /// the first record's sequence number is taken: the primary key
            /// refuses it and nothing is written (`Ok(false)`, chain again).
            async fn append_audit_after(&self, records: Vec<AuditRecord>) -> (Vec<AuditRecord>, StoreResult<bool>) {
                let (records, written) = self.insert_audit_chained(records).await;
                let written = match written {
                    Ok(()) => Ok(true),
                    Err(StoreError::Duplicate { .. }) => Ok(false),
                    Err(e) => Err(e),
                };
                (records, written)
            }
        }
    };
}

/// The audit chain's `(seq, hash)` tail as a store last wrote it.
pub(crate) type TailCache = std::sync::Mutex<Option<(i64, [u8; 32])>>;

/// Records the chain's tail as this process last wrote it (`None`: unknown,
/// read it again next time).
pub(crate) fn cache_tail(cache: &TailCache, tail: Option<(i64, [u8; 32])>) {
    *cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = tail;
}

pub(crate) use store_impl;
