//! Command-line grammar. Secret values are never arguments: they come from
//! stdin, `--from-file` or a no-echo prompt (argv leaks into `ps` and shell
//! history). Tokens come from the environment (`KEYWARD_TOKEN`), not argv.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "keyward", version, about = "Self-hosted credential broker for AI agents")]
pub struct Cli {
    /// Machine-readable output (JSON) and JSON errors.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub command: Command,
}

/// How client commands reach a server.
#[derive(Args, Clone)]
pub struct Conn {
    /// Server URL, e.g. https://127.0.0.1:8443 (default: the local server found in --data-dir).
    #[arg(long, env = "KEYWARD_ADDR", global = true)]
    pub addr: Option<String>,
    /// CA certificate (PEM) to trust for the server.
    #[arg(long, env = "KEYWARD_CACERT", global = true)]
    pub cacert: Option<PathBuf>,
    /// Organization to act in.
    #[arg(long, env = "KEYWARD_ORG", default_value = "default", global = true)]
    pub org: String,
    /// Data directory of a local server (used to find it when --addr is not set).
    #[arg(long, env = "KEYWARD_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Initialise a data dir without serving; prints the one-time admin token.
    Init(InitArgs),
    /// Run the server (initialises an empty data dir first).
    Serve(ServeArgs),
    /// Server health, seal state, backend, version.
    Status,
    /// Unseal a passphrase-sealed server (passphrase from a prompt or stdin).
    Unseal,
    /// Organizations (tenants).
    #[command(subcommand)]
    Org(OrgCmd),
    /// Human/admin tokens with a role in an organization.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Dashboard accounts (humans; password from a no-echo prompt or stdin).
    #[command(subcommand)]
    User(UserCmd),
    /// Stored keys: values go in, never out.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Agent identities and their tokens.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Which agent may use which secret, and how.
    #[command(subcommand)]
    Grant(GrantCmd),
    /// Query and verify the audit trail.
    Audit(AuditArgs),
    /// Anomaly alerts: list, acknowledge, and the rules' settings.
    Alerts(AlertsArgs),
    /// Online, consistent backup of a SQLite store to FILE (ciphertext only:
    /// keep the master key file apart from it).
    Backup {
        file: PathBuf,
        /// Database URL (default: sqlite://DATA_DIR/keyward.db).
        #[arg(long)]
        database: Option<String>,
    },
    /// Load a backup FILE into an empty store (default: DATA_DIR's SQLite).
    Restore {
        file: PathBuf,
        #[arg(long)]
        database: Option<String>,
    },
    /// Copy everything (ids, versions, grants, tokens, audit chain) from one
    /// store into another, empty one. Stop the servers using --from first.
    MigrateStore {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SealKind {
    /// 32 random bytes in DATA_DIR/master.key (mode 0600).
    Keyfile,
    /// A passphrase (Argon2id); the server starts sealed until `keyward unseal`.
    Passphrase,
}

#[derive(Args, Clone, Default)]
pub struct ServerOpts {
    /// TOML config file with the same keys as these flags (flags win).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Database URL (default: sqlite://DATA_DIR/keyward.db).
    #[arg(long)]
    pub database: Option<String>,
    /// Serve this certificate chain (PEM) instead of the generated one.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

#[derive(Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub server: ServerOpts,
    #[arg(long, value_enum, default_value = "keyfile")]
    pub seal: SealKind,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub server: ServerOpts,
    /// Address to listen on (default 127.0.0.1:8443; port 0 picks a free one).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Extra trust roots (PEM) for upstreams with a private CA.
    #[arg(long)]
    pub upstream_ca: Option<PathBuf>,
    /// Pin an upstream name to an address, HOST=ADDRESS (repeatable); the
    /// network guard still checks the address.
    #[arg(long = "resolve")]
    pub resolve: Vec<String>,
    /// Seconds an upstream may stay silent before the proxy gives up (default 300).
    #[arg(long)]
    pub upstream_timeout: Option<u64>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// When a commit counts as written: fsync (default; on disk before an
    /// access proceeds) or buffered (handed to the OS, on disk within ~1 s;
    /// an OS crash or power cut can lose that last second).
    #[arg(long)]
    pub durability: Option<String>,
    /// Seal for a first-run initialisation.
    #[arg(long, value_enum, default_value = "keyfile")]
    pub seal: SealKind,
}

#[derive(Subcommand)]
pub enum OrgCmd {
    /// Create an organization (operator token only).
    Create {
        name: String,
    },
    List,
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a human token; printed once.
    Create {
        name: String,
        #[arg(long)]
        role: String,
        /// Date or duration (2027-01-31, 90d).
        #[arg(long)]
        expires: Option<String>,
    },
}

#[derive(Args)]
pub struct ValueSource {
    /// Read the value from this file instead of stdin or a prompt.
    #[arg(long)]
    pub from_file: Option<PathBuf>,
}

/// Automated rotation of a secret through a hook named in the server config.
#[derive(Args, Clone)]
pub struct AutoRotationArgs {
    /// Name of a `[[rotation_hooks]]` entry of the server config.
    #[arg(long)]
    pub rotation_hook: Option<String>,
    /// Give the hook the current value on stdin (for provider APIs that
    /// need it to issue or revoke).
    #[arg(long, requires = "rotation_hook")]
    pub hook_gets_value: bool,
    /// Probe that must answer 2xx with a new value before it becomes
    /// current, e.g. "GET /v1/models".
    #[arg(long, requires = "rotation_hook")]
    pub verify: Option<String>,
}

impl AutoRotationArgs {
    /// The API's `auto_rotation` object, or null.
    pub fn to_json(&self) -> serde_json::Value {
        match &self.rotation_hook {
            Some(hook) => serde_json::json!({"hook": hook, "pass_value": self.hook_gets_value, "verify": self.verify}),
            None => serde_json::Value::Null,
        }
    }
}

#[derive(Subcommand)]
pub enum SecretCmd {
    /// Store a key. The value comes from stdin, --from-file, or a no-echo prompt.
    Put {
        name: String,
        #[command(flatten)]
        source: ValueSource,
        /// openai, anthropic, stripe, slack, github, google, twilio or generic.
        #[arg(long)]
        provider: Option<String>,
        /// Origin the key may be sent to (default: the provider's).
        #[arg(long)]
        upstream: Option<String>,
        /// Let the upstream resolve to private/loopback/link-local addresses
        /// (an internal service). Cloud metadata addresses stay refused.
        #[arg(long)]
        allow_internal_upstream: bool,
        /// generic secrets: `header:NAME:TEMPLATE` or `query:NAME:TEMPLATE`
        /// with `{value}` in TEMPLATE, e.g. `header:X-Api-Key:{value}`.
        #[arg(long)]
        inject: Option<String>,
        /// Date or duration after which every use is denied.
        #[arg(long)]
        expires: Option<String>,
        /// Rotation policy (e.g. 90d): `secret list` flags it overdue after
        /// that; with --rotation-hook the server rotates it by itself.
        #[arg(long)]
        rotate_every: Option<String>,
        #[command(flatten)]
        auto: AutoRotationArgs,
        #[arg(long)]
        description: Option<String>,
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Metadata of every secret (never a value).
    List,
    /// Metadata of one secret (never its value).
    Show { name: String },
    /// Store a new current version (value from stdin, --from-file or
    /// prompt), or with --auto let the secret's rotation hook issue it.
    Rotate {
        name: String,
        #[command(flatten)]
        source: ValueSource,
        /// Rotate through the secret's hook: issue, verify, promote, revoke
        /// the old value at the provider. Any failure before promotion
        /// leaves the current version as it was.
        #[arg(long, conflicts_with_all = ["from_file", "grace", "expires"])]
        auto: bool,
        /// Keep the replaced version usable by reveal-mode consumers this
        /// long (e.g. 1h); default: revoked at once.
        #[arg(long)]
        grace: Option<String>,
        /// When the new version expires (date or duration).
        #[arg(long)]
        expires: Option<String>,
    },
    /// Replace a secret's rotation policy: interval and automated rotation
    /// (an option left out is cleared).
    Policy {
        name: String,
        /// e.g. 30d; `secret list` flags the secret overdue after that.
        #[arg(long)]
        rotate_every: Option<String>,
        #[command(flatten)]
        auto: AutoRotationArgs,
    },
    /// Make the previous version current again (within its grace period).
    Rollback { name: String },
    /// Every version of a secret and its state.
    Versions { name: String },
    /// Revoke the current version, or one version.
    Revoke {
        name: String,
        #[arg(long)]
        version: Option<i64>,
    },
    /// Delete a secret with its versions and grants.
    Delete { name: String },
}

#[derive(Subcommand)]
pub enum AgentCmd {
    /// Create an agent; its token is printed once.
    Create {
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// Token lifetime (e.g. 30d).
        #[arg(long)]
        ttl: Option<String>,
        /// Accept the token only from these networks (CIDR, repeatable).
        #[arg(long = "allow-from")]
        allow_from: Vec<String>,
    },
    /// The agent's token.
    #[command(subcommand)]
    Token(AgentTokenCmd),
    List,
    Show {
        name: String,
    },
    /// Kill switch: the agent's next request is refused.
    Disable {
        name: String,
    },
    /// Print the environment an agent needs for its proxy grants (base URL
    /// per provider SDK, token placeholder): moving an agent is copy-paste.
    Env {
        name: String,
    },
    Enable {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum AgentTokenCmd {
    /// Issue a new token (printed once); the old one stops now or after --overlap.
    Rotate {
        name: String,
        /// How long the old token keeps working (e.g. 1h), for a rolling redeploy.
        #[arg(long)]
        overlap: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum GrantCmd {
    /// Let an agent use a secret.
    Add {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        secret: String,
        /// proxy, reveal, or both (repeat or comma-separate).
        #[arg(long = "mode", required = true)]
        modes: Vec<String>,
        /// Date or duration after which the grant no longer works.
        #[arg(long)]
        expires: Option<String>,
    },
    List {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        secret: Option<String>,
    },
    Remove {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        secret: String,
    },
}

#[derive(Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: Option<AuditCmd>,
    #[arg(long)]
    pub secret: Option<String>,
    #[arg(long)]
    pub agent: Option<String>,
    #[arg(long)]
    pub action: Option<String>,
    /// allowed, denied or error.
    #[arg(long)]
    pub outcome: Option<String>,
    /// RFC 3339 time, date, or how far back (1h, 7d).
    #[arg(long)]
    pub since: Option<String>,
    /// Only events before this (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// Only events from this source address.
    #[arg(long)]
    pub source_ip: Option<String>,
    /// Page cursor: only events older than this sequence number (the
    /// `next_before` of the previous page).
    #[arg(long, conflicts_with = "follow")]
    pub before: Option<i64>,
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Keep printing new events as they happen (server-sent events).
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Subcommand)]
pub enum UserCmd {
    /// Create an account; the password (12+ characters) comes from a
    /// no-echo prompt or stdin.
    Create {
        name: String,
        #[arg(long)]
        role: String,
    },
    List,
}

#[derive(Args)]
pub struct AlertsArgs {
    #[command(subcommand)]
    pub command: Option<AlertsCmd>,
    /// Acknowledged alerts too.
    #[arg(long)]
    pub all: bool,
}

#[derive(Subcommand)]
pub enum AlertsCmd {
    /// Acknowledge an alert.
    Ack { id: String },
    /// Show or change the rules of the org, or of one agent (--agent);
    /// options given are merged into what is stored.
    Policy {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long, value_name = "on|off")]
        new_source_ip: Option<OnOff>,
        /// Alert when a minute's uses exceed F× the trailing average (0: off).
        #[arg(long)]
        rate_factor: Option<f64>,
        #[arg(long)]
        rate_min_per_minute: Option<u32>,
        /// Alert after N denials (0: off)...
        #[arg(long)]
        denials: Option<u32>,
        /// ...within M minutes.
        #[arg(long)]
        denials_window_minutes: Option<u32>,
        /// HH-HH in UTC, e.g. 08-18.
        #[arg(long)]
        allowed_hours: Option<String>,
        #[arg(long, value_name = "on|off")]
        dead_token: Option<OnOff>,
        #[arg(long, value_name = "on|off")]
        first_use: Option<OnOff>,
        /// Disable the agent when an alert fires for it.
        #[arg(long, value_name = "on|off")]
        quarantine: Option<OnOff>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl OnOff {
    pub fn get(self) -> bool {
        matches!(self, Self::On)
    }
}

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Check the hash chain and every signed checkpoint; names the first
    /// broken sequence number. With --file and --pubkey, checks an export
    /// offline, without a server.
    Verify {
        /// An export written by `keyward audit export`.
        #[arg(long, requires = "pubkey")]
        file: Option<PathBuf>,
        /// The PEM public key from `keyward audit pubkey`, kept apart from the server.
        #[arg(long, requires = "file")]
        pubkey: Option<PathBuf>,
    },
    /// The Ed25519 public key that signs checkpoints (PEM).
    Pubkey,
    /// Retention: delete events older than --before; a signed checkpoint
    /// anchors what remains, so it still verifies (operator token).
    Prune {
        /// RFC 3339 time, date, or how far back (e.g. 90d).
        #[arg(long)]
        before: String,
        /// Delete for real (without it: only count what would go).
        #[arg(long)]
        yes: bool,
    },
    /// The whole chain and its signed checkpoints (operator token).
    Export {
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Write here instead of stdout (created 0600).
        #[arg(long)]
        output: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// JSON lines: checkpoints first, then events in sequence order.
    Jsonl,
}
