//! The shapes of the ids the engine hands out, for front ends that must tell an id from a name
//! (or a malformed id from an unknown one) before they ask for it.

/// Whether `id` has the shape of a sandbox id: `[a-z0-9]{16,64}`.
pub fn is_sandbox_id(id: &str) -> bool {
    (16..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Whether `id` has the shape of a snapshot id (that of sandbox ids).
pub fn is_snapshot_id(id: &str) -> bool {
    is_sandbox_id(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert!(is_sandbox_id("abcdefghij234567"));
        assert!(!is_sandbox_id("abcdefghij23456"));
        assert!(!is_sandbox_id("Abcdefghij234567"));
        assert!(!is_snapshot_id("base"));
    }
}
