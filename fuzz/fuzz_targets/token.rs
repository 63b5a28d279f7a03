//! Arbitrary bytes as an access token: the verifier must answer every input with a
//! `Result` (never a panic, a hang or unbounded memory), whatever the header, the
//! base64 or the JSON inside look like.
//!
//! The JWKS holds one ES256 key (`kid` "fuzz") and one EdDSA key ("fuzz-ed"), so
//! inputs that name them reach the signature check. Keys are made once per process.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use shoal_auth::{KeyRing, SigningKey, StaticJwks, Verifier, VerifierConfig};

struct Fixture {
    rt: tokio::runtime::Runtime,
    verifier: Verifier,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let es = SigningKey::generate_es256("fuzz").expect("generating the ES256 key");
        let ed = SigningKey::generate_ed25519("fuzz-ed").expect("generating the EdDSA key");
        let mut ring = KeyRing::new(es);
        // Keep the ES256 key listed beside the EdDSA one for as long as the run lasts.
        let forever = SystemTime::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        ring.rotate(ed, forever).expect("rotating in the EdDSA key");
        let jwks = ring.jwks().to_string();
        // Current-thread: one fuzz input at a time, no worker threads to race.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("building the runtime");
        let verifier = Verifier::new(
            VerifierConfig::new("https://id.fuzz", "fuzz"),
            Arc::new(StaticJwks(jwks.into())),
        );
        Fixture { rt, verifier }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let token = String::from_utf8_lossy(data);
    let _ = f.rt.block_on(f.verifier.verify(&token));
    // The same bytes as an Authorization header value, when they can be one.
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        let _ = f.rt.block_on(f.verifier.verify_bearer(Some(&value)));
    }
});
