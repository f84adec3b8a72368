//! Validation of ids and names, and the random ids and secrets the store makes.

use super::error::{StoreError, StoreResult};
use crate::ids::{DEFAULT_TAG, looks_like_uuid, split_template_name};

/// Lower-case RFC 4648 base32 letters: they fit `[a-z0-9]`, so generated ids pass our own checks.
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Prefix of every API key secret, so leaked keys are recognisable (secret scanners, logs).
pub(crate) const SECRET_PREFIX: &str = "moat_";
/// Base32 characters after [`SECRET_PREFIX`]: 200 bits of entropy.
pub(crate) const SECRET_CHARS: usize = 40;
/// Prefix of every API key id.
pub(crate) const KEY_ID_PREFIX: &str = "key_";
/// Base32 characters after [`KEY_ID_PREFIX`]: 80 bits, enough that ids never collide in practice.
const KEY_ID_CHARS: usize = 16;
/// Length of the sandbox ids [`generate_sandbox_id`] makes (100 bits).
const SANDBOX_ID_CHARS: usize = 20;

/// `count` random base32 characters from the OS RNG.
pub(crate) fn random_base32(count: usize) -> StoreResult<String> {
    let mut bytes = vec![0u8; count];
    getrandom::fill(&mut bytes).map_err(StoreError::Random)?;
    // 256 is a multiple of 32, so taking the low five bits of each byte is unbiased.
    Ok(bytes
        .iter()
        .map(|b| char::from(BASE32[usize::from(b & 31)]))
        .collect())
}

/// A fresh random sandbox id (20 characters of `[a-z2-7]`), valid for [`check_sandbox_id`].
pub fn generate_sandbox_id() -> StoreResult<String> {
    random_base32(SANDBOX_ID_CHARS)
}

/// A fresh API key id, `key_` and 16 base32 characters.
pub(crate) fn generate_key_id() -> StoreResult<String> {
    Ok(format!("{KEY_ID_PREFIX}{}", random_base32(KEY_ID_CHARS)?))
}

/// A fresh API key secret, `moat_` and 40 base32 characters.
pub(crate) fn generate_secret() -> StoreResult<String> {
    Ok(format!("{SECRET_PREFIX}{}", random_base32(SECRET_CHARS)?))
}

/// Whether `s` has the shape of a secret [`generate_secret`] makes; others cannot match any key.
pub(crate) fn looks_like_secret(s: &str) -> bool {
    s.strip_prefix(SECRET_PREFIX)
        .is_some_and(|rest| rest.len() == SECRET_CHARS && rest.bytes().all(|b| BASE32.contains(&b)))
}

/// SHA-256 of a secret: what the database keeps instead of the secret.
pub(crate) fn hash_secret(secret: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(secret.as_bytes()).into()
}

/// Equality whose time does not depend on where the inputs differ.
pub(crate) use moat_proto::secret::constant_time_eq;

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// Checks a tenant id: `[a-z0-9]{1,64}`.
pub fn check_tenant_id(id: &str) -> StoreResult<()> {
    if (1..=64).contains(&id.len()) && id.bytes().all(is_lower_alnum) {
        Ok(())
    } else {
        Err(StoreError::invalid(
            "tenant id",
            id,
            "1 to 64 characters of a-z and 0-9",
        ))
    }
}

/// Checks a sandbox id: `[a-z0-9]{16,64}`.
pub fn check_sandbox_id(id: &str) -> StoreResult<()> {
    if crate::ids::is_sandbox_id(id) {
        Ok(())
    } else {
        Err(StoreError::invalid(
            "sandbox id",
            id,
            "16 to 64 characters of a-z and 0-9",
        ))
    }
}

/// Whether `part` is `[a-z0-9][a-z0-9._-]{0,62}`: what a template's name and a tag are.
fn is_name_part(part: &str) -> bool {
    let bytes = part.as_bytes();
    (1..=63).contains(&bytes.len())
        && is_lower_alnum(bytes[0])
        && bytes[1..]
            .iter()
            .all(|&b| is_lower_alnum(b) || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a template name: a base `[a-z0-9][a-z0-9._-]{0,62}`, optionally followed by
/// `:tag` with a tag of the same shape. The tag `default` is the base alone and is written
/// so; a tag may not look like a UUID (a build's id where tags are named).
pub fn check_template_name(name: &str) -> StoreResult<()> {
    let (base, tag) = split_template_name(name);
    let shape = "1 to 63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or \
                 digit, optionally followed by ':' and a tag of the same characters";
    if !is_name_part(base) || tag.is_some_and(|t| !is_name_part(t)) {
        return Err(StoreError::invalid("template name", name, shape));
    }
    match tag {
        Some(DEFAULT_TAG) => Err(StoreError::invalid(
            "template name",
            name,
            format!("the tag {DEFAULT_TAG:?} is the name alone: write {base:?}"),
        )),
        Some(t) if looks_like_uuid(t) => Err(StoreError::invalid(
            "template name",
            name,
            "a tag may not look like a UUID, which names a build",
        )),
        _ => Ok(()),
    }
}

/// Checks an API key id's shape (`key_` and base32); anything else cannot exist.
pub(crate) fn check_key_id(id: &str) -> StoreResult<()> {
    match id.strip_prefix(KEY_ID_PREFIX) {
        Some(rest) if rest.len() == KEY_ID_CHARS && rest.bytes().all(|b| BASE32.contains(&b)) => {
            Ok(())
        }
        _ => Err(StoreError::invalid(
            "key id",
            id,
            "`key_` followed by 16 characters of a-z and 2-7",
        )),
    }
}

/// Checks a human-readable label (tenant or key name): 1 to 200 characters, no control characters.
pub(crate) fn check_label(what: &'static str, label: &str) -> StoreResult<()> {
    let chars = label.chars().count();
    if (1..=200).contains(&chars) && !label.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(StoreError::invalid(
            what,
            label,
            "1 to 200 characters, no control characters",
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generated_values_pass_their_checks() {
        for _ in 0..100 {
            let sandbox = generate_sandbox_id().unwrap();
            check_sandbox_id(&sandbox).unwrap();
            check_key_id(&generate_key_id().unwrap()).unwrap();
            assert!(looks_like_secret(&generate_secret().unwrap()));
        }
        assert_ne!(generate_secret().unwrap(), generate_secret().unwrap());
    }

    #[test]
    fn checks_reject_bad_values() {
        for bad in ["", "A", "a-b", "a b", &"a".repeat(65), "é"] {
            assert!(check_tenant_id(bad).is_err(), "{bad:?}");
        }
        check_tenant_id("acme1").unwrap();
        for bad in [
            "short",
            "ABCDEFGHIJKLMNOPQ",
            "abcdefghijklmnop-",
            &"a".repeat(65),
        ] {
            assert!(check_sandbox_id(bad).is_err(), "{bad:?}");
        }
        for bad in ["", ".x", "-x", "X", "a/b", "a b", &"a".repeat(64)] {
            assert!(check_template_name(bad).is_err(), "{bad:?}");
        }
        for good in ["host", "code-interpreter-v1", "a.b_c-d", &"a".repeat(63)] {
            check_template_name(good).unwrap();
        }
        let long_tag = format!("a:{}", "b".repeat(64));
        let uuid_tag = "a:0190f1e2-3c4d-8e5f-8a6b-7c8d9e0f1a2b";
        for bad in ["a:", ":a", "a:B", "a:b:c", "a:default", &long_tag, uuid_tag] {
            assert!(check_template_name(bad).is_err(), "{bad:?}");
        }
        for good in ["a:v1.2.0", "code-interpreter-v1:latest", "a:0"] {
            check_template_name(good).unwrap();
        }
        assert_eq!(split_template_name("py:v1"), ("py", Some("v1")));
        assert_eq!(split_template_name("py"), ("py", None));
        for bad in ["", "a\nb", &"x".repeat(201)] {
            assert!(check_label("name", bad).is_err(), "{bad:?}");
        }
        assert!(!looks_like_secret("moat_short"));
        assert!(!looks_like_secret(&format!("moat_{}", "A".repeat(40))));
    }

    #[test]
    fn invalid_values_are_echoed_bounded() {
        let long = "é".repeat(100);
        let msg = check_tenant_id(&long).unwrap_err().to_string();
        assert!(msg.len() < 300, "{msg}");
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
