//! Test support (feature `test-support`): a private PostgreSQL schema per
//! test, dropped afterwards. PostgreSQL comes from `KEYWARD_TEST_DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`). An unreachable server
//! fails the test — it is never skipped silently — unless
//! `KEYWARD_TEST_SKIP_POSTGRES=1` is set outside CI.

use std::time::Duration;

use keyward_core::audit::{Actor, AuditDraft, Outcome};

use sqlx::postgres::PgPoolOptions;

pub const DEFAULT_TEST_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn base_url() -> String {
    std::env::var("KEYWARD_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_TEST_DATABASE_URL.to_owned())
}

/// A schema of its own; `url` selects it through `search_path` and names
/// its connections (`application_name`) after it.
pub struct TestSchema {
    pub url: String,
    pub schema: String,
    base: String,
}

impl TestSchema {
    /// `None` only when skipping PostgreSQL was asked for explicitly.
    pub async fn create() -> Option<Self> {
        let base = base_url();
        let pool = match PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&base)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                let in_ci = std::env::var("CI").as_deref() == Ok("true");
                if !in_ci && std::env::var("KEYWARD_TEST_SKIP_POSTGRES").as_deref() == Ok("1") {
                    eprintln!("SKIPPING PostgreSQL test (KEYWARD_TEST_SKIP_POSTGRES=1): {e}");
                    return None;
                }
                panic!(
                    "PostgreSQL at {base} is unreachable ({e}); start it (scripts/test does) or set KEYWARD_TEST_DATABASE_URL"
                );
            }
        };
        let schema = format!("kw_test_{}", uuid_like());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&pool)
            .await
            .expect("create schema");
        pool.close().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{schema}&application_name={schema}");
        Some(Self { url, schema, base })
    }
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{:x}_{:x}", nanos, std::process::id())
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (base, schema) = (self.base.clone(), self.schema.clone());
        // Runs on its own thread and runtime: Drop may be called inside an async test.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                if let Ok(pool) = PgPoolOptions::new().max_connections(1).connect(&base).await {
                    let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

/// A minimal audit event: `action`, allowed, by the system, now.
pub fn audit_draft(action: &str) -> AuditDraft {
    AuditDraft {
        time: keyward_core::audit::normalise_time(time::OffsetDateTime::now_utc()),
        org_id: None,
        actor: Actor::system(),
        action: action.into(),
        secret_id: None,
        secret_name: None,
        secret_version: None,
        purpose: None,
        source_ip: None,
        user_agent: None,
        outcome: Outcome::Allowed,
        reason: None,
        request_id: None,
    }
}
