//! Short-lived Ed25519-signed tokens.
//!
//! Wire form: `ct1.<base64url(claims JSON)>.<base64url(Ed25519 signature)>`, the
//! signature covering the bytes `ct1.<base64url(claims JSON)>`. Two kinds exist:
//!
//! - **user** tokens, from `cloudtapctl login` (or `token issue`), naming a subject, the
//!   targets they may be used for (`*` = whatever policy allows) and the client
//!   certificate they are bound to;
//! - **session** tokens, from `OpenTunnel` / `RenewToken`, naming one session and its
//!   target, bound to the same certificate, presented on the tunnel port.
//!
//! Every token has a revocable id (`jti`, a UUIDv7). A token string is a secret: it
//! never appears in a log line, an error, or a record — only its id does.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "ct1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    User,
    Session,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub jti: String,
    pub kind: TokenKind,
    pub sub: String,
    /// Targets the token may be used for; `["*"]` = any the subject's policy allows.
    pub targets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Hex SHA-256 of the client certificate the token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<String>,
    /// Session tokens: the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// Session tokens: the id of the user token the session was opened with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub iat: i64,
    pub exp: i64,
}

impl Claims {
    pub fn allows_target(&self, target: &str) -> bool {
        self.targets.iter().any(|t| t == "*" || t == target)
    }
}

/// Why a token was refused. Messages say what to do next and never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed ({0}); run `cloudtapctl login` for a new one")]
    Malformed(String),
    #[error(
        "token signature is invalid (not issued by this edge's signing key); run `cloudtapctl login` for a new one"
    )]
    Forged,
    #[error(
        "token expired {ago_secs}s ago; run `cloudtapctl login` (the CLI does this by itself when it can)"
    )]
    Expired { ago_secs: i64 },
    #[error("token {jti} was revoked; ask an admin, then run `cloudtapctl login`")]
    Revoked { jti: String },
    #[error(
        "token is not valid for target {target:?}; log in for that target or ask an admin for access"
    )]
    WrongTarget { target: String },
    #[error(
        "token is bound to another client certificate; use the certificate you logged in with, or log in again"
    )]
    WrongCertificate,
    #[error("a {found:?} token was given where a {expected:?} token is needed")]
    WrongKind {
        expected: TokenKind,
        found: TokenKind,
    },
}

impl TokenError {
    /// Machine-readable code (used in refusals and policy-decision records).
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "token_malformed",
            TokenError::Forged => "token_forged",
            TokenError::Expired { .. } => "token_expired",
            TokenError::Revoked { .. } => "token_revoked",
            TokenError::WrongTarget { .. } => "token_wrong_target",
            TokenError::WrongCertificate => "token_wrong_certificate",
            TokenError::WrongKind { .. } => "token_wrong_kind",
        }
    }
}

/// The issuer's private key.
pub struct SigningKey(ed25519_dalek::SigningKey);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<secret>)")
    }
}

impl SigningKey {
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("the OS random source failed");
        Self(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    pub fn from_seed_hex(s: &str) -> Result<Self, TokenError> {
        let bytes: [u8; 32] = hex::decode(s.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| TokenError::Malformed("signing key must be 64 hex digits".into()))?;
        Ok(Self(ed25519_dalek::SigningKey::from_bytes(&bytes)))
    }

    pub fn seed_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.0.verifying_key().to_bytes())
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey(self.0.verifying_key())
    }

    /// A detached Ed25519 signature over `msg` (incident bundles' `manifest.sig`).
    pub fn sign_bytes(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let body = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let signed = format!("{PREFIX}.{body}");
        let sig = self.0.sign(signed.as_bytes());
        format!("{signed}.{}", B64.encode(sig.to_bytes()))
    }
}

/// The issuer's public key: all an edge needs to verify tokens.
#[derive(Debug, Clone)]
pub struct VerifyingKey(ed25519_dalek::VerifyingKey);

impl VerifyingKey {
    pub fn from_hex(s: &str) -> Result<Self, TokenError> {
        let bytes: [u8; 32] = hex::decode(s.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| TokenError::Malformed("public key must be 64 hex digits".into()))?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| TokenError::Malformed("not an Ed25519 public key".into()))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    /// Whether `sig` is this key's Ed25519 signature over `msg` (strict: no malleable
    /// encodings).
    pub fn verify_bytes(&self, msg: &[u8], sig: &[u8]) -> bool {
        let Ok(sig) = <[u8; 64]>::try_from(sig) else {
            return false;
        };
        self.0
            .verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig))
            .is_ok()
    }

    /// Checks form, signature and expiry. Scope, binding and revocation are the
    /// caller's (they need context the token does not carry).
    pub fn verify(&self, token: &str, now_unix: i64) -> Result<Claims, TokenError> {
        let mut parts = token.trim().split('.');
        let (Some(prefix), Some(body), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed(
                "expected three dot-separated parts".into(),
            ));
        };
        if prefix != PREFIX {
            return Err(TokenError::Malformed(format!(
                "unknown token version {prefix:?}"
            )));
        }
        let sig: [u8; 64] = B64
            .decode(sig)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(TokenError::Forged)?;
        self.0
            .verify(
                format!("{prefix}.{body}").as_bytes(),
                &ed25519_dalek::Signature::from_bytes(&sig),
            )
            .map_err(|_| TokenError::Forged)?;
        let claims: Claims = B64
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| TokenError::Malformed("claims are not valid JSON".into()))?;
        if claims.exp <= now_unix {
            return Err(TokenError::Expired {
                ago_secs: now_unix - claims.exp,
            });
        }
        Ok(claims)
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            jti: "id-1".into(),
            kind: TokenKind::User,
            sub: "alice".into(),
            targets: vec!["db".into()],
            roles: vec![],
            cnf: Some("ab".into()),
            sid: None,
            parent: None,
            iat: 0,
            exp,
        }
    }

    #[test]
    fn sign_verify_round_trip() {
        let k = SigningKey::generate();
        let t = k.sign(&claims(100));
        assert_eq!(k.verifying_key().verify(&t, 50).unwrap(), claims(100));
    }

    #[test]
    fn refusals() {
        let k = SigningKey::generate();
        let other = SigningKey::generate();
        let t = k.sign(&claims(100));
        assert_eq!(
            k.verifying_key().verify(&t, 130),
            Err(TokenError::Expired { ago_secs: 30 })
        );
        assert_eq!(
            other.verifying_key().verify(&t, 50),
            Err(TokenError::Forged)
        );
        // Changing the claims invalidates the signature.
        let (head, sig) = t.rsplit_once('.').unwrap();
        let tampered_claims = B64.encode(serde_json::to_vec(&claims(10_000)).unwrap());
        let tampered = format!("ct1.{tampered_claims}.{sig}");
        assert_ne!(head, tampered.rsplit_once('.').unwrap().0);
        assert_eq!(
            k.verifying_key().verify(&tampered, 50),
            Err(TokenError::Forged)
        );
        assert!(matches!(
            k.verifying_key().verify("nope", 0),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn errors_never_contain_the_token() {
        let k = SigningKey::generate();
        let t = k.sign(&claims(1));
        let err = k.verifying_key().verify(&t, 5).unwrap_err().to_string();
        assert!(!err.contains(t.split('.').nth(1).unwrap()));
    }
}
