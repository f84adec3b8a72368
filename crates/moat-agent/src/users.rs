//! Users of the sandbox, read from the sandbox's own `/etc/passwd` and `/etc/group`.
//!
//! The agent is a static binary, so it never calls the C library's NSS functions; it parses the
//! files itself.

use std::fs;

/// A user processes and file operations can run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id inside the sandbox.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids (from `/etc/group`).
    pub groups: Vec<u32>,
    /// Home directory.
    pub home: String,
    /// Login shell.
    pub shell: String,
}

/// Looks `name` up in `/etc/passwd` and `/etc/group` of the sandbox.
pub fn lookup(name: &str) -> Option<User> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    lookup_in(name, &passwd, &group)
}

/// Looks `name` up in the given passwd and group texts.
pub fn lookup_in(name: &str, passwd: &str, group: &str) -> Option<User> {
    let line = passwd.lines().find(|l| l.split(':').next() == Some(name))?;
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 {
        return None;
    }
    let uid = f[2].parse().ok()?;
    let gid = f[3].parse().ok()?;
    let mut groups = vec![gid];
    for g in group.lines() {
        let gf: Vec<&str> = g.split(':').collect();
        if gf.len() < 4 {
            continue;
        }
        if gf[3].split(',').any(|m| m == name)
            && let Ok(id) = gf[2].parse::<u32>()
            && !groups.contains(&id)
        {
            groups.push(id);
        }
    }
    Some(User {
        name: name.to_string(),
        uid,
        gid,
        groups,
        home: f[5].to_string(),
        shell: f[6].to_string(),
    })
}

/// The name of `uid` in `/etc/passwd` (or the number as text when it has none).
pub fn user_name(uid: u32) -> String {
    name_of(uid, "/etc/passwd")
}

/// The name of `gid` in `/etc/group` (or the number as text when it has none).
pub fn group_name(gid: u32) -> String {
    name_of(gid, "/etc/group")
}

fn name_of(id: u32, file: &str) -> String {
    let text = fs::read_to_string(file).unwrap_or_default();
    let want = id.to_string();
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == want)
        .map(|f| f[0].to_string())
        .unwrap_or(want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_user_and_groups() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\n";
        let group = "root:x:0:\nuser:x:1000:\nsudo:x:27:user,other\n";
        let u = lookup_in("user", passwd, group).expect("user");
        assert_eq!((u.uid, u.gid, u.home.as_str()), (1000, 1000, "/home/user"));
        assert_eq!(u.groups, vec![1000, 27]);
        assert!(lookup_in("nobody", passwd, group).is_none());
    }
}
