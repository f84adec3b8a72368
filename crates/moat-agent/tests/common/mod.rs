//! Helpers shared by the agent's integration tests. They run as root on the host, in temporary
//! directories under `/tmp`.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use moat_agent::state::AgentState;
use moat_agent::users::User;
use moat_proto::agent_config::AgentConfig;

/// True when the tests run as root; the file services switch credentials, which needs it.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips the calling test (returns early) with a printed reason unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !common::is_root() {
            eprintln!("skipped: needs root (switches file credentials)");
            return;
        }
    };
}

/// A temporary directory under `/tmp` that other users can traverse (tempfile makes 0700 ones).
pub fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("moat-agent-test")
        .tempdir_in("/tmp")
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

/// Root, with `home` as its home directory.
pub fn root_user(home: &Path) -> User {
    User {
        name: "root".into(),
        uid: 0,
        gid: 0,
        groups: vec![0],
        home: home.to_str().expect("utf-8").to_string(),
        shell: "/bin/sh".into(),
    }
}

/// A uid-1000 user (whether or not the host has one) whose home `home` is created and owned by
/// it.
pub fn plain_user(home: &Path) -> User {
    std::fs::create_dir_all(home).expect("home");
    std::os::unix::fs::chown(home, Some(1000), Some(1000)).expect("chown home");
    User {
        name: "user".into(),
        uid: 1000,
        gid: 1000,
        groups: vec![1000],
        home: home.to_str().expect("utf-8").to_string(),
        shell: "/bin/sh".into(),
    }
}

/// Agent state whose default user is `default_user`.
pub fn state(default_user: &str) -> Arc<AgentState> {
    Arc::new(AgentState::new(AgentConfig {
        default_user: default_user.into(),
        ..AgentConfig::default()
    }))
}

/// Makes a FIFO at `path`.
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().expect("utf-8")).expect("cstring");
    // SAFETY: valid NUL-terminated path.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o666) };
    assert_eq!(r, 0, "mkfifo: {}", std::io::Error::last_os_error());
}
