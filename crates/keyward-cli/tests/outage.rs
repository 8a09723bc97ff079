//! PostgreSQL goes away under load: keyward fails closed (503, no value
//! served unaudited) and recovers by itself when the database returns. The
//! test runs its own PostgreSQL instance (initdb + pg_ctl on a private port
//! and directory) so the shared one keeps serving the other tests.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::*;

struct PrivatePostgres {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
}

fn pg_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<_> = std::fs::read_dir(root)
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (Debian's postgresql package)")
        .map(|e| e.unwrap().path())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL version").join("bin")
}

fn as_postgres_user(bin: &Path, tool: &str) -> Command {
    // initdb and postgres refuse to run as root.
    if unsafe_is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn unsafe_is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl PrivatePostgres {
    fn init() -> Self {
        let dir = tempfile::tempdir().unwrap();
        if unsafe_is_root() {
            assert!(Command::new("chown").args(["-R", "postgres"]).arg(dir.path()).status().unwrap().success());
        }
        let data = dir.path().join("data");
        let bin = pg_bin();
        let out =
            as_postgres_user(&bin, "initdb").args(["-A", "trust", "-U", "postgres", "-D"]).arg(&data).output().unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let pg = Self { port: free_port(), _dir: dir, data, bin };
        pg.start();
        pg
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn start(&self) {
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.data.display());
        let out = as_postgres_user(&self.bin, "pg_ctl")
            .args(["-w", "-t", "30", "-o", &opts, "-l"])
            .arg(self.data.join("log"))
            .arg("-D")
            .arg(&self.data)
            .arg("start")
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl start: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn stop(&self) {
        let out = as_postgres_user(&self.bin, "pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(&self.data)
            .arg("stop")
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ =
            as_postgres_user(&self.bin, "pg_ctl").args(["-m", "immediate", "-D"]).arg(&self.data).arg("stop").output();
    }
}

const VALUE: &str = "sk-outage-test-value-777";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_fails_closed_and_recovers() {
    let pg = PrivatePostgres::init();
    let s = Server::start_with(Backend::Postgres, Opts { database: Some(pg.url()), ..Opts::default() }).await;
    s.put_secret(None, "k", VALUE, &[]);
    let token = Arc::new(s.agent(None, "bot"));
    s.grant(None, "bot", "k", "reveal", &[]);
    assert_eq!(s.resolve(&token, "k").await.0, 200);

    // Load from 4 clients for the whole test; record every answer.
    let stop = Arc::new(AtomicBool::new(false));
    let outage = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (http, addr, token, stop, outage) =
            (s.http.clone(), s.addr.clone(), token.clone(), stop.clone(), outage.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut unavailable, mut during_outage) = (0u64, 0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let down = outage.load(Ordering::Relaxed);
                let (st, body) = resolve_at(&http, &addr, &token, "k").await;
                // Started and answered while the database was down.
                if down && outage.load(Ordering::Relaxed) {
                    during_outage.push((st, body.contains(VALUE)));
                }
                match st {
                    200 => ok += 1,
                    503 => unavailable += 1,
                    other => panic!("unexpected status {other}: {body}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, unavailable, during_outage)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    pg.stop();
    outage.store(true, Ordering::Relaxed);
    // Long enough for requests to start and be refused while it is down
    // (a refusal takes at most the pool's 2 s acquire timeout).
    tokio::time::sleep(Duration::from_secs(8)).await;
    outage.store(false, Ordering::Relaxed);
    pg.start();

    // keyward recovers by itself, without a restart.
    let start = Instant::now();
    loop {
        if s.resolve(&token, "k").await.0 == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "keyward did not recover after the database came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);

    let (mut ok, mut unavailable, mut down) = (0, 0, Vec::new());
    for t in tasks {
        let (o, u, d) = t.await.unwrap();
        ok += o;
        unavailable += u;
        down.extend(d);
    }
    assert!(!down.is_empty(), "no request was made while the database was down");
    assert!(down.iter().all(|(st, _)| *st == 503), "every request during the outage fails closed: {down:?}");
    assert!(down.iter().all(|(_, leaked)| !leaked), "no value is served while the audit trail is down");
    assert!(unavailable > 0 && ok > 0);

    // Every value handed out is in the trail, and the trail is whole.
    let db = s.db().await;
    let allowed =
        db.int("SELECT COUNT(*) FROM audit_events WHERE action = 'secret.resolve' AND outcome = 'allowed'").await;
    db.close().await;
    // +2: the first resolve and the recovery probe.
    assert!(allowed as u64 >= ok + 2, "allowed events {allowed} < values served {}", ok + 2);
    let v = s.cli_json(&["audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
}
