//! The signed-URL verifier: arbitrary segments never verify unless signed, and what is signed
//! verifies for its own path only.
#![no_main]

use libfuzzer_sys::fuzz_target;
use terrapeak::auth::signing::Signer;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let signer = Signer::new(vec![b"fuzz key".to_vec()], 60);
    let mut parts = s.splitn(3, '/');
    let (exp, sig, path) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    // A random signature (43 base64url characters) matches with probability 2^-256.
    assert!(signer.verify(exp, sig, path, 0).is_err(), "{s}");
    let signed = signer.sign(path, 1_000);
    let mut own = signed.splitn(3, '/').skip(1);
    let (e, g) = (own.next().unwrap(), own.next().unwrap());
    assert!(signer.verify(e, g, path, 1_000).is_ok());
    let other = format!("{path}x");
    assert!(signer.verify(e, g, &other, 1_000).is_err());
});
