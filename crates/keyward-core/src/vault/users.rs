//! Human accounts and dashboard sessions. Passwords are kept as Argon2id
//! hashes (OWASP's 19 MiB, 2 passes); sessions are random cookies of which
//! only the SHA-256 is stored, with an idle and an absolute timeout and an
//! anti-CSRF token each. A logged-in human acts through the same vault
//! calls as the API, as a principal with their role.

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;

use super::*;

pub const SESSION_IDLE: time::Duration = time::Duration::minutes(30);
pub const SESSION_MAX: time::Duration = time::Duration::hours(12);
const MIN_PASSWORD: usize = 12;
/// Sessions are touched at most this often (a write per page view is waste).
const TOUCH_EVERY: time::Duration = time::Duration::seconds(60);

/// A successful login: the cookie value (shown to the browser only).
pub struct Login {
    pub cookie: Zeroizing<String>,
    pub user: User,
}

/// The human behind a live session.
pub struct SessionInfo {
    pub principal: Principal,
    pub user: User,
    pub csrf: String,
}

fn argon_params() -> (u32, u32, u32) {
    if std::env::var("KEYWARD_INSECURE_FAST_KDF").as_deref() == Ok("1") { (1024, 1, 1) } else { (19_456, 2, 1) }
}

fn argon(m: u32, t: u32, p: u32) -> Result<argon2::Argon2<'static>, CoreError> {
    let params = argon2::Params::new(m, t, p, Some(32)).map_err(|e| CoreError::invalid("password", e.to_string()))?;
    Ok(argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params))
}

/// `$argon2id$v=19$m=…,t=…,p=…$SALT$HASH` (PHC string format).
fn hash_password(password: &str) -> Result<String, CoreError> {
    let (m, t, p) = argon_params();
    let mut salt = [0u8; 16];
    crate::crypto::random_bytes(&mut salt)?;
    let mut out = Zeroizing::new([0u8; 32]);
    argon(m, t, p)?
        .hash_password_into(password.as_bytes(), &salt, out.as_mut())
        .map_err(|e| CoreError::invalid("password", e.to_string()))?;
    Ok(format!("$argon2id$v=19$m={m},t={t},p={p}${}${}", B64.encode(salt), B64.encode(out.as_ref())))
}

fn verify_password(stored: &str, password: &str) -> bool {
    let parts: Vec<&str> = stored.split('$').collect();
    let [_, "argon2id", "v=19", params, salt, hash] = parts[..] else { return false };
    let mut mtp = [0u32; 3];
    for (i, kv) in params.split(',').enumerate().take(3) {
        mtp[i] = kv.split_once('=').and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    }
    let (Ok(salt), Ok(expected)) = (B64.decode(salt), B64.decode(hash)) else { return false };
    let Ok(a) = argon(mtp[0], mtp[1], mtp[2]) else { return false };
    let mut out = Zeroizing::new(vec![0u8; expected.len()]);
    if a.hash_password_into(password.as_bytes(), &salt, &mut out).is_err() {
        return false;
    }
    token::hashes_equal_slices(&out, &expected)
}

fn principal_of(u: &User) -> Principal {
    Principal { token_id: u.id.clone(), name: u.name.clone(), org_id: Some(u.org_id.clone()), role: u.role }
}

impl Vault {
    /// Creates a dashboard account in an org (owners only).
    pub async fn create_user(
        &self,
        p: &Principal,
        org: &str,
        name: &str,
        role: Role,
        password: Zeroizing<String>,
        meta: &RequestMeta,
    ) -> Result<User, CoreError> {
        validate_name("user name", name)?;
        if password.chars().count() < MIN_PASSWORD {
            return Err(CoreError::invalid("password", format!("must be at least {MIN_PASSWORD} characters")));
        }
        let draft = AuditDraft {
            reason: Some(format!("user={name} role={}", role.as_str())),
            ..self.admin_draft("user.create", None, meta)
        };
        let org = self.authorize(p, org, Role::Owner, draft).await?;
        self.insert_user(&org.id, name, role, password).await
    }

    async fn insert_user(
        &self,
        org_id: &str,
        name: &str,
        role: Role,
        password: Zeroizing<String>,
    ) -> Result<User, CoreError> {
        let _slot = self.password_work.acquire().await.ok(); // never closed
        let password_hash = tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| CoreError::invalid("password", e.to_string()))??;
        let user = User {
            id: new_id("usr"),
            org_id: org_id.into(),
            name: name.into(),
            role,
            password_hash,
            created_at: self.now(),
        };
        self.store.create_user(&user).await.map_err(dup("user"))?;
        Ok(user)
    }

    pub async fn list_users(&self, p: &Principal, org: &str) -> Result<Vec<User>, CoreError> {
        self.ensure_unsealed()?;
        let org = self.org_for(p, org).await?;
        Ok(self.store.list_users().await?.into_iter().filter(|u| u.org_id == org.id).collect())
    }

    /// True until the first account exists.
    pub async fn needs_setup(&self) -> Result<bool, CoreError> {
        Ok(self.store.list_users().await?.is_empty())
    }

    /// The first account (an owner of the default org), made with the
    /// one-time operator token from `init`. Refused once any account exists.
    pub async fn setup_first_user(
        &self,
        operator_token: &str,
        name: &str,
        password: Zeroizing<String>,
        meta: &RequestMeta,
    ) -> Result<User, CoreError> {
        let p = self.authenticate_user(operator_token, meta).await?;
        if p.org_id.is_some() {
            return Err(forbidden("operator_only", "the first account is made with the operator token from `init`"));
        }
        if !self.needs_setup().await? {
            return Err(CoreError::Conflict { message: "an account exists already: log in".into() });
        }
        self.create_user(&p, DEFAULT_ORG, name, Role::Owner, password, meta).await
    }

    /// Checks a name and password; failures are audited and rate-limited
    /// per source address (429 past the limit).
    pub async fn login(&self, name: &str, password: Zeroizing<String>, meta: &RequestMeta) -> Result<Login, CoreError> {
        self.ensure_unsealed()?;
        // Past the failure limit no guess is tried, the right one included.
        if self.failures.over_limit(meta.source_ip.as_deref()) {
            return Err(CoreError::RateLimited);
        }
        let user = self.store.user_by_name(name).await?;
        // The same Argon2id work whether or not the account exists.
        let stored = user.as_ref().map(|u| u.password_hash.clone()).unwrap_or_else(|| {
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into()
        });
        let ok = {
            let _slot = self.password_work.acquire().await.ok(); // never closed
            tokio::task::spawn_blocking(move || verify_password(&stored, &password)).await.unwrap_or(false)
        };
        // Only an existing account's name goes to the trail: what was typed
        // for an unknown one may be a password (or a key) in the wrong field.
        let who = user.as_ref().map_or_else(|| "(unknown)".to_owned(), |u| clean_free_text(&u.name));
        let Some(user) = user.filter(|_| ok) else {
            self.audit_failure(AuditDraft {
                actor: Actor::anonymous(),
                action: "auth.login".into(),
                reason: Some(format!("bad_credentials user={who}")),
                ..draft_base(self.now(), Outcome::Denied, meta)
            })
            .await?;
            return Err(CoreError::Unauthenticated { reason: "bad_credentials" });
        };
        let mut raw = [0u8; 32];
        crate::crypto::random_bytes(&mut raw)?;
        let cookie = Zeroizing::new(B64.encode(raw));
        let mut csrf = [0u8; 24];
        crate::crypto::random_bytes(&mut csrf)?;
        let now = self.now();
        let session = Session {
            hash: token::hash_token(&cookie),
            user_id: user.id.clone(),
            csrf: B64.encode(csrf),
            created_at: now,
            last_seen: now,
            expires_at: now + SESSION_MAX,
        };
        self.store.create_session(&session).await?;
        self.audit_now(AuditDraft {
            org_id: Some(user.org_id.clone()),
            actor: principal_of(&user).actor(),
            action: "user.login".into(),
            ..draft_base(now, Outcome::Allowed, meta)
        })
        .await?;
        Ok(Login { cookie, user })
    }

    /// The live session a cookie names, if any (idle and absolute limits).
    pub async fn session(&self, cookie: &str) -> Result<Option<SessionInfo>, CoreError> {
        self.ensure_unsealed()?;
        let hash = token::hash_token(cookie);
        let Some(s) = self.store.session_by_hash(&hash).await? else { return Ok(None) };
        let now = self.now();
        if now >= s.expires_at || now - s.last_seen >= SESSION_IDLE {
            self.store.delete_session(&hash).await?;
            return Ok(None);
        }
        let Some(user) = self.store.user_by_id(&s.user_id).await? else { return Ok(None) };
        if now - s.last_seen >= TOUCH_EVERY {
            self.store.touch_session(&hash, now).await?;
        }
        Ok(Some(SessionInfo { principal: principal_of(&user), user, csrf: s.csrf }))
    }

    pub async fn logout(&self, cookie: &str, meta: &RequestMeta) -> Result<(), CoreError> {
        let hash = token::hash_token(cookie);
        let session = self.store.session_by_hash(&hash).await?;
        // Ended first: a logout ends the session even when the audit trail
        // refuses the event (the error is still reported).
        self.store.delete_session(&hash).await?;
        if let Some(s) = session
            && let Some(user) = self.store.user_by_id(&s.user_id).await?
        {
            self.audit_now(AuditDraft {
                org_id: Some(user.org_id.clone()),
                actor: principal_of(&user).actor(),
                action: "user.logout".into(),
                ..draft_base(self.now(), Outcome::Allowed, meta)
            })
            .await?;
        }
        Ok(())
    }

    /// Uses per UTC day for the last `days` days (oldest first, zeros kept).
    pub async fn usage_per_day(
        &self,
        p: &Principal,
        org: &str,
        secret: Option<&str>,
        days: i64,
    ) -> Result<Vec<(OffsetDateTime, i64)>, CoreError> {
        self.ensure_unsealed()?;
        let org = self.org_for(p, org).await?;
        let secret_id = match secret {
            Some(s) => Some(self.find_secret_in(&org, s).await?.id),
            None => None,
        };
        let today = self.now().unix_timestamp().div_euclid(86_400);
        let since = OffsetDateTime::from_unix_timestamp((today - days + 1) * 86_400).unwrap_or(self.now());
        let counts: std::collections::HashMap<i64, i64> =
            self.store.uses_per_day(&org.id, secret_id.as_deref(), since).await?.into_iter().collect();
        Ok(((today - days + 1)..=today)
            .map(|d| {
                (OffsetDateTime::from_unix_timestamp(d * 86_400).unwrap_or(since), counts.get(&d).copied().unwrap_or(0))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m="));
        assert!(verify_password(&h, "correct horse battery"));
        assert!(!verify_password(&h, "correct horse batterx"));
        assert!(!verify_password("garbage", "x"));
        assert_ne!(hash_password("same password!").unwrap(), hash_password("same password!").unwrap(), "salted");
    }
}
