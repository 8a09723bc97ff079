//! Test harness: a real `keyward serve` process on port 0 over TLS in a temp
//! data dir, driven by the real CLI binary and a real HTTP client.
#![allow(dead_code)]

pub mod mock;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_keyward");

/// Everything any CLI invocation printed, for leak checks.
#[derive(Clone, Default)]
pub struct Transcript(Arc<Mutex<Vec<u8>>>);

impl Transcript {
    pub fn push(&self, bytes: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(bytes);
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Which store a test server runs on: every end-to-end test runs on both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct Server {
    pub backend: Backend,
    /// `--database` URL for PostgreSQL servers (a schema of their own).
    pub database: Option<String>,
    pub pg: Option<keyward_store::testing::TestSchema>,
    pub serve_args: Vec<String>,
    pub tmp: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub addr: String,
    pub ca: PathBuf,
    pub admin_token: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    pub transcript: Transcript,
    pub http: reqwest::Client,
}

#[derive(Default)]
pub struct Opts {
    pub passphrase: Option<String>,
    /// A database URL of the test's own (instead of a fresh schema).
    pub database: Option<String>,
    /// Extra `keyward serve` arguments (e.g. `--upstream-ca`, `--resolve`).
    pub serve_args: Vec<String>,
}

/// A second server process sharing the first one's data dir and database.
pub struct Replica {
    pub child: Child,
    pub addr: String,
    pub http: reqwest::Client,
}

impl Replica {
    pub async fn resolve(&self, token: &str, secret: &str) -> (u16, String) {
        resolve_at(&self.http, &self.addr, token, secret).await
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /v1/resolve/{secret}` as an agent: (status, body text).
pub async fn resolve_at(http: &reqwest::Client, addr: &str, token: &str, secret: &str) -> (u16, String) {
    let resp = http
        .get(format!("{addr}/v1/resolve/{secret}"))
        .bearer_auth(token)
        .header("X-Keyward-Purpose", "test purpose")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

impl Server {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, Opts::default()).await
    }

    pub async fn start_with(backend: Backend, opts: Opts) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path().join("kw");
        let transcript = Transcript::default();
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres if opts.database.is_some() => None,
            Backend::Postgres => {
                Some(keyward_store::testing::TestSchema::create().await.expect("PostgreSQL explicitly skipped"))
            }
        };
        let database = opts.database.clone().or_else(|| pg.as_ref().map(|p| p.url.clone()));
        let mut init = Command::new(BIN);
        init.args(["init", "--json", "--data-dir"]).arg(&data_dir);
        if let Some(db) = &database {
            init.args(["--database", db]);
        }
        let out = match &opts.passphrase {
            Some(p) => {
                init.args(["--seal", "passphrase"]).env("KEYWARD_INSECURE_FAST_KDF", "1");
                run_with_stdin(init, p.as_bytes())
            }
            None => init.output().unwrap(),
        };
        assert!(out.status.success(), "init failed: {}", String::from_utf8_lossy(&out.stderr));
        transcript.push(&out.stderr);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let admin_token = report["admin_token"].as_str().unwrap().to_owned();
        let ca = PathBuf::from(report["ca_cert"].as_str().unwrap());
        let ca = if ca.is_absolute() { ca } else { std::env::current_dir().unwrap().join(ca) };
        let mut s = Server {
            backend,
            database,
            pg,
            serve_args: opts.serve_args.clone(),
            log: tmp.path().join("server.log"),
            tmp,
            data_dir,
            addr: String::new(),
            ca,
            admin_token,
            child: None,
            transcript,
            http: reqwest::Client::new(),
        };
        s.spawn();
        s
    }

    /// Starts (or restarts) the server process on a fresh port.
    pub fn spawn(&mut self) {
        let (child, addr) = self.spawn_process();
        self.addr = addr;
        self.child = Some(child);
        self.http = self.client();
    }

    /// Starts one more `keyward serve` on the same data dir and database:
    /// a replica behind the same (imaginary) load balancer.
    pub fn replica(&self) -> Replica {
        let (child, addr) = self.spawn_process();
        Replica { child, addr, http: self.client() }
    }

    fn spawn_process(&self) -> (Child, String) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(&self.data_dir);
        if let Some(db) = &self.database {
            cmd.args(["--database", db]);
        }
        cmd.args(&self.serve_args);
        let mut child = cmd.env("KEYWARD_LOG", "debug").stdout(Stdio::piped()).stderr(log).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("keyward listening on ") {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
            panic!("server did not start; log:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default())
        });
        (child, addr)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// An HTTP client that trusts only the server's CA.
    pub fn client(&self) -> reqwest::Client {
        let pem = std::fs::read(&self.ca).unwrap();
        reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.addr)
    }

    /// The CLI as the operator, not yet started (for long-running commands).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        self.command(Some(&self.admin_token), None, args)
    }

    fn command(&self, token: Option<&str>, org: Option<&str>, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("KEYWARD_ADDR", &self.addr)
            .env("KEYWARD_CACERT", &self.ca)
            .env_remove("KEYWARD_ORG")
            .env_remove("KEYWARD_TOKEN");
        if let Some(t) = token {
            c.env("KEYWARD_TOKEN", t);
        }
        if let Some(o) = org {
            c.env("KEYWARD_ORG", o);
        }
        c
    }

    fn record(&self, out: Output) -> Output {
        self.transcript.push(&out.stdout);
        self.transcript.push(&out.stderr);
        out
    }

    /// Runs the CLI as the operator; stdin is empty.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(&self.admin_token.clone(), None, args, b"")
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.cli_as(&self.admin_token.clone(), None, args, stdin)
    }

    pub fn cli_as(&self, token: &str, org: Option<&str>, args: &[&str], stdin: &[u8]) -> Output {
        let c = self.command(Some(token), org, args);
        self.record(run_with_stdin(c, stdin))
    }

    pub fn cli_no_token(&self, args: &[&str], stdin: &[u8]) -> Output {
        let c = self.command(None, None, args);
        self.record(run_with_stdin(c, stdin))
    }

    /// Runs the CLI, asserts success, parses `--json` output.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a);
        ok_json(out)
    }

    pub fn put_secret(&self, org: Option<&str>, name: &str, value: &str, extra: &[&str]) {
        let mut args = vec!["secret", "put", name];
        args.extend_from_slice(extra);
        let out = self.cli_as(&self.admin_token.clone(), org, &args, value.as_bytes());
        assert!(out.status.success(), "secret put: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Creates an agent and returns its token.
    pub fn agent(&self, org: Option<&str>, name: &str) -> String {
        let out = self.cli_as(&self.admin_token.clone(), org, &["agent", "create", name, "--json"], b"");
        ok_json(out)["token"].as_str().unwrap().to_owned()
    }

    pub fn grant(&self, org: Option<&str>, agent: &str, secret: &str, mode: &str, extra: &[&str]) {
        let mut args = vec!["grant", "add", "--agent", agent, "--secret", secret, "--mode", mode];
        args.extend_from_slice(extra);
        let out = self.cli_as(&self.admin_token.clone(), org, &args, b"");
        assert!(out.status.success(), "grant add: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `GET /v1/resolve/{secret}` as an agent: (status, body text).
    pub async fn resolve(&self, token: &str, secret: &str) -> (u16, String) {
        resolve_at(&self.http, &self.addr, token, secret).await
    }

    /// The server's log so far. The server writes log lines from a thread
    /// of its own, a moment after they are logged: give it that moment, so
    /// that a check for what is (or is not) in the log sees every line.
    pub fn server_log(&self) -> String {
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("keyward.db")
    }

    /// A second connection to the server's database, as an attacker with
    /// database access (or a fault injector) would have.
    pub async fn db(&self) -> Db {
        match &self.database {
            None => {
                let opts = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(self.db_path())
                    .busy_timeout(Duration::from_secs(5));
                Db::Sqlite(sqlx::SqlitePool::connect_with(opts).await.unwrap())
            }
            Some(url) => Db::Pg(sqlx::PgPool::connect(url).await.unwrap()),
        }
    }

    /// Everything the server stored: the data dir's files, and for
    /// PostgreSQL every row of every table as text.
    pub async fn stored_bytes(&self) -> Vec<u8> {
        let mut out = all_bytes_under(&self.data_dir);
        if let Db::Pg(pool) = self.db().await {
            let tables: Vec<String> =
                sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            assert!(tables.len() >= 8, "expected keyward's tables, found {tables:?}");
            for t in tables {
                let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT t::text FROM {t} t")))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                for r in rows {
                    out.extend_from_slice(r.as_bytes());
                }
            }
            pool.close().await;
        }
        out
    }
}

pub enum Bind {
    I(i64),
    S(String),
    B(Vec<u8>),
}

/// Direct database access for tests, on either store. SQL is written with
/// `?` placeholders and translated for PostgreSQL.
pub enum Db {
    Sqlite(sqlx::SqlitePool),
    Pg(sqlx::PgPool),
}

fn pg_sql(sql: &str) -> String {
    let mut n = 0;
    sql.chars()
        .map(|c| {
            if c == '?' {
                n += 1;
                format!("${n}")
            } else {
                c.to_string()
            }
        })
        .collect()
}

macro_rules! bind_all {
    ($q:expr, $binds:expr) => {{
        let mut q = $q;
        for b in $binds {
            q = match b {
                Bind::I(i) => q.bind(i),
                Bind::S(s) => q.bind(s),
                Bind::B(b) => q.bind(b),
            };
        }
        q
    }};
}

impl Db {
    fn sql(&self, sql: &str) -> sqlx::AssertSqlSafe<String> {
        match self {
            Db::Sqlite(_) => sqlx::AssertSqlSafe(sql.to_owned()),
            Db::Pg(_) => sqlx::AssertSqlSafe(pg_sql(sql)),
        }
    }

    pub async fn exec(&self, sql: &str, binds: Vec<Bind>) {
        match self {
            Db::Sqlite(p) => {
                bind_all!(sqlx::query(self.sql(sql)), binds).execute(p).await.unwrap();
            }
            Db::Pg(p) => {
                bind_all!(sqlx::query(self.sql(sql)), binds).execute(p).await.unwrap();
            }
        }
    }

    pub async fn bytes(&self, sql: &str, binds: Vec<Bind>) -> Vec<u8> {
        match self {
            Db::Sqlite(p) => bind_all!(sqlx::query_scalar(self.sql(sql)), binds).fetch_one(p).await.unwrap(),
            Db::Pg(p) => bind_all!(sqlx::query_scalar(self.sql(sql)), binds).fetch_one(p).await.unwrap(),
        }
    }

    pub async fn int(&self, sql: &str) -> i64 {
        match self {
            Db::Sqlite(p) => sqlx::query_scalar(self.sql(sql)).fetch_one(p).await.unwrap(),
            Db::Pg(p) => sqlx::query_scalar(self.sql(sql)).fetch_one(p).await.unwrap(),
        }
    }

    pub async fn strings(&self, sql: &str) -> Vec<String> {
        match self {
            Db::Sqlite(p) => sqlx::query_scalar(self.sql(sql)).fetch_all(p).await.unwrap(),
            Db::Pg(p) => sqlx::query_scalar(self.sql(sql)).fetch_all(p).await.unwrap(),
        }
    }

    /// Makes every audit insert fail inside the database.
    pub async fn inject_audit_fault(&self) {
        match self {
            Db::Sqlite(_) => {
                let t = "CREATE TRIGGER audit_fault BEFORE INSERT ON audit_events \
                         BEGIN SELECT RAISE(ABORT, 'injected fault'); END";
                self.exec(t, vec![]).await
            }
            Db::Pg(_) => {
                let f = "CREATE FUNCTION audit_fault() RETURNS trigger AS $f$ \
                         BEGIN RAISE EXCEPTION 'injected fault'; END $f$ LANGUAGE plpgsql";
                self.exec(f, vec![]).await;
                let t = "CREATE TRIGGER audit_fault BEFORE INSERT ON audit_events \
                         FOR EACH ROW EXECUTE FUNCTION audit_fault()";
                self.exec(t, vec![]).await;
            }
        }
    }

    pub async fn clear_audit_fault(&self) {
        match self {
            Db::Sqlite(_) => self.exec("DROP TRIGGER audit_fault", vec![]).await,
            Db::Pg(_) => self.exec("DROP TRIGGER audit_fault ON audit_events", vec![]).await,
        }
    }

    pub async fn close(self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Pg(p) => p.close().await,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn run_with_stdin(mut c: Command, stdin: &[u8]) -> Output {
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        let mut i = child.stdin.take().unwrap();
        let _ = i.write_all(stdin);
    }
    child.wait_with_output().unwrap()
}

pub fn ok_json(out: Output) -> Value {
    assert!(out.status.success(), "command failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

pub fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Error code of a `{"error": {"code", "message"}}` body.
pub fn error_code(body: &str) -> String {
    let v = json(body);
    assert!(v["error"]["message"].is_string(), "no error message in {body}");
    v["error"]["code"].as_str().unwrap_or_else(|| panic!("no error code in {body}")).to_owned()
}

/// Every file under `dir`, concatenated (to search for leaked values).
pub fn all_bytes_under(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(all_bytes_under(&p));
        } else {
            out.extend(std::fs::read(&p).unwrap_or_default());
        }
    }
    out
}

pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

pub fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
