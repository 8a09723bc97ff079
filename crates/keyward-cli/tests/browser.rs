//! The dashboard in real headless Chromium (Debian's `chromium`, driven by
//! npm `playwright-core`; both installed by `scripts/sdk-env`, which
//! `scripts/test` runs): the flow in `tests/ui/flow.mjs`. Screenshots of
//! every page at desktop and phone widths are kept as test artifacts under
//! `target/ui-screenshots/` (the test prints where).

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::*;

const PASSWORD: &str = "correct horse battery staple";
const VALUE1: &str = "browser-first-value-1234567890";
const VALUE2: &str = "browser-second-value-0987654321";

fn tool(var: &str, default: &str) -> PathBuf {
    let p = std::env::var(var).map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(default));
    assert!(p.exists(), "{} not found: run scripts/sdk-env (scripts/test does), or set {var}", p.display());
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium() {
    let chromium = tool("KEYWARD_TEST_CHROMIUM", "/usr/bin/chromium");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let modules = tool("KEYWARD_TEST_NODE_MODULES", root.join(".sdk/node/node_modules").to_str().unwrap());
    assert!(modules.join("playwright-core/package.json").exists(), "playwright-core missing: run scripts/sdk-env");

    let s = Server::start(Backend::Sqlite).await;
    s.put_secret(None, "existing", VALUE1, &["--provider", "openai"]);
    s.agent(None, "bot");
    for (name, role) in [("adam", "admin"), ("audrey", "auditor")] {
        assert!(s.cli_stdin(&["user", "create", name, "--role", role], PASSWORD.as_bytes()).status.success());
    }
    let shots = root.join("target/ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    // Node resolves `playwright-core` from the script's directory.
    let script = modules.parent().unwrap().join("keyward_ui_flow.mjs");
    std::fs::copy(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ui/flow.mjs"), &script).unwrap();
    let out = Command::new("node")
        .arg(&script)
        .env("KW_URL", &s.addr)
        .env("CHROMIUM", &chromium)
        .env("SHOTS", &shots)
        .env("ADMIN", "adam")
        .env("AUDITOR", "audrey")
        .env("PASSWORD", PASSWORD)
        .env("VALUE1", VALUE1)
        .env("VALUE2", VALUE2)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for step in [
        "log in",
        "create a secret",
        "rotate it",
        "grant it to an agent",
        "disable the agent",
        "filter the audit log",
        "a POST without the CSRF token is refused",
        "log out",
        "an auditor sees but cannot change",
        "done",
    ] {
        assert!(stdout.contains(&format!("ok: {step}")), "{step} missing:\n{stdout}");
    }
    // Straight to the process's stdout: the test harness captures println!.
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "dashboard screenshots: {}", shots.canonicalize().unwrap().display());
    for name in ["desktop-overview", "desktop-secret", "desktop-audit", "phone-secrets", "phone-secret"] {
        assert!(shots.join(format!("{name}.png")).metadata().unwrap().len() > 1000, "{name}.png");
    }

    // What the browser did is what the store holds, audited with the human.
    let v = ok_json(s.cli(&["--json", "secret", "show", "browser-made"]));
    assert_eq!(v["current_version"], 2);
    let agents = ok_json(s.cli(&["--json", "agent", "list"]));
    assert!(agents["agents"].as_array().unwrap().iter().any(|a| a["name"] == "bot" && a["disabled"] == true));
    let out = s.cli(&["--json", "audit", "--action", "secret.rotate"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"name\":\"adam\""));
    let log = s.server_log();
    assert!(!log.contains(VALUE1) && !log.contains(VALUE2));
}
