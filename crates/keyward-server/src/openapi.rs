//! The OpenAPI 3.1 document served at `/openapi.json`, generated from the
//! same route table the tests check against the router.

use serde_json::{Value, json};

/// (method, path, summary, auth) for every route.
pub const ROUTES: &[(&str, &str, &str, &str)] = &[
    ("get", "/", "Redirects to the dashboard, /ui/ (server-rendered pages; sessions, not tokens)", "none"),
    ("get", "/healthz", "Liveness probe", "none"),
    ("get", "/openapi.json", "This document", "none"),
    ("get", "/v1/sys/status", "Seal state, backend, version", "none"),
    ("post", "/v1/sys/unseal", "Unseal a passphrase-sealed server: {\"passphrase\"}", "none"),
    (
        "get",
        "/v1/resolve/{secret}",
        "Agent: current value of a reveal-mode grant, or ?version=N of a previous one in its grace period (audited; X-Keyward-Purpose)",
        "agent",
    ),
    ("get", "/proxy/{secret}", "Agent: proxy to the secret's bound upstream root (any method)", "agent"),
    (
        "get",
        "/proxy/{secret}/{path}",
        "Agent: any method; forwarded to the secret's bound origin with the real key injected (proxy-mode grant). The agent token goes where its SDK puts the API key.",
        "agent",
    ),
    ("post", "/proxy/{secret}/{path}", "Agent: as GET; request and response bodies stream", "agent"),
    ("get", "/v1/orgs", "List organizations", "user"),
    ("post", "/v1/orgs", "Create an organization (operator token)", "user"),
    ("post", "/v1/orgs/{org}/tokens", "Create a human token with a role (owner)", "user"),
    ("get", "/v1/orgs/{org}/users", "Dashboard accounts of the org", "user"),
    ("post", "/v1/orgs/{org}/users", "Create a dashboard account: {name, role, password} (owner)", "user"),
    ("get", "/v1/orgs/{org}/secrets", "List secrets (metadata only)", "user"),
    ("post", "/v1/orgs/{org}/secrets", "Store a secret (value is write-only)", "user"),
    ("get", "/v1/orgs/{org}/secrets/{secret}", "Show a secret's metadata", "user"),
    ("delete", "/v1/orgs/{org}/secrets/{secret}", "Delete a secret, its versions and grants", "user"),
    (
        "post",
        "/v1/orgs/{org}/secrets/{secret}/rotate",
        "Add a new current version ({value, grace?, expires?}), or rotate through the secret's hook ({auto: true})",
        "user",
    ),
    (
        "put",
        "/v1/orgs/{org}/secrets/{secret}/policy",
        "Replace the rotation policy ({rotate_every?, auto_rotation?: {hook, pass_value?, verify?}})",
        "user",
    ),
    ("post", "/v1/orgs/{org}/secrets/{secret}/revoke", "Revoke one version or all", "user"),
    (
        "post",
        "/v1/orgs/{org}/secrets/{secret}/rollback",
        "Make the previous version current again (within its grace period)",
        "user",
    ),
    ("get", "/metrics", "Prometheus text: secrets by status, uses by mode and outcome (counts only)", "user"),
    ("get", "/v1/orgs/{org}/agents", "List agents", "user"),
    ("post", "/v1/orgs/{org}/agents", "Create an agent; its token is returned once", "user"),
    ("get", "/v1/orgs/{org}/agents/{agent}", "Show an agent and its grants", "user"),
    ("post", "/v1/orgs/{org}/agents/{agent}/disable", "Disable an agent (kill switch)", "user"),
    ("post", "/v1/orgs/{org}/agents/{agent}/enable", "Enable an agent", "user"),
    (
        "post",
        "/v1/orgs/{org}/agents/{agent}/token",
        "Rotate an agent's token ({overlap?}); the new one is returned once",
        "user",
    ),
    ("get", "/v1/orgs/{org}/grants", "List grants (?agent=&secret=)", "user"),
    ("post", "/v1/orgs/{org}/grants", "Grant an agent use of a secret", "user"),
    ("delete", "/v1/orgs/{org}/grants/{agent}/{secret}", "Remove a grant", "user"),
    (
        "get",
        "/v1/orgs/{org}/audit",
        "Query the audit trail, newest first (?secret=&agent=&action=&outcome=&source_ip=&since=&until=&before=&limit=); next_before is the cursor of the next page",
        "user",
    ),
    (
        "get",
        "/v1/orgs/{org}/audit/follow",
        "Server-sent events: new audit events matching the same filters as /audit (Last-Event-ID resumes)",
        "user",
    ),
    ("get", "/v1/orgs/{org}/audit/verify", "Verify the audit hash chain and every signed checkpoint", "user"),
    ("get", "/v1/orgs/{org}/audit/pubkey", "The Ed25519 public key that signs audit checkpoints (PEM)", "user"),
    ("get", "/v1/audit/export", "The whole chain in sequence order (?after=SEQ&limit=N; operator token)", "user"),
    ("get", "/v1/audit/checkpoints", "Every signed checkpoint (operator token)", "user"),
    (
        "post",
        "/v1/audit/prune",
        "Retention: delete events older than {before} ({dry_run?}); a signed checkpoint anchors the rest (operator token)",
        "user",
    ),
    ("get", "/v1/orgs/{org}/alerts", "Anomaly alerts, newest first (?all=true: acknowledged too)", "user"),
    ("post", "/v1/orgs/{org}/alerts/{id}/ack", "Acknowledge an alert", "user"),
    ("get", "/v1/orgs/{org}/anomaly-policy", "Anomaly rules of the org or ?agent=NAME: stored and effective", "user"),
    ("put", "/v1/orgs/{org}/anomaly-policy", "Merge rule settings into the org's or ?agent=NAME's policy", "user"),
];

pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary, auth) in ROUTES {
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let security = match *auth {
            "none" => json!([]),
            "agent" => json!([{"agentToken": []}]),
            _ => json!([{"userToken": []}]),
        };
        let op = json!({
            "summary": summary,
            "parameters": params,
            "security": security,
            "responses": {
                "200": {"description": "OK"},
                "default": {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        paths
            .entry(path.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object")
            .insert(method.to_string(), op);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "keyward", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Self-hosted credential broker for AI agents. No endpoint returns a stored value to a human."},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "userToken": {"type": "http", "scheme": "bearer", "description": "kwu_… human/admin token"},
                "agentToken": {"type": "http", "scheme": "bearer", "description": "kwa_… agent token"}
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
            }
        }
    })
}
