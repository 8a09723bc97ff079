//! Structural guards for DESIGN.md §2: plaintext is a type that cannot be
//! printed, and there is one place where a value is decrypted.

use std::fmt::{Debug, Display};
use std::path::Path;

use keyward_core::crypto::KeyMaterial;
use keyward_core::token::Token;
use keyward_core::vault::{Released, SecretValue};
use static_assertions::assert_not_impl_any;

// Invariant 7: values, keys and tokens cannot be printed or serialized.
assert_not_impl_any!(SecretValue: Debug, Display, serde::Serialize, Clone);
assert_not_impl_any!(KeyMaterial: Debug, Display, serde::Serialize, Clone);
assert_not_impl_any!(Token: Debug, Display, serde::Serialize, Clone);
assert_not_impl_any!(Released: Debug, serde::Serialize);

fn rust_files(dir: &Path, out: &mut Vec<(String, String)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if !p.ends_with("target") {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push((p.display().to_string(), std::fs::read_to_string(&p).unwrap()));
        }
    }
}

/// Invariant 1: the value AAD (needed to open a secret version) is used only
/// by the crypto module and the Vault, and the Vault's private decrypt is
/// called from exactly one place: `use_secret`, after the audit record.
#[test]
fn one_choke_point_for_decryption() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    rust_files(crates, &mut files);
    assert!(files.len() > 20, "scanned too few files: {}", files.len());
    let needle = concat!("value", "_aad(");
    for (path, text) in &files {
        if text.contains(needle) {
            assert!(
                path.ends_with("keyward-core/src/crypto.rs") || path.ends_with("keyward-core/src/vault.rs"),
                "{path} builds a value AAD: only the Vault may open secret versions"
            );
        }
    }
    let vault = std::fs::read_to_string(crates.join("keyward-core/src/vault.rs")).unwrap();
    assert!(vault.contains("\n    async fn decrypt_version("), "decrypt_version must stay private");
    assert_eq!(vault.matches("decrypt_version(").count(), 2, "one definition, one call");
    let use_secret = &vault[vault.find("pub async fn use_secret(").unwrap()..];
    let body = &use_secret[..use_secret.find("\n    }\n").unwrap()];
    let audit = body.find("let audit_seq = self.audit_now(draft).await?;").expect("audit before release");
    let decrypt = body.find("self.decrypt_version(").expect("decrypt in use_secret");
    assert!(audit < decrypt, "the audit record is committed before the value is decrypted");
}
