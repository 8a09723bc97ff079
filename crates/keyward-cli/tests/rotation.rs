//! Automated rotation end to end: a real `keyward serve` runs real hook
//! executables (shell scripts) against a local HTTPS mock provider that
//! issues and revokes keys and refuses unknown ones. Success path; a hook
//! that fails; a hook that issues a key the provider refuses (verify fails);
//! in both failures the current version is untouched; after a success the
//! old key is revoked at the provider.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::mock::Mock;
use support::*;

/// `HOOK MODE STEP` (keyward appends STEP). MODE: good (the provider issues
/// a key), slow (the same after 3 s), failing (exits 3), bogus (prints a key
/// the provider never issued).
const HOOK: &str = r#"#!/bin/sh
set -eu
mode=$1
step=$2
input=$(cat)
case "$step" in
issue)
  case "$mode" in
  good) curl -sS -f --cacert "$MOCK_CA" --resolve "$MOCK_PIN" -X POST "$MOCK_URL/admin/keys" ;;
  slow) sleep 3; curl -sS -f --cacert "$MOCK_CA" --resolve "$MOCK_PIN" -X POST "$MOCK_URL/admin/keys" ;;
  failing) echo "provider said no" >&2; exit 3 ;;
  bogus) printf 'sk-never-issued-by-the-provider\n' ;;
  esac ;;
revoke)
  old=$(printf '%s' "$input" | python3 -c 'import json, sys; print(json.load(sys.stdin)["value"])')
  curl -sS -f --cacert "$MOCK_CA" --resolve "$MOCK_PIN" -X DELETE "$MOCK_URL/admin/keys/$old" ;;
esac
"#;

struct Setup {
    s: Server,
    mock: Mock,
    token: String,
    first_key: String,
    _dir: tempfile::TempDir,
}

async fn setup(b: Backend) -> Setup {
    let mock = Mock::start().await;
    let first_key = mock.start_key_registry();
    let dir = tempfile::tempdir().unwrap();
    let hook = dir.path().join("rotate-mock.sh");
    std::fs::write(&hook, HOOK).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o700)).unwrap();
    let env = format!(
        "env = {{ MOCK_URL = \"{}\", MOCK_PIN = \"mock.test:{}:127.0.0.1\", MOCK_CA = \"{}\" }}",
        mock.origin(),
        mock.port,
        mock.ca.display()
    );
    let mut config = String::from("notify_interval_secs = 3600\n");
    for mode in ["good", "slow", "failing", "bogus"] {
        config.push_str(&format!(
            "[[rotation_hooks]]\nname = \"{mode}\"\ncommand = [\"{}\", \"{mode}\"]\ntimeout_secs = 20\n{env}\n",
            hook.display()
        ));
    }
    let config_path = dir.path().join("keyward.toml");
    std::fs::write(&config_path, config).unwrap();
    let serve_args = [
        "--config",
        &config_path.display().to_string(),
        "--upstream-ca",
        &mock.ca.display().to_string(),
        "--resolve",
        "mock.test=127.0.0.1",
    ]
    .map(str::to_owned)
    .to_vec();
    let s = Server::start_with(b, Opts { serve_args, ..Opts::default() }).await;
    s.put_secret(
        None,
        "openai",
        &first_key,
        &[
            "--provider",
            "openai",
            "--upstream",
            &mock.origin(),
            "--allow-internal-upstream",
            "--rotate-every",
            "30d",
            "--rotation-hook",
            "good",
            "--hook-gets-value",
            "--verify",
            "GET /v1/models",
        ],
    );
    let token = s.agent(None, "bot");
    s.grant(None, "bot", "openai", "proxy", &[]);
    Setup { s, mock, token, first_key, _dir: dir }
}

impl Setup {
    /// A proxied call; (status, the key the provider saw).
    async fn call(&self) -> (u16, String) {
        let resp =
            self.s.http.get(self.s.url("/proxy/openai/v1/models")).bearer_auth(&self.token).send().await.unwrap();
        let status = resp.status().as_u16();
        let seen = self.mock.last().header("authorization").unwrap_or_default();
        (status, seen.trim_start_matches("Bearer ").to_owned())
    }

    fn versions(&self) -> Vec<(i64, String)> {
        let v = self.s.cli_json(&["secret", "versions", "openai"]);
        v["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| (x["version"].as_i64().unwrap(), x["state"].as_str().unwrap().to_owned()))
            .collect()
    }

    fn set_hook(&self, hook: &str) {
        let out = self.s.cli(&[
            "secret",
            "policy",
            "openai",
            "--rotate-every",
            "30d",
            "--rotation-hook",
            hook,
            "--hook-gets-value",
            "--verify",
            "GET /v1/models",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

async fn automated_rotation(b: Backend) {
    let t = setup(b).await;
    assert_eq!(t.call().await, (200, t.first_key.clone()));

    // Success: the provider issues a key, the probe passes with it, it is
    // promoted, and the old key is revoked at the provider.
    let out = t.s.cli(&["secret", "rotate", "openai", "--auto"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 2 is current"));
    let live = t.mock.live_keys();
    assert_eq!(live.len(), 1, "the old key is revoked at the provider: {live:?}");
    assert_ne!(live[0], t.first_key);
    let (status, seen) = t.call().await;
    assert_eq!((status, seen.as_str()), (200, live[0].as_str()), "the next call uses the new key");
    assert_eq!(t.versions(), vec![(1, "revoked".into()), (2, "current".into())]);
    let second_key = live[0].clone();

    // A hook that fails: nothing changes.
    t.set_hook("failing");
    let out = t.s.cli(&["--json", "secret", "rotate", "openai", "--auto"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rotation_failed") && err.contains("issue"), "{err}");
    assert!(!err.contains("provider said no"), "the hook's stderr is not passed on");

    // A hook whose key the provider refuses: the probe fails, the pending
    // version is revoked without ever serving, the current one stays.
    t.set_hook("bogus");
    let out = t.s.cli(&["--json", "secret", "rotate", "openai", "--auto"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("verify") && err.contains("401"), "{err}");
    assert_eq!(t.versions(), vec![(1, "revoked".into()), (2, "current".into()), (3, "revoked".into())]);
    assert_eq!(t.call().await, (200, second_key.clone()));
    assert_eq!(t.mock.live_keys(), vec![second_key.clone()], "no key was revoked after a failure");
    let never = t.mock.requests().iter().filter(|r| r.all_text().contains("sk-never-issued")).count();
    assert_eq!(never, 1, "the bogus key went out once, to the probe, and never with an agent call");

    // A hook the server config does not name is refused up front.
    let out = t.s.cli(&["secret", "policy", "openai", "--rotation-hook", "../../bin/sh"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid"));

    // Every step and failure is audited with its actor, and no key is in the trail.
    let audit = t.s.cli(&["--json", "audit", "--secret", "openai", "--limit", "100"]);
    let text = String::from_utf8_lossy(&audit.stdout).into_owned();
    for action in [
        "secret.rotate.auto",
        "secret.rotate.pending",
        "secret.rotate.promoted",
        "secret.rotate.revoke_old",
        "secret.rotate.failed",
    ] {
        assert!(text.contains(action), "{action} not audited");
    }
    for key in [&t.first_key, &second_key] {
        assert!(!text.contains(key.as_str()), "a key in the audit trail");
        assert!(!t.s.server_log().contains(key.as_str()), "a key in the server log");
    }
    assert!(!text.contains("sk-never-issued"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_automated_rotation_against_a_mock_provider() {
    tokio::time::timeout(Duration::from_secs(120), automated_rotation(Backend::Sqlite)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_automated_rotation_against_a_mock_provider() {
    tokio::time::timeout(Duration::from_secs(120), automated_rotation(Backend::Postgres)).await.unwrap();
}

/// A rotation whose caller goes away while the hook runs (a client timeout
/// here; the API's own request timeout alike) still finishes: the new key is
/// current and the old one revoked at the provider, nothing half-done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_finishes_when_its_caller_goes_away() {
    let t = setup(Backend::Sqlite).await;
    t.set_hook("slow");
    let gone =
        t.s.http
            .post(t.s.url("/v1/orgs/default/secrets/openai/rotate"))
            .bearer_auth(&t.s.admin_token)
            .json(&serde_json::json!({"auto": true}))
            .timeout(Duration::from_millis(800))
            .send()
            .await;
    assert!(gone.is_err_and(|e| e.is_timeout()), "the caller gave up while the hook ran");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // Done: version 2 current, and the old key revoked at the provider.
    while t.versions() != vec![(1, "revoked".to_owned()), (2, "current".to_owned())]
        || t.mock.live_keys().contains(&t.first_key)
    {
        let state = (t.versions(), t.mock.live_keys());
        assert!(std::time::Instant::now() < deadline, "the rotation never finished: {state:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(t.mock.live_keys().len(), 1, "one live key, the new one");
}

/// A rotation by hand while an automated one runs is refused: both would
/// number and promote versions from the same current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_by_hand_waits_for_the_automated_one() {
    let t = setup(Backend::Sqlite).await;
    t.set_hook("slow");
    let (http, url, admin) =
        (t.s.http.clone(), t.s.url("/v1/orgs/default/secrets/openai/rotate"), t.s.admin_token.clone());
    let auto = tokio::spawn(async move {
        http.post(url).bearer_auth(admin).json(&serde_json::json!({"auto": true})).send().await.unwrap().status()
    });
    tokio::time::sleep(Duration::from_millis(1000)).await; // the hook sleeps 3 s
    let out = t.s.cli_stdin(&["secret", "rotate", "openai"], b"sk-typed-by-hand-0123456789");
    assert!(!out.status.success(), "a rotation by hand during an automated one");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(auto.await.unwrap(), 200);
    assert_eq!(t.versions(), vec![(1, "revoked".to_owned()), (2, "current".to_owned())]);
}
