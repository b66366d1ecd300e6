//! Accounts of the users and clients files, and their password hashes (argon2id, bcrypt).

use serde::Deserialize;

/// One account in the users or clients file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    #[serde(alias = "secret_hash")]
    pub password_hash: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub disabled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    Argon2,
    Bcrypt,
}

pub fn hash_kind(h: &str) -> Option<HashKind> {
    if h.starts_with("$argon2") {
        argon2::PasswordHash::new(h).ok().map(|_| HashKind::Argon2)
    } else if ["$2a$", "$2b$", "$2y$"].iter().any(|p| h.starts_with(p)) && h.len() == 60 {
        Some(HashKind::Bcrypt)
    } else {
        None
    }
}

/// Checks a password against an argon2 or bcrypt hash. Blocking: call off the async executor.
pub fn verify_password(password: &[u8], hash: &str) -> bool {
    match hash_kind(hash) {
        Some(HashKind::Argon2) => match argon2::PasswordHash::new(hash) {
            Ok(parsed) => argon2::PasswordVerifier::verify_password(&argon2::Argon2::default(), password, &parsed).is_ok(),
            Err(_) => false,
        },
        // bcrypt reads only 72 bytes, and stops at a NUL byte: a longer password must not match a hash of its
        // prefix, nor "pw\0anything" a hash of "pw". Same work, then no match.
        Some(HashKind::Bcrypt) if password.len() > 72 || password.contains(&0) => {
            let _ = bcrypt::verify(&password[..password.len().min(72)], hash);
            false
        }
        Some(HashKind::Bcrypt) => bcrypt::verify(password, hash).unwrap_or(false),
        None => false,
    }
}

/// Hashes a password with argon2id at the OWASP parameters (m=19 MiB, t=2, p=1).
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(19 * 1024, 2, 1, None).map_err(|e| e.to_string())?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut salt_bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt_bytes).map_err(|_| "no randomness".to_string())?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| e.to_string())?;
    a.hash_password(password, &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

pub fn hash_class(h: &str) -> &str {
    match hash_kind(h) {
        Some(HashKind::Argon2) => h.rsplitn(3, '$').nth(2).unwrap_or(h),
        _ => h.get(..7).unwrap_or(h),
    }
}

/// One real account hash per class in use, in a fixed order.
pub fn hash_classes<'a>(accounts: impl Iterator<Item = &'a Account>) -> Vec<String> {
    let mut by_class: std::collections::BTreeMap<&str, &str> = std::collections::BTreeMap::new();
    for a in accounts {
        by_class.entry(hash_class(&a.password_hash)).or_insert(&a.password_hash);
    }
    by_class.into_values().map(str::to_string).collect()
}
