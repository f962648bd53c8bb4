//! OpenPGP detached-signature checks for SHA256SUMS, as the Terraform CLI does them: the
//! signature must verify under one of the keys the registry's download answer lists (the primary
//! key or one of its subkeys). RSA and EdDSA keys both occur.

use pgp::composed::{Deserializable, DetachedSignature, SignedPublicKey};
use std::io::Cursor;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("the registry listed no signing keys")]
    NoKeys,
    #[error("none of the registry's signing keys could be read")]
    NoUsableKey,
    #[error("the signature file is not an OpenPGP signature")]
    BadSignature,
    #[error("SHA256SUMS is not signed by any of the registry's signing keys")]
    NotVerified,
}

/// Checks `signature` (binary or ASCII-armored) over `data` against the armored public keys.
/// Returns the fingerprint (hex) of the key that verified it.
pub fn verify_detached(
    data: &[u8],
    signature: &[u8],
    armored_keys: &[&str],
) -> Result<String, SignatureError> {
    if armored_keys.is_empty() {
        return Err(SignatureError::NoKeys);
    }
    let sig = DetachedSignature::from_bytes(Cursor::new(signature))
        .or_else(|_| DetachedSignature::from_armor_single(Cursor::new(signature)).map(|(s, _)| s))
        .map_err(|_| SignatureError::BadSignature)?;

    let keys: Vec<SignedPublicKey> = armored_keys
        .iter()
        .filter_map(|armor| {
            let (key, _) =
                SignedPublicKey::from_armor_single(Cursor::new(armor.as_bytes())).ok()?;
            // A key whose self-signatures do not hold is not the key it claims to be.
            key.verify_bindings().ok()?;
            Some(key)
        })
        .collect();
    if keys.is_empty() {
        return Err(SignatureError::NoUsableKey);
    }
    for key in &keys {
        if sig.verify(&key.primary_key, data).is_ok() {
            return Ok(format!(
                "{:x}",
                pgp::types::KeyDetails::fingerprint(&key.primary_key)
            ));
        }
        for sub in &key.public_subkeys {
            if sig.verify(&sub.key, data).is_ok() {
                return Ok(format!(
                    "{:x}",
                    pgp::types::KeyDetails::fingerprint(&key.primary_key)
                ));
            }
        }
    }
    Err(SignatureError::NotVerified)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pgp::composed::SignedSecretKey;
    use pgp::crypto::hash::HashAlgorithm;
    use pgp::types::Password;

    pub(crate) fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/keys/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn sign(secret: &str, data: &[u8]) -> Vec<u8> {
        let (key, _) = SignedSecretKey::from_armor_single(Cursor::new(secret.as_bytes())).unwrap();
        let sig = DetachedSignature::sign_binary_data(
            rand::thread_rng(),
            &key.primary_key,
            &Password::empty(),
            HashAlgorithm::Sha256,
            data,
        )
        .unwrap();
        pgp::ser::Serialize::to_bytes(&sig).unwrap()
    }

    const SUMS: &[u8] =
        b"0000000000000000000000000000000000000000000000000000000000000001  a.zip\n";

    #[test]
    fn rsa_and_eddsa_signatures_verify_with_their_key() {
        for name in ["rsa", "eddsa"] {
            let sig = sign(&fixture(&format!("{name}.secret.asc")), SUMS);
            let public = fixture(&format!("{name}.public.asc"));
            let other = fixture("other.public.asc");
            let fp = verify_detached(SUMS, &sig, &[&other, &public]).unwrap();
            assert_eq!(fp.len(), 40, "{name}");
        }
    }

    #[test]
    fn armored_signatures_verify_too() {
        let sig = sign(&fixture("eddsa.secret.asc"), SUMS);
        let (parsed, _) = DetachedSignature::from_bytes(Cursor::new(&sig))
            .map(|s| (s, ()))
            .unwrap();
        let armored = parsed.to_armored_bytes(Default::default()).unwrap();
        verify_detached(SUMS, &armored, &[&fixture("eddsa.public.asc")]).unwrap();
    }

    #[test]
    fn wrong_key_is_refused() {
        let sig = sign(&fixture("eddsa.secret.asc"), SUMS);
        assert_eq!(
            verify_detached(SUMS, &sig, &[&fixture("other.public.asc")]),
            Err(SignatureError::NotVerified)
        );
    }

    #[test]
    fn tampered_sums_are_refused() {
        let sig = sign(&fixture("rsa.secret.asc"), SUMS);
        let mut tampered = SUMS.to_vec();
        tampered[63] = b'2';
        assert_eq!(
            verify_detached(&tampered, &sig, &[&fixture("rsa.public.asc")]),
            Err(SignatureError::NotVerified)
        );
    }

    #[test]
    fn garbage_inputs_are_errors_not_panics() {
        let public = fixture("rsa.public.asc");
        assert_eq!(
            verify_detached(SUMS, b"not a signature", &[&public]),
            Err(SignatureError::BadSignature)
        );
        let sig = sign(&fixture("rsa.secret.asc"), SUMS);
        assert_eq!(
            verify_detached(SUMS, &sig, &["garbage"]),
            Err(SignatureError::NoUsableKey)
        );
        assert_eq!(
            verify_detached(SUMS, &sig, &[]),
            Err(SignatureError::NoKeys)
        );
    }
}
