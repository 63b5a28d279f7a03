/// A signature algorithm shoal signs and accepts tokens with.
///
/// Asymmetric only: with a symmetric (HS*) algorithm anyone who can verify can also
/// sign, and the public key published in the JWKS would become a signing secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// ECDSA on P-256 with SHA-256 (`ES256`); JWK `kty: EC`, `crv: P-256`.
    Es256,
    /// Ed25519 (`EdDSA`); JWK `kty: OKP`, `crv: Ed25519`.
    EdDsa,
}

impl Algorithm {
    /// The name in a JWS header's and a JWK's `alg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
        }
    }

    /// The algorithm with exactly this `alg` name. Case-sensitive (RFC 7515 names are),
    /// so `none`, `None`, `HS256` and `es256` all come back `None`.
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        match name {
            "ES256" => Some(Self::Es256),
            "EdDSA" => Some(Self::EdDsa),
            _ => None,
        }
    }

    pub(crate) fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Self::Es256 => jsonwebtoken::Algorithm::ES256,
            Self::EdDsa => jsonwebtoken::Algorithm::EdDSA,
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
