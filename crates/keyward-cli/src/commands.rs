//! What each command does.

use std::io::Write;
use std::sync::Arc;

use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::args::*;
use crate::client::{Client, seg};
use crate::input::read_value;
use crate::output::{self, s, table};
use keyward_server::{DataDir, SealChoice, ServeConfig, datadir};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Input(String),
    #[error("cannot reach the server: {0}")]
    Connect(String),
    #[error("{message} ({code})")]
    Api { status: u16, code: String, message: String },
    #[error("{0}")]
    Setup(String),
    #[error("audit trail is broken at sequence {seq}: {problem}")]
    AuditBroken { seq: i64, problem: String },
}

impl CliError {
    pub fn code(&self) -> String {
        match self {
            CliError::Usage(_) => "usage".into(),
            CliError::Input(_) => "input".into(),
            CliError::Connect(_) => "connect".into(),
            CliError::Api { code, .. } => code.clone(),
            CliError::Setup(_) => "setup".into(),
            CliError::AuditBroken { .. } => "audit_broken".into(),
        }
    }
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) | CliError::Input(_) => 2,
            CliError::Connect(_) => 3,
            CliError::AuditBroken { .. } => 4,
            _ => 1,
        }
    }
}

fn setup(e: impl std::fmt::Display) -> CliError {
    CliError::Setup(e.to_string())
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    let json = cli.json;
    let conn = cli.conn;
    match cli.command {
        Command::Init(a) => init(&conn, a, json).await,
        Command::Serve(a) => serve(&conn, a).await,
        Command::Status => {
            let c = Client::new(&conn)?;
            let v = c.get("/v1/sys/status").await?;
            if json {
                print_json(&v);
            } else {
                println!(
                    "keyward {} — {} — seal {} ({}) — backend {}",
                    s(&v["version"]),
                    if v["sealed"].as_bool() == Some(true) { "SEALED" } else { "unsealed" },
                    s(&v["seal"]),
                    if v["sealed"].as_bool() == Some(true) { "run `keyward unseal`" } else { "ready" },
                    s(&v["backend"])
                );
            }
            Ok(())
        }
        Command::Unseal => {
            let c = Client::new(&conn)?;
            let pass = read_value(None, "Passphrase: ")?;
            let v = c.post("/v1/sys/unseal", &json!({"passphrase": pass.as_str()})).await?;
            if json {
                print_json(&v)
            } else {
                println!("unsealed")
            }
            Ok(())
        }
        Command::Org(cmd) => org(&Client::new(&conn)?, cmd, json).await,
        Command::Token(cmd) => token(&Client::new(&conn)?, cmd, json).await,
        Command::Secret(cmd) => secret(&Client::new(&conn)?, cmd, json).await,
        Command::Agent(cmd) => agent(&Client::new(&conn)?, cmd, json).await,
        Command::Grant(cmd) => grant(&Client::new(&conn)?, cmd, json).await,
        Command::Audit(AuditArgs {
            command: Some(AuditCmd::Verify { file: Some(file), pubkey: Some(key) }), ..
        }) => verify_export_offline(&file, &key, json),
        Command::Audit(a) => audit(&Client::new(&conn)?, a, json).await,
        Command::Alerts(a) => alerts(&Client::new(&conn)?, a, json).await,
        Command::User(cmd) => user(&Client::new(&conn)?, cmd, json).await,
        Command::Backup { file, database } => {
            let cfg = server_config(&conn, &ServerOpts { database, ..ServerOpts::default() })?;
            keyward_store::backup_sqlite(&cfg.database_url(), &file).await.map_err(setup)?;
            if json {
                print_json(&json!({"backup": file}));
            } else {
                println!(
                    "backed up {} to {} (ciphertext only; keep the master key file apart)",
                    cfg.database_url(),
                    file.display()
                );
            }
            Ok(())
        }
        Command::Restore { file, database } => {
            let cfg = server_config(&conn, &ServerOpts { database, ..ServerOpts::default() })?;
            let report = datadir::restore(&cfg, &file).await.map_err(setup)?;
            print_copy(
                &report,
                json,
                &format!("restored {} into {}", file.display(), datadir::redact_url(&cfg.database_url())),
            )
        }
        Command::MigrateStore { from, to } => {
            let report = datadir::copy_between(&from, &to).await.map_err(setup)?;
            let what = format!("copied {} into {}", datadir::redact_url(&from), datadir::redact_url(&to));
            print_copy(&report, json, &what)
        }
    }
}

fn print_copy(report: &keyward_store::CopyReport, json: bool, what: &str) -> Result<(), CliError> {
    if json {
        print_json(&serde_json::to_value(report).expect("json"));
    } else {
        println!("{what}");
        for (table, n) in &report.counts {
            println!("  {table:<16} {n}");
        }
        println!(
            "  audit chain: {} events, {}",
            report.audit.events,
            if report.audit.ok { "verified" } else { "BROKEN" }
        );
    }
    if report.audit.ok {
        Ok(())
    } else {
        Err(CliError::AuditBroken {
            seq: report.audit.broken_at.unwrap_or(-1),
            problem: report.audit.problem.clone().unwrap_or_default(),
        })
    }
}

fn server_config(conn: &Conn, opts: &ServerOpts) -> Result<ServeConfig, CliError> {
    let flags = ServeConfig {
        data_dir: conn.data_dir.clone(),
        database: opts.database.clone(),
        tls_cert: opts.tls_cert.clone(),
        tls_key: opts.tls_key.clone(),
        ..ServeConfig::default()
    };
    let file = match &opts.config {
        Some(p) => ServeConfig::from_file(p).map_err(setup)?,
        None => ServeConfig::default(),
    };
    let cfg = flags.over(file);
    cfg.validate().map_err(setup)?;
    Ok(cfg)
}

fn seal_choice(kind: SealKind) -> Result<SealChoice, CliError> {
    Ok(match kind {
        SealKind::Keyfile => SealChoice::KeyFile,
        SealKind::Passphrase => {
            let p = read_value(None, "New passphrase (12+ characters): ")?;
            SealChoice::Passphrase(Zeroizing::new(p.to_string()))
        }
    })
}

async fn init(conn: &Conn, a: InitArgs, json: bool) -> Result<(), CliError> {
    let cfg = server_config(conn, &a.server)?;
    let report = datadir::initialize(&cfg, seal_choice(a.seal)?).await.map_err(setup)?;
    if json {
        print_json(&report.to_json());
    } else {
        print_init_banner(&report);
    }
    Ok(())
}

fn print_init_banner(r: &keyward_server::InitReport) {
    println!("keyward initialised in {} (seal: {}, database: {})", r.data_dir.display(), r.seal, r.database);
    if let Some(ca) = &r.ca_cert {
        let ca = std::fs::canonicalize(ca).unwrap_or_else(|_| ca.clone());
        println!("  CA certificate: {}", ca.display());
        println!("    export KEYWARD_CACERT={}", ca.display());
    }
    println!("  admin token (shown once; store it now):");
    println!("    export KEYWARD_TOKEN={}", r.admin_token.expose());
    if r.seal == "passphrase" {
        println!("  the server starts sealed: run `keyward unseal`");
    }
}

/// Logs to stderr through [`crate::logpipe`]; keep the returned guard
/// until the server stops (dropping it writes out what is queued).
fn init_logging(format: Option<&str>) -> crate::logpipe::Flush {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    // rustls warns on every client that sends an IP address as SNI (many
    // do): a client could flood the log with it, so only its errors show.
    let filter = EnvFilter::try_from_env("KEYWARD_LOG").unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    let (pipe, flush) = crate::logpipe::start(std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(pipe).with_ansi(std::io::stderr().is_terminal());
    if format == Some("json") {
        builder.json().init();
    } else {
        builder.init();
    }
    flush
}

async fn serve(conn: &Conn, a: ServeArgs) -> Result<(), CliError> {
    let flags = ServeConfig {
        listen: a.listen,
        upstream_ca: a.upstream_ca.clone(),
        resolve: (!a.resolve.is_empty()).then(|| a.resolve.clone()),
        upstream_timeout: a.upstream_timeout,
        log_format: a.log_format.clone(),
        durability: a.durability.clone(),
        ..server_config(conn, &ServerOpts { config: None, ..a.server.clone() })?
    };
    let file = match &a.server.config {
        Some(p) => ServeConfig::from_file(p).map_err(setup)?,
        None => ServeConfig::default(),
    };
    let cfg = flags.over(file);
    cfg.validate().map_err(setup)?;
    let _log_flush = init_logging(cfg.log_format.as_deref());

    if datadir::needs_init(&cfg).await.map_err(setup)? {
        let report = datadir::initialize(&cfg, seal_choice(a.seal)?).await.map_err(setup)?;
        print_init_banner(&report);
    }
    datadir::ensure_tls(&cfg).map_err(setup)?;
    let vault = datadir::open_vault(&cfg).await.map_err(setup)?;
    let (cert, key) = datadir::tls_paths(&cfg);
    let tls = keyward_server::tls::server_config(&cert, &key).map_err(setup)?;
    let dir = DataDir::new(cfg.data_dir());
    let ca = cfg.tls_cert.is_none().then(|| dir.ca_cert());
    let sealed = vault.is_sealed();
    let on_listening = move |addr: std::net::SocketAddr| {
        let url = format!("https://{addr}");
        if let Err(e) = dir.write_endpoint(&url, ca.as_deref()) {
            tracing::warn!(error = %e, "could not write endpoint file");
        }
        println!("keyward listening on {url}{}", if sealed { " (sealed: run `keyward unseal`)" } else { "" });
        let _ = std::io::stdout().flush();
    };
    if let Some(days) = cfg.expiring_window_days {
        vault.set_expiring_window(time::Duration::days(days.max(0)));
    }
    let notify_every = std::time::Duration::from_secs(cfg.notify_interval_secs.unwrap_or(60).max(1));
    keyward_server::webhooks::start(&vault, cfg.webhooks.clone().unwrap_or_default(), notify_every);
    keyward_server::checkpointer::start(&vault, cfg.checkpoint_policy());
    vault.start_anomaly_detection();
    keyward_server::sinks::start(&vault, cfg.audit_sinks.clone().unwrap_or_default()).map_err(setup)?;
    let idle = std::time::Duration::from_secs(cfg.upstream_timeout.unwrap_or(300).max(1));
    let upstreams =
        keyward_server::proxy::Upstreams::new(cfg.upstream_ca.as_deref(), cfg.resolve.as_deref().unwrap_or(&[]), idle)
            .map_err(setup)?;
    let upstreams = Arc::new(upstreams);
    let hooks = keyward_server::rotation_hooks::HookRunner::new(
        cfg.rotation_hooks.clone().unwrap_or_default(),
        upstreams.clone(),
    )
    .map_err(setup)?;
    vault.set_rotation_driver(Arc::new(hooks));
    if cfg.auto_rotate.unwrap_or(true) {
        keyward_server::rotation_hooks::start_schedule(&vault, notify_every);
    }
    keyward_server::serve::run(Arc::clone(&vault), upstreams, cfg.listen(), tls, on_listening)
        .await
        .map_err(|e| setup(format!("serving on {}: {e}", cfg.listen())))
}

async fn org(c: &Client, cmd: OrgCmd, json: bool) -> Result<(), CliError> {
    let v = match cmd {
        OrgCmd::Create { name } => c.post("/v1/orgs", &json!({"name": name})).await?,
        OrgCmd::List => c.get("/v1/orgs").await?,
    };
    if json {
        print_json(&v);
    } else if let Some(orgs) = v["orgs"].as_array() {
        table(
            &["NAME", "ID", "CREATED"],
            orgs.iter().map(|o| vec![s(&o["name"]), s(&o["id"]), s(&o["created_at"])]).collect(),
        );
    } else {
        println!("created organization {} ({})", s(&v["name"]), s(&v["id"]));
    }
    Ok(())
}

async fn token(c: &Client, cmd: TokenCmd, json: bool) -> Result<(), CliError> {
    let TokenCmd::Create { name, role, expires } = cmd;
    let v = c.post(&c.org_path("/tokens"), &json!({"name": name, "role": role, "expires": expires})).await?;
    if json {
        print_json(&v);
    } else {
        println!("created {} token {} ({}); shown once:", s(&v["role"]), s(&v["name"]), s(&v["id"]));
        println!("{}", s(&v["token"]));
    }
    Ok(())
}

async fn secret(c: &Client, cmd: SecretCmd, json: bool) -> Result<(), CliError> {
    let v = match cmd {
        SecretCmd::Put {
            name,
            source,
            provider,
            upstream,
            allow_internal_upstream,
            inject,
            expires,
            rotate_every,
            auto,
            description,
            tags,
        } => {
            let value = read_value(source.from_file.as_deref(), &format!("Value for {name} (not echoed): "))?;
            let body = json!({
                "name": name, "value": value.as_str(), "provider": provider, "upstream": upstream,
                "allow_internal": allow_internal_upstream, "inject": inject, "rotate_every": rotate_every,
                "auto_rotation": auto.to_json(),
                "expires": expires, "description": description, "tags": tags,
            });
            let bytes = Zeroizing::new(serde_json::to_vec(&body).expect("json"));
            drop(body);
            let v = c.call(reqwest::Method::POST, &c.org_path("/secrets"), Some(bytes.to_vec())).await?;
            if !json {
                println!("stored {} ({}) version 1, fingerprint {}", s(&v["name"]), s(&v["id"]), fingerprint(&v));
                return Ok(());
            }
            v
        }
        SecretCmd::Rotate { name, auto: true, .. } => {
            let v = c.post(&c.org_path(&format!("/secrets/{}/rotate", seg(&name))), &json!({"auto": true})).await?;
            if !json {
                println!(
                    "rotated {} through its hook: version {} is current, fingerprint {}",
                    s(&v["name"]),
                    s(&v["promoted_version"]),
                    fingerprint(&v)
                );
                if let Some(e) = v["revoke_error"].as_str() {
                    eprintln!("warning: revoking the old value at the provider failed: {e}");
                }
                return Ok(());
            }
            v
        }
        SecretCmd::Policy { name, rotate_every, auto } => {
            let body = json!({"rotate_every": rotate_every, "auto_rotation": auto.to_json()});
            let path = c.org_path(&format!("/secrets/{}/policy", seg(&name)));
            let v = c.call(reqwest::Method::PUT, &path, Some(serde_json::to_vec(&body).expect("json"))).await?;
            if !json {
                let hook = v["auto_rotation"]["hook"].as_str().unwrap_or("none");
                let every = v["rotate_every_secs"].as_i64().map_or("none".into(), |s| format!("{s}s"));
                println!("policy of {}: rotate every {every}, rotation hook {hook}", s(&v["name"]));
                return Ok(());
            }
            v
        }
        SecretCmd::Rotate { name, source, grace, expires, .. } => {
            let value = read_value(source.from_file.as_deref(), &format!("New value for {name} (not echoed): "))?;
            let path = c.org_path(&format!("/secrets/{}/rotate", seg(&name)));
            let v = c.post(&path, &json!({"value": value.as_str(), "grace": grace, "expires": expires})).await?;
            if !json {
                println!(
                    "rotated {}: version {} is current, fingerprint {}",
                    s(&v["name"]),
                    s(&v["current_version"]),
                    fingerprint(&v)
                );
                return Ok(());
            }
            v
        }
        SecretCmd::List => {
            let v = c.get(&c.org_path("/secrets")).await?;
            if !json {
                let rows = v["secrets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| {
                        vec![
                            s(&x["name"]),
                            s(&x["status"]),
                            s(&x["id"]),
                            s(&x["provider"]),
                            format!("v{}", s(&x["current_version"])),
                            x["versions"].as_array().map_or(0, |a| a.len()).to_string(),
                            fingerprint(x),
                            s(&x["expires_at"]),
                            x["grants"].as_array().map_or(0, |a| a.len()).to_string(),
                            s(&x["last_used"]),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "NAME",
                        "STATUS",
                        "ID",
                        "PROVIDER",
                        "CURRENT",
                        "VERSIONS",
                        "FINGERPRINT",
                        "EXPIRES",
                        "GRANTS",
                        "LAST USED",
                    ],
                    rows,
                );
                return Ok(());
            }
            v
        }
        SecretCmd::Rollback { name } => {
            let v = c.post(&c.org_path(&format!("/secrets/{}/rollback", seg(&name))), &json!({})).await?;
            if !json {
                println!("rolled back {}: version {} is current again", s(&v["name"]), s(&v["current_version"]));
                return Ok(());
            }
            v
        }
        SecretCmd::Versions { name } => {
            let v = c.get(&c.org_path(&format!("/secrets/{}", seg(&name)))).await?;
            if !json {
                let rows = v["versions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| {
                        vec![
                            format!("v{}", s(&x["version"])),
                            s(&x["state"]),
                            s(&x["fingerprint"]),
                            s(&x["created_at"]),
                            s(&x["grace_until"]),
                            s(&x["expires_at"]),
                            s(&x["revoked_at"]),
                        ]
                    })
                    .collect();
                table(&["VERSION", "STATE", "FINGERPRINT", "CREATED", "GRACE UNTIL", "EXPIRES", "REVOKED"], rows);
                return Ok(());
            }
            json!({"name": v["name"], "versions": v["versions"]})
        }
        SecretCmd::Show { name } => {
            let v = c.get(&c.org_path(&format!("/secrets/{}", seg(&name)))).await?;
            if !json {
                output::secret_detail(&v);
                return Ok(());
            }
            v
        }
        SecretCmd::Revoke { name, version } => {
            let v =
                c.post(&c.org_path(&format!("/secrets/{}/revoke", seg(&name))), &json!({"version": version})).await?;
            if !json {
                match version {
                    Some(n) => println!("revoked {} version {n}", s(&v["name"])),
                    None => println!("revoked every version of {}", s(&v["name"])),
                }
                return Ok(());
            }
            v
        }
        SecretCmd::Delete { name } => {
            let v = c.delete(&c.org_path(&format!("/secrets/{}", seg(&name)))).await?;
            if !json {
                println!("deleted {name}");
                return Ok(());
            }
            v
        }
    };
    print_json(&v);
    Ok(())
}

fn fingerprint(secret: &Value) -> String {
    let cur = &secret["current_version"];
    secret["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| &v["version"] == cur)
        .map(|v| s(&v["fingerprint"]))
        .unwrap_or_else(|| "-".into())
}

async fn agent(c: &Client, cmd: AgentCmd, json: bool) -> Result<(), CliError> {
    let v = match cmd {
        AgentCmd::Create { name, description, ttl, allow_from } => {
            let body = json!({"name": name, "description": description, "ttl": ttl, "allow_from": allow_from});
            let v = c.post(&c.org_path("/agents"), &body).await?;
            if !json {
                println!("created agent {} ({}); its token, shown once:", s(&v["agent"]["name"]), s(&v["agent"]["id"]));
                println!("{}", s(&v["token"]));
                return Ok(());
            }
            v
        }
        AgentCmd::List => {
            let v = c.get(&c.org_path("/agents")).await?;
            if !json {
                let rows = v["agents"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        let state = if a["disabled"].as_bool() == Some(true) { "disabled" } else { "enabled" };
                        vec![s(&a["name"]), s(&a["id"]), state.into(), s(&a["created_at"])]
                    })
                    .collect();
                table(&["NAME", "ID", "STATE", "CREATED"], rows);
                return Ok(());
            }
            v
        }
        AgentCmd::Show { name } => {
            let v = c.get(&c.org_path(&format!("/agents/{}", seg(&name)))).await?;
            if !json {
                let a = &v["agent"];
                println!("name:     {}", s(&a["name"]));
                println!("id:       {}", s(&a["id"]));
                println!("disabled: {}", s(&a["disabled"]));
                println!("created:  {}", s(&a["created_at"]));
                println!("grants:");
                for g in v["grants"].as_array().into_iter().flatten() {
                    println!(
                        "  secret {}  modes {}  expires {}",
                        s(&g["secret_id"]),
                        output::modes(&g["modes"]),
                        s(&g["expires_at"])
                    );
                }
                return Ok(());
            }
            v
        }
        AgentCmd::Env { name } => return agent_env(c, &name, json).await,
        AgentCmd::Token(AgentTokenCmd::Rotate { name, overlap }) => {
            let path = c.org_path(&format!("/agents/{}/token", seg(&name)));
            let v = c.post(&path, &json!({"overlap": overlap})).await?;
            if !json {
                let until =
                    overlap.map(|o| format!("keeps working for {o}")).unwrap_or_else(|| "stopped working".into());
                println!("new token for agent {name} (the old one {until}); shown once:");
                println!("{}", s(&v["token"]));
                return Ok(());
            }
            v
        }
        AgentCmd::Disable { name } => toggle(c, &name, "disable").await?,
        AgentCmd::Enable { name } => toggle(c, &name, "enable").await?,
    };
    if !json && v.get("disabled").is_some() {
        let state = if v["disabled"].as_bool() == Some(true) { "disabled" } else { "enabled" };
        println!("{state} agent {}", s(&v["name"]));
        return Ok(());
    }
    print_json(&v);
    Ok(())
}

/// Environment lines per provider SDK: (variable, value) pairs and notes.
fn sdk_env(provider: &str, base: &str, secret: &str) -> (Vec<(String, String)>, Option<&'static str>) {
    let url = format!("{base}/proxy/{secret}");
    let token = "${KEYWARD_AGENT_TOKEN}".to_owned();
    let pairs = |v: &[(&str, String)]| v.iter().map(|(k, x)| (k.to_string(), x.clone())).collect();
    match provider {
        "openai" => (pairs(&[("OPENAI_BASE_URL", format!("{url}/v1")), ("OPENAI_API_KEY", token)]), None),
        "anthropic" => (pairs(&[("ANTHROPIC_BASE_URL", url), ("ANTHROPIC_API_KEY", token)]), None),
        "google" => (
            pairs(&[("GOOGLE_GEMINI_BASE_URL", url), ("GEMINI_API_KEY", token.clone()), ("GOOGLE_API_KEY", token)]),
            Some("google-genai: Client(http_options={'base_url': GOOGLE_GEMINI_BASE_URL})"),
        ),
        "stripe" => (
            pairs(&[("STRIPE_API_BASE", url), ("STRIPE_API_KEY", token)]),
            Some("stripe-python: stripe.api_base = os.environ['STRIPE_API_BASE']"),
        ),
        "slack" => (
            pairs(&[("SLACK_API_URL", format!("{url}/api/")), ("SLACK_BOT_TOKEN", token)]),
            Some("slack_sdk: WebClient(token=..., base_url=os.environ['SLACK_API_URL'])"),
        ),
        "github" => (
            pairs(&[("GITHUB_API_URL", url), ("GITHUB_TOKEN", token)]),
            Some("octokit: new Octokit({ baseUrl, auth })"),
        ),
        "twilio" => (
            pairs(&[("TWILIO_API_BASE", url), ("TWILIO_AUTH_TOKEN", token)]),
            Some("twilio: send HTTP Basic with your account SID as user and the agent token as password"),
        ),
        _ => {
            let var = format!("KEYWARD_{}_URL", secret.to_ascii_uppercase().replace(['-', '.'], "_"));
            (
                pairs(&[(&var, url), ("KEYWARD_AGENT_TOKEN", token)]),
                Some("send the agent token as Authorization: Bearer"),
            )
        }
    }
}

async fn agent_env(c: &Client, name: &str, json: bool) -> Result<(), CliError> {
    let agent = c.get(&c.org_path(&format!("/agents/{}", seg(name)))).await?;
    let secrets = c.get(&c.org_path("/secrets")).await?;
    let by_id: std::collections::HashMap<&str, &Value> =
        secrets["secrets"].as_array().into_iter().flatten().filter_map(|s| Some((s["id"].as_str()?, s))).collect();
    let mut env = serde_json::Map::new();
    let mut lines = vec![
        format!("# keyward proxy environment for agent {name}"),
        format!("# set KEYWARD_AGENT_TOKEN to {name}'s agent token (printed once by `keyward agent create`)"),
    ];
    if let Some(ca) = &c.cacert {
        let ca = std::fs::canonicalize(ca).unwrap_or_else(|_| ca.clone());
        for var in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"] {
            lines.push(format!("{var}={}", ca.display()));
            env.insert(var.into(), json!(ca));
        }
    }
    let mut any = false;
    for g in agent["grants"].as_array().into_iter().flatten().filter(|g| g["modes"]["proxy"] == true) {
        let Some(secret) = g["secret_id"].as_str().and_then(|id| by_id.get(id)) else { continue };
        let (name, provider) = (s(&secret["name"]), s(&secret["provider"]));
        let (pairs, note) = sdk_env(&provider, &c.base, &name);
        lines.push(format!("# {name} ({provider})"));
        if let Some(n) = note {
            lines.push(format!("#   {n}"));
        }
        for (k, v) in pairs {
            lines.push(format!("{k}={v}"));
            env.insert(k, json!(v));
        }
        any = true;
    }
    if !any {
        return Err(CliError::Usage(format!(
            "agent {name} has no proxy grant; add one with `keyward grant add --mode proxy`"
        )));
    }
    if json {
        print_json(&json!({ "env": env }));
    } else {
        println!("{}", lines.join("\n"));
    }
    Ok(())
}

async fn toggle(c: &Client, name: &str, what: &str) -> Result<Value, CliError> {
    c.post(&c.org_path(&format!("/agents/{}/{what}", seg(name))), &json!({})).await
}

async fn grant(c: &Client, cmd: GrantCmd, json: bool) -> Result<(), CliError> {
    let v = match cmd {
        GrantCmd::Add { agent, secret, modes, expires } => {
            let v = c
                .post(
                    &c.org_path("/grants"),
                    &json!({"agent": agent, "secret": secret, "modes": modes, "expires": expires}),
                )
                .await?;
            if !json {
                println!(
                    "granted {agent} use of {secret} ({}), expires {}",
                    output::modes(&v["modes"]),
                    s(&v["expires_at"])
                );
                return Ok(());
            }
            v
        }
        GrantCmd::List { agent, secret } => {
            let mut q = Vec::new();
            if let Some(a) = agent {
                q.push(format!("agent={}", seg(&a)));
            }
            if let Some(x) = secret {
                q.push(format!("secret={}", seg(&x)));
            }
            let v = c.get(&format!("{}?{}", c.org_path("/grants"), q.join("&"))).await?;
            if !json {
                let rows = v["grants"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|g| {
                        vec![s(&g["agent_id"]), s(&g["secret_id"]), output::modes(&g["modes"]), s(&g["expires_at"])]
                    })
                    .collect();
                table(&["AGENT", "SECRET", "MODES", "EXPIRES"], rows);
                return Ok(());
            }
            v
        }
        GrantCmd::Remove { agent, secret } => {
            let v = c.delete(&c.org_path(&format!("/grants/{}/{}", seg(&agent), seg(&secret)))).await?;
            if !json {
                println!("removed the grant of {secret} to {agent}");
                return Ok(());
            }
            v
        }
    };
    print_json(&v);
    Ok(())
}

async fn user(c: &Client, cmd: UserCmd, json: bool) -> Result<(), CliError> {
    let v = match cmd {
        UserCmd::Create { name, role } => {
            let password = crate::input::read_value(None, &format!("Password for {name} (not echoed): "))?;
            let body = json!({"name": name, "role": role, "password": password.as_str()});
            let bytes = Zeroizing::new(serde_json::to_vec(&body).expect("json"));
            drop(body);
            let v = c.call(reqwest::Method::POST, &c.org_path("/users"), Some(bytes.to_vec())).await?;
            if !json {
                println!("created {} ({}) with role {}", s(&v["name"]), s(&v["id"]), s(&v["role"]));
                return Ok(());
            }
            v
        }
        UserCmd::List => {
            let v = c.get(&c.org_path("/users")).await?;
            if !json {
                let rows = v["users"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|u| vec![s(&u["name"]), s(&u["role"]), s(&u["id"]), s(&u["created_at"])])
                    .collect();
                table(&["NAME", "ROLE", "ID", "CREATED"], rows);
                return Ok(());
            }
            v
        }
    };
    print_json(&v);
    Ok(())
}

async fn alerts(c: &Client, a: AlertsArgs, json: bool) -> Result<(), CliError> {
    let v = match a.command {
        None => {
            let v = c.get(&format!("{}?all={}", c.org_path("/alerts"), a.all)).await?;
            if !json {
                let rows = v["alerts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| {
                        vec![
                            s(&x["id"]),
                            s(&x["time"]),
                            s(&x["rule"]),
                            s(&x["agent_name"]),
                            s(&x["detail"]),
                            s(&x["event_seq"]),
                            s(&x["acknowledged_by"]),
                        ]
                    })
                    .collect();
                table(&["ID", "TIME", "RULE", "AGENT", "DETAIL", "EVENT", "ACKED BY"], rows);
                return Ok(());
            }
            v
        }
        Some(AlertsCmd::Ack { id }) => {
            let v = c.post(&c.org_path(&format!("/alerts/{}/ack", seg(&id))), &json!({})).await?;
            if !json {
                println!("acknowledged {id}");
                return Ok(());
            }
            v
        }
        Some(AlertsCmd::Policy {
            agent,
            new_source_ip,
            rate_factor,
            rate_min_per_minute,
            denials,
            denials_window_minutes,
            allowed_hours,
            dead_token,
            first_use,
            quarantine,
        }) => {
            let path = match &agent {
                Some(a) => format!("{}?agent={}", c.org_path("/anomaly-policy"), seg(a)),
                None => c.org_path("/anomaly-policy"),
            };
            let mut patch = serde_json::Map::new();
            let mut set = |k: &str, v: Value| {
                if !v.is_null() {
                    patch.insert(k.into(), v);
                }
            };
            set("new_source_ip", json!(new_source_ip.map(OnOff::get)));
            set("rate_factor", json!(rate_factor));
            set("rate_min_per_minute", json!(rate_min_per_minute));
            set("denials", json!(denials));
            set("denials_window_minutes", json!(denials_window_minutes));
            set("allowed_hours", json!(allowed_hours));
            set("dead_token", json!(dead_token.map(OnOff::get)));
            set("first_use", json!(first_use.map(OnOff::get)));
            set("quarantine", json!(quarantine.map(OnOff::get)));
            let v = if patch.is_empty() {
                c.get(&path).await?
            } else {
                c.call(reqwest::Method::PUT, &path, Some(serde_json::to_vec(&patch).expect("json"))).await?
            };
            if !json {
                println!("effective rules ({}):", agent.as_deref().unwrap_or("organization"));
                for (k, val) in v["effective"].as_object().into_iter().flatten() {
                    println!("  {k}: {}", s(val));
                }
                return Ok(());
            }
            v
        }
    };
    print_json(&v);
    Ok(())
}

/// Prints a verification report; a broken trail is an error (exit code 4).
fn verify_outcome(v: &Value, json: bool) -> Result<(), CliError> {
    if json {
        print_json(v);
    }
    if v["ok"].as_bool() == Some(true) {
        if !json {
            let signed = match v["last_checkpoint_seq"].as_i64() {
                Some(last) => format!(
                    "{} signed checkpoints hold (the last at sequence {last}); {} newer events are not signed yet",
                    s(&v["checkpoints_verified"]),
                    s(&v["unsigned_tail"])
                ),
                None => "no signed checkpoint yet (the server signs one every N events or T seconds)".to_owned(),
            };
            println!("audit trail verified: {} events, head {}; {signed}", s(&v["events"]), s(&v["head_hash"]));
        }
        return Ok(());
    }
    Err(CliError::AuditBroken { seq: v["broken_at"].as_i64().unwrap_or(-1), problem: s(&v["problem"]) })
}

fn verify_export_offline(file: &std::path::Path, pubkey: &std::path::Path, json: bool) -> Result<(), CliError> {
    let pem = std::fs::read_to_string(pubkey).map_err(|e| setup(format!("{}: {e}", pubkey.display())))?;
    let key =
        keyward_core::checkpoint::public_key_from_pem(&pem).map_err(|e| setup(format!("{}: {e}", pubkey.display())))?;
    let f = std::fs::File::open(file).map_err(|e| setup(format!("{}: {e}", file.display())))?;
    let report = keyward_core::checkpoint::verify_export(std::io::BufReader::new(f), key)
        .map_err(|e| CliError::AuditBroken { seq: -1, problem: e })?;
    verify_outcome(&serde_json::to_value(&report).expect("json"), json)
}

/// Checkpoints first, then every event: checkpoints read before the events
/// only cover events that the export then contains.
async fn export_audit(c: &Client, output: Option<&std::path::Path>) -> Result<(), CliError> {
    use std::io::Write;
    let mut out: Box<dyn Write> = match output {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| setup(format!("{}: {e}", path.display())))?;
            Box::new(std::io::BufWriter::new(f))
        }
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let io = |e: std::io::Error| setup(format!("writing the export: {e}"));
    let cps = c.get("/v1/audit/checkpoints").await?;
    for cp in cps["checkpoints"].as_array().into_iter().flatten() {
        let cp: keyward_core::checkpoint::Checkpoint =
            serde_json::from_value(cp.clone()).map_err(|e| setup(format!("server sent a bad checkpoint: {e}")))?;
        writeln!(out, "{}", keyward_core::checkpoint::export_line_checkpoint(&cp)).map_err(io)?;
    }
    let mut after = 0;
    loop {
        let page = c.get(&format!("/v1/audit/export?after={after}&limit=2000")).await?;
        let events = page["events"].as_array().cloned().unwrap_or_default();
        for e in &events {
            let r: keyward_core::audit::AuditRecord =
                serde_json::from_value(e.clone()).map_err(|e| setup(format!("server sent a bad event: {e}")))?;
            writeln!(out, "{}", keyward_core::checkpoint::export_line_event(&r)).map_err(io)?;
        }
        match page["next_after"].as_i64() {
            Some(n) if !events.is_empty() => after = n,
            _ => break,
        }
    }
    out.flush().map_err(io)
}

async fn audit(c: &Client, a: AuditArgs, json: bool) -> Result<(), CliError> {
    match a.command {
        Some(AuditCmd::Verify { .. }) => {
            let v = c.get(&c.org_path("/audit/verify")).await?;
            return verify_outcome(&v, json);
        }
        Some(AuditCmd::Pubkey) => {
            let v = c.get(&c.org_path("/audit/pubkey")).await?;
            print!("{}", s(&v["public_key_pem"]));
            return Ok(());
        }
        Some(AuditCmd::Export { format: ExportFormat::Jsonl, output }) => {
            return export_audit(c, output.as_deref()).await;
        }
        Some(AuditCmd::Prune { before, yes }) => {
            let v = c.post("/v1/audit/prune", &json!({"before": before, "dry_run": !yes})).await?;
            if json {
                print_json(&v);
            } else if yes {
                println!("pruned {} events through sequence {}", s(&v["pruned"]), s(&v["through_seq"]));
            } else {
                println!(
                    "would prune {} events through sequence {}; run again with --yes to delete them",
                    s(&v["pruned"]),
                    s(&v["through_seq"])
                );
            }
            return Ok(());
        }
        None => {}
    }
    let mut q = Vec::new();
    for (k, val) in [
        ("secret", &a.secret),
        ("agent", &a.agent),
        ("action", &a.action),
        ("outcome", &a.outcome),
        ("since", &a.since),
        ("until", &a.until),
        ("source_ip", &a.source_ip),
    ] {
        if let Some(x) = val {
            q.push(format!("{k}={}", seg(x)));
        }
    }
    if a.follow {
        let path = format!("{}?{}", c.org_path("/audit/follow"), q.join("&"));
        if !json {
            println!("following the audit trail (Ctrl-C to stop)");
        }
        return c
            .follow(&path, |e| {
                if json {
                    println!("{e}");
                } else {
                    println!("{}", audit_row(&e).join("  "));
                }
                let _ = std::io::stdout().flush();
            })
            .await;
    }
    q.push(format!("limit={}", a.limit));
    if let Some(b) = a.before {
        q.push(format!("before={b}"));
    }
    let v = c.get(&format!("{}?{}", c.org_path("/audit"), q.join("&"))).await?;
    let events = v["events"].as_array().cloned().unwrap_or_default();
    if json {
        // JSON lines, oldest first.
        for e in events.iter().rev() {
            println!("{e}");
        }
        return Ok(());
    }
    let rows = events.iter().rev().map(audit_row).collect();
    table(&["SEQ", "TIME", "OUTCOME", "ACTION", "ACTOR", "SECRET", "PURPOSE", "SOURCE", "REASON"], rows);
    if let Some(next) = v["next_before"].as_i64() {
        println!("(more: --before {next})");
    }
    Ok(())
}

fn audit_row(e: &Value) -> Vec<String> {
    let actor = format!("{}:{}", s(&e["actor"]["kind"]), s(&e["actor"]["name"]));
    let secret = match (&e["secret_name"], &e["secret_version"]) {
        (Value::Null, _) => "-".to_owned(),
        (n, Value::Null) => s(n),
        (n, v) => format!("{}@v{}", s(n), s(v)),
    };
    vec![
        s(&e["seq"]),
        s(&e["time"]),
        s(&e["outcome"]),
        s(&e["action"]),
        actor,
        secret,
        s(&e["purpose"]),
        s(&e["source_ip"]),
        s(&e["reason"]),
    ]
}
