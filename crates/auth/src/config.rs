use serde::Deserialize;

/// What a [`Verifier`](crate::Verifier) accepts, and how often it refetches keys.
///
/// In TOML (every key but `issuer` and `audience` has a default):
/// ```toml
/// issuer = "https://id.shop.example"
/// audience = "shop-gateway"
/// leeway_s = 30
/// jwks_refresh_min_interval_ms = 10000
/// jwks_max_age_ms = 300000
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifierConfig {
    /// The `iss` every accepted token carries, compared byte for byte: the issuer is
    /// who signs, so a token from another issuer is refused even if its key were known.
    pub issuer: String,
    /// A value the token's `aud` (a string or an array) must contain: it keeps a token
    /// minted for another service from being replayed here.
    pub audience: String,
    /// Clock skew forgiven on `exp` and `nbf`, in seconds. Issuer and verifier clocks
    /// differ a little; a large value extends every token's life by as much.
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
    /// Least time between two JWKS fetches caused by a token with an unknown `kid`,
    /// and after a failed fetch before the next one. Bounds how hard tokens with made-up
    /// `kid`s (or an identity service that is down) can make the verifier hit the
    /// identity service.
    #[serde(default = "default_jwks_refresh_min_interval_ms")]
    pub jwks_refresh_min_interval_ms: u64,
    /// Age after which the cached JWKS is fetched again before use. Bounds how long a
    /// revoked key keeps being accepted.
    #[serde(default = "default_jwks_max_age_ms")]
    pub jwks_max_age_ms: u64,
}

/// Largest `leeway_s` [`VerifierConfig::validate`] accepts: more is no longer skew.
const MAX_LEEWAY_S: u64 = 300;

fn default_leeway_s() -> u64 {
    30
}

fn default_jwks_refresh_min_interval_ms() -> u64 {
    10_000
}

fn default_jwks_max_age_ms() -> u64 {
    300_000
}

impl VerifierConfig {
    /// A config for this issuer and audience with every other field at its default.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            leeway_s: default_leeway_s(),
            jwks_refresh_min_interval_ms: default_jwks_refresh_min_interval_ms(),
            jwks_max_age_ms: default_jwks_max_age_ms(),
        }
    }

    /// Refuse a config that would accept too much: an empty issuer or audience, or a
    /// leeway over 300 s. Call it where the config is loaded, so a mistake stops the start.
    pub fn validate(&self) -> Result<(), shoal_core::Error> {
        if self.issuer.is_empty() {
            return Err(shoal_core::Error::config("token issuer must not be empty"));
        }
        if self.audience.is_empty() {
            return Err(shoal_core::Error::config(
                "token audience must not be empty",
            ));
        }
        if self.leeway_s > MAX_LEEWAY_S {
            return Err(shoal_core::Error::config(format!(
                "token leeway_s is {}, at most {MAX_LEEWAY_S} is allowed",
                self.leeway_s
            )));
        }
        Ok(())
    }
}
