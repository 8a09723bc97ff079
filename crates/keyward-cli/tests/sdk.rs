//! The providers' official SDKs, unchanged, pointed at keyward: Python
//! `openai` (chat, streaming chat, embeddings), `anthropic` (messages,
//! streaming), `stripe` (a list call), `slack_sdk` (chat_postMessage), and
//! the `openai` npm package once. The mock upstream checks it got the real
//! key in the right slot and never the agent token.
//!
//! The SDKs are installed by `scripts/sdk-env` (run by `scripts/test`),
//! which exports KEYWARD_TEST_PYTHON and KEYWARD_TEST_NODE_MODULES. The
//! multi-threaded runtime keeps the in-process mock answering while a test
//! waits for the SDK process.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::mock::Mock;
use support::*;

fn sdk_path(var: &str, default: &str) -> PathBuf {
    let p = std::env::var(var)
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(default));
    assert!(p.exists(), "{} not found: run scripts/sdk-env (scripts/test does) to install the SDKs", p.display());
    p
}

const KEYS: [(&str, &str, &str); 4] = [
    ("openai", "openai", "sk-proj-OPENAI-REAL-0000001"),
    ("anthropic", "anthropic", "sk-ant-ANTHROPIC-REAL-0002"),
    ("stripe", "stripe", "sk_live_STRIPE-REAL-000003"),
    ("slack", "slack", "xoxb-SLACK-REAL-0000000004"),
];

async fn setup() -> (Server, Mock, String) {
    let mock = Mock::start().await;
    let serve_args = vec![
        "--upstream-ca".to_owned(),
        mock.ca.display().to_string(),
        "--resolve".to_owned(),
        "mock.test=127.0.0.1".to_owned(),
    ];
    let s = Server::start_with(Backend::Sqlite, Opts { serve_args, ..Opts::default() }).await;
    let token = s.agent(None, "bot");
    for (name, provider, key) in KEYS {
        s.put_secret(
            None,
            name,
            key,
            &["--provider", provider, "--upstream", &mock.origin(), "--allow-internal-upstream"],
        );
        s.grant(None, "bot", name, "proxy", &[]);
    }
    (s, mock, token)
}

fn check_upstream(mock: &Mock, token: &str) {
    let seen = mock.requests();
    assert!(!seen.is_empty());
    for r in &seen {
        let all = r.all_text();
        assert!(!all.contains(token) && !all.contains("kwa_"), "the agent token reached the upstream: {all}");
        let (slot, expected) = match r.path.as_str() {
            "/v1/messages" => ("x-api-key", KEYS[1].2.to_owned()),
            "/v1/customers" => ("authorization", format!("Bearer {}", KEYS[2].2)),
            "/api/chat.postMessage" => ("authorization", format!("Bearer {}", KEYS[3].2)),
            _ => ("authorization", format!("Bearer {}", KEYS[0].2)),
        };
        assert_eq!(r.header(slot).as_deref(), Some(expected.as_str()), "{} {}", r.method, r.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdks_work_unchanged_through_the_proxy() {
    let python = sdk_path("KEYWARD_TEST_PYTHON", ".sdk/venv/bin/python");
    let (s, mock, token) = setup().await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/python_sdks.py");
    let out = Command::new(python)
        .arg(script)
        .env("KW_URL", &s.addr)
        .env("KW_TOKEN", &token)
        .env("KW_CA", &s.ca)
        .env("SSL_CERT_FILE", &s.ca)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for sdk in ["openai", "anthropic", "stripe", "slack"] {
        assert!(stdout.contains(&format!("{sdk}: ok")), "{stdout}");
    }
    check_upstream(&mock, &token);
    let paths: Vec<String> = mock.requests().iter().map(|r| r.path.clone()).collect();
    for p in ["/v1/chat/completions", "/v1/embeddings", "/v1/messages", "/v1/customers", "/api/chat.postMessage"] {
        assert!(paths.iter().any(|x| x == p), "{p} not called: {paths:?}");
    }
    // None of the real keys came back to the SDKs' side.
    let err = String::from_utf8_lossy(&out.stderr);
    for (_, _, key) in KEYS {
        assert!(!stdout.contains(key) && !err.contains(key));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_npm_package_works_through_the_proxy() {
    let modules = sdk_path("KEYWARD_TEST_NODE_MODULES", ".sdk/node/node_modules");
    let (s, mock, token) = setup().await;
    // Node resolves `openai` from the script's directory: run a copy there.
    let dir = modules.parent().unwrap().to_path_buf();
    let script = dir.join("openai_node_test.mjs");
    std::fs::copy(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/openai_node.mjs"), &script).unwrap();
    let out = Command::new("node")
        .arg(&script)
        .env("KW_URL", &s.addr)
        .env("KW_TOKEN", &token)
        .env("NODE_EXTRA_CA_CERTS", &s.ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("node openai: ok"));
    check_upstream(&mock, &token);
}
