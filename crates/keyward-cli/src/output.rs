//! Human-readable output. With `--json` commands print the API's JSON as is.

use serde_json::Value;

pub fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(s).collect();
            if parts.is_empty() { "-".into() } else { parts.join(",") }
        }
        other => other.to_string(),
    }
}

/// Prints rows as aligned columns under a header.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        debug_assert_eq!(r.len(), header.len(), "a row does not match the header");
        for (i, c) in r.iter().enumerate().take(width.len()) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> =
            cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = width.get(i).copied().unwrap_or(0))).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

pub fn secret_detail(v: &Value) {
    println!("name:        {}", s(&v["name"]));
    println!("id:          {}", s(&v["id"]));
    println!("status:      {}", s(&v["status"]));
    println!("provider:    {}", s(&v["provider"]));
    println!("upstream:    {}", s(&v["upstream"]));
    println!("description: {}", s(&v["description"]));
    println!("tags:        {}", s(&v["tags"]));
    println!("created:     {}", s(&v["created_at"]));
    println!("updated:     {}", s(&v["updated_at"]));
    println!("expires:     {}", s(&v["expires_at"]));
    println!("current:     v{}", s(&v["current_version"]));
    let every = v["rotate_every_secs"].as_i64().map_or("-".to_owned(), |secs| match secs % 86_400 {
        0 => format!("{}d", secs / 86_400),
        _ => format!("{secs}s"),
    });
    println!("rotate every: {every}");
    let auto = &v["auto_rotation"];
    if let Some(hook) = auto["hook"].as_str() {
        println!(
            "rotation hook: {hook}  gets value: {}  verify: {}",
            auto["pass_value"].as_bool().unwrap_or(false),
            auto["verify"].as_str().unwrap_or("-")
        );
    }
    println!("last used:   {}", s(&v["last_used"]));
    println!("versions:");
    for ver in v["versions"].as_array().into_iter().flatten() {
        println!(
            "  v{:<4} {:<8} fingerprint {}  created {}  grace until {}  expires {}  revoked {}",
            s(&ver["version"]),
            s(&ver["state"]),
            s(&ver["fingerprint"]),
            s(&ver["created_at"]),
            s(&ver["grace_until"]),
            s(&ver["expires_at"]),
            s(&ver["revoked_at"])
        );
    }
    println!("grants:");
    for g in v["grants"].as_array().into_iter().flatten() {
        println!("  agent {}  modes {}  expires {}", s(&g["agent_id"]), modes(&g["modes"]), s(&g["expires_at"]));
    }
}

pub fn modes(m: &Value) -> String {
    let mut v = Vec::new();
    if m["proxy"].as_bool() == Some(true) {
        v.push("proxy");
    }
    if m["reveal"].as_bool() == Some(true) {
        v.push("reveal");
    }
    v.join(",")
}
