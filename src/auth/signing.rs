//! Artifact URLs that authorise themselves. Terraform and OpenTofu send their token to the
//! registry JSON but never to zips, SHA256SUMS, signatures or module archives, so with access
//! control on, every artifact URL TerraPeak writes carries an HMAC-SHA256 over its own path and
//! an expiry, in the path itself (clients escape query strings differently):
//!
//! ```text
//! /artifacts/s/{expiry}/{signature}/providers/{host}/{ns}/{type}/{version}/{os}/{arch}/{file}
//! ```
//!
//! `expiry` is a Unix time in seconds; `signature` is the unpadded base64url HMAC of
//! `"{expiry}\n{path}"`, where `path` is everything after the signature (`providers/...`, which
//! names the upstream host). The first key signs, every key verifies, so keys rotate without
//! breaking URLs already handed out; replicas that share the keys accept each other's URLs.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a signed path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    /// Not of the form `{expiry}/{signature}`, or the signature is not base64url of 32 bytes.
    Malformed,
    /// No key made this signature for this path and expiry (forged, or for another artifact).
    Invalid,
    Expired,
}

impl SignatureError {
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureError::Malformed => "malformed signature",
            SignatureError::Invalid => "invalid signature",
            SignatureError::Expired => "expired signature",
        }
    }
}

/// Signs and verifies artifact paths.
pub struct Signer {
    keys: Vec<Vec<u8>>,
    ttl_secs: u64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("keys", &self.keys.len())
            .field("ttl_secs", &self.ttl_secs)
            .finish()
    }
}

fn mac(key: &[u8], expiry: u64, path: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(expiry.to_string().as_bytes());
    mac.update(b"\n");
    mac.update(path.as_bytes());
    mac
}

impl Signer {
    /// `keys` must not be empty; the first signs.
    pub fn new(keys: Vec<Vec<u8>>, ttl_secs: u64) -> Signer {
        assert!(!keys.is_empty(), "a signer needs a key");
        Signer { keys, ttl_secs }
    }

    /// `s/{expiry}/{signature}` for `path` (e.g. `providers/registry.terraform.io/...`),
    /// valid for the configured time from `now`.
    pub fn sign(&self, path: &str, now: u64) -> String {
        let expiry = now + self.ttl_secs;
        let tag = mac(&self.keys[0], expiry, path).finalize().into_bytes();
        format!("s/{expiry}/{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks the `expiry` and `signature` segments of a signed path against `path`.
    pub fn verify(
        &self,
        expiry: &str,
        signature: &str,
        path: &str,
        now: u64,
    ) -> Result<(), SignatureError> {
        if expiry.is_empty() || expiry.len() > 20 || !expiry.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SignatureError::Malformed);
        }
        let expiry: u64 = expiry.parse().map_err(|_| SignatureError::Malformed)?;
        if signature.len() != 43 {
            return Err(SignatureError::Malformed);
        }
        let tag = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| SignatureError::Malformed)?;
        // Every key is tried (constant time each), so timing says nothing about which matched.
        let valid = self
            .keys
            .iter()
            .map(|k| mac(k, expiry, path).verify_slice(&tag).is_ok())
            .fold(false, |any, ok| any | ok);
        if !valid {
            return Err(SignatureError::Invalid);
        }
        if expiry < now {
            return Err(SignatureError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "providers/registry.terraform.io/hashicorp/aws/5.0.0/linux/amd64/terraform-provider-aws_5.0.0_linux_amd64.zip";

    fn split(signed: &str) -> (String, String) {
        let mut parts = signed.splitn(3, '/');
        assert_eq!(parts.next(), Some("s"));
        (
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
        )
    }

    #[test]
    fn a_signature_verifies_for_its_path_until_it_expires() {
        let s = Signer::new(vec![b"key one".to_vec()], 3600);
        let (exp, sig) = split(&s.sign(PATH, 1_000));
        assert_eq!(exp, "4600");
        assert_eq!(sig.len(), 43);
        assert!(
            sig.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(s.verify(&exp, &sig, PATH, 1_000), Ok(()));
        assert_eq!(s.verify(&exp, &sig, PATH, 4_600), Ok(()));
        assert_eq!(
            s.verify(&exp, &sig, PATH, 4_601),
            Err(SignatureError::Expired)
        );
    }

    #[test]
    fn forged_transplanted_and_stretched_signatures_are_refused() {
        let s = Signer::new(vec![b"key one".to_vec()], 3600);
        let (exp, sig) = split(&s.sign(PATH, 1_000));
        // Another artifact, another upstream.
        let other = PATH.replace("linux/amd64", "darwin/arm64");
        assert_eq!(
            s.verify(&exp, &sig, &other, 1_000),
            Err(SignatureError::Invalid)
        );
        let elsewhere = PATH.replace("registry.terraform.io", "registry.opentofu.org");
        assert_eq!(
            s.verify(&exp, &sig, &elsewhere, 1_000),
            Err(SignatureError::Invalid)
        );
        // A later expiry with the same signature.
        assert_eq!(
            s.verify("99999", &sig, PATH, 1_000),
            Err(SignatureError::Invalid)
        );
        // Another key's signature.
        let forger = Signer::new(vec![b"guess".to_vec()], 3600);
        let (exp2, forged) = split(&forger.sign(PATH, 1_000));
        assert_eq!(
            s.verify(&exp2, &forged, PATH, 1_000),
            Err(SignatureError::Invalid)
        );
        for (e, g) in [
            ("", sig.as_str()),
            ("-1", sig.as_str()),
            ("1e9", sig.as_str()),
            ("99999999999999999999999", sig.as_str()),
            (exp.as_str(), ""),
            (exp.as_str(), "short"),
            (exp.as_str(), &"!".repeat(43)),
        ] {
            assert_eq!(
                s.verify(e, g, PATH, 1_000),
                Err(SignatureError::Malformed),
                "{e} {g}"
            );
        }
    }

    #[test]
    fn the_first_key_signs_and_every_key_verifies() {
        let old = Signer::new(vec![b"old".to_vec()], 3600);
        let rotated = Signer::new(vec![b"new".to_vec(), b"old".to_vec()], 3600);
        let (exp, sig) = split(&old.sign(PATH, 1_000));
        assert_eq!(rotated.verify(&exp, &sig, PATH, 1_000), Ok(()));
        let (exp, sig) = split(&rotated.sign(PATH, 1_000));
        assert_eq!(
            old.verify(&exp, &sig, PATH, 1_000),
            Err(SignatureError::Invalid)
        );
        let new_only = Signer::new(vec![b"new".to_vec()], 3600);
        assert_eq!(new_only.verify(&exp, &sig, PATH, 1_000), Ok(()));
    }
}
