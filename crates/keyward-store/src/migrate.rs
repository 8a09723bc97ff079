//! A minimal forward-only migration runner: numbered SQL files embedded in
//! the binary, each applied once in its own transaction and recorded in
//! `schema_migrations`.

use sqlx::{Executor, Row};

use keyward_core::store::{StoreError, StoreResult};

use crate::map_err;

pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub(crate) async fn run<'c, DB>(pool: &sqlx::Pool<DB>, migrations: &[Migration]) -> StoreResult<()>
where
    DB: sqlx::Database,
    for<'a> &'a mut DB::Connection: Executor<'a, Database = DB>,
    for<'a> &'a sqlx::Pool<DB>: Executor<'a, Database = DB>,
    i64: sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL)")
        .execute(pool)
        .await
        .map_err(map_err)?;
    let applied: i64 = sqlx::raw_sql("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        .fetch_one(pool)
        .await
        .map_err(map_err)?
        .try_get(0)
        .map_err(map_err)?;
    let newest = migrations.iter().map(|m| m.version).max().unwrap_or(0);
    if applied > newest {
        return Err(StoreError::Other(format!(
            "database schema version {applied} is newer than this keyward ({newest}); upgrade keyward"
        )));
    }
    for m in migrations.iter().filter(|m| m.version > applied) {
        let mut tx = pool.begin().await.map_err(map_err)?;
        sqlx::raw_sql(m.sql).execute(&mut *tx).await.map_err(map_err)?;
        let record = format!(
            "INSERT INTO schema_migrations (version, name) VALUES ({}, '{}')",
            m.version,
            m.name.replace('\'', "")
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(record)).execute(&mut *tx).await.map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        tracing::info!(version = m.version, name = m.name, "applied database migration");
    }
    Ok(())
}
