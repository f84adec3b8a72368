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

/// Separates a template's name from its tag (`name:tag`).
pub const TAG_SEPARATOR: char = ':';

/// The tag a template's name alone stands for; never written as a tag.
pub const DEFAULT_TAG: &str = "default";

/// Whether `text` has the shape of a UUID (`8-4-4-4-12` hex digits), which is how a build is
/// named where tags are (`name:<build id>` in E2B's API), so no tag may have it.
pub fn looks_like_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A template name split into its base and its tag (`None` for a name without one).
pub fn split_template_name(name: &str) -> (&str, Option<&str>) {
    match name.split_once(TAG_SEPARATOR) {
        Some((base, tag)) => (base, Some(tag)),
        None => (name, None),
    }
}

/// Whether template `name` is `base` itself or one of its tags.
pub fn is_of_name(name: &str, base: &str) -> bool {
    split_template_name(name).0 == base
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
