//! Audit append throughput, for `bench/audit/run.sh`: W concurrent writers
//! append events through the real group-commit writer (chaining, one
//! transaction per batch) into a fresh store for D seconds; then the chain
//! is verified and the events counted.
//!
//!   audit_bench STORE_URL WRITERS SECONDS
//!
//! Prints one JSON line: writers, events, seconds, events_per_sec, p50/p99
//! append latency in ms, chain_ok, stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keyward_core::audit::{Actor, AuditDraft, ChainVerifier, Outcome};
use keyward_core::audit_writer::AuditWriter;

fn draft(writer: usize, n: u64) -> AuditDraft {
    AuditDraft {
        time: time::OffsetDateTime::now_utc(),
        org_id: Some("org_bench".into()),
        actor: Actor {
            kind: "agent".into(),
            id: Some(format!("agt_{writer:04}")),
            name: Some(format!("bench-agent-{writer}")),
            token_id: Some("atk_bench".into()),
        },
        action: "secret.resolve".into(),
        secret_id: Some("sec_bench".into()),
        secret_name: Some("openai-prod".into()),
        secret_version: Some(1),
        purpose: Some(format!("benchmark event {n}")),
        source_ip: Some("127.0.0.1".into()),
        user_agent: Some("audit-bench/1".into()),
        outcome: Outcome::Allowed,
        reason: None,
        request_id: Some(format!("req-{writer}-{n}")),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, writers, secs] = &args[..] else {
        eprintln!("usage: audit_bench STORE_URL WRITERS SECONDS");
        std::process::exit(2);
    };
    let writers: usize = writers.parse().expect("WRITERS");
    let secs: u64 = secs.parse().expect("SECONDS");
    let store = keyward_store::open(url).await.expect("open store");
    let writer = Arc::new(AuditWriter::spawn(store.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (writer, stop) = (writer.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                writer.append(draft(w, n)).await.expect("append");
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                n += 1;
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("writer task"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0.0);

    let mut verifier = ChainVerifier::default();
    let mut after = 0;
    loop {
        let page = store.audit_page(after, 5000).await.expect("read back");
        let Some(last) = page.last() else { break };
        after = last.seq;
        page.iter().for_each(|r| {
            verifier.feed(r);
        });
    }
    let report = verifier.finish();
    println!(
        "{}",
        serde_json::json!({
            "writers": writers,
            "events": lat.len(),
            "seconds": elapsed,
            "events_per_sec": lat.len() as f64 / elapsed,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "chain_ok": report.ok,
            "stored": report.events,
        })
    );
}
