//! Sandbox ids. An id names the sandbox's cgroups, runtime directory and kept marker, so it is
//! checked before it reaches a path.

use crate::{JailError, Result};

/// Checks that `id` is a safe sandbox id: 1 to 64 characters of `[a-z0-9]`.
pub fn validate_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(JailError::Invalid(format!(
            "invalid sandbox id {id:?}: 1 to 64 characters of [a-z0-9]"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_lowercase_alphanumerics() {
        for ok in ["a", "sbx0", &"z".repeat(64)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "A", "a-b", "../x", "a/b", "a b", &"z".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }
}
