//! Route matching: arbitrary bytes as `host\npath` through the gateway's path
//! normalisation and route table. Normalising must never panic, must be
//! idempotent, and an upstream path built from a match must stay an absolute path
//! without dot segments.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shoal_gateway::fuzzing::route(data);
});
