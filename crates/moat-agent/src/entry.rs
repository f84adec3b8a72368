//! The agent's process entry point, as the sandbox's PID 1.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use moat_proto::agent_config::{
    AGENT_CHANNEL_FD, AGENT_CONFIG_ENV, AGENT_LAYER_FD, AGENT_LISTENER_FD, AGENT_USER_CGROUP_FD,
    AgentConfig,
};

use crate::server::{ServeOptions, serve, serve_resumable, serve_with_listener};
use crate::state::AgentState;

/// Most threads of the blocking pool (filesystem work); they exit when idle.
const MAX_BLOCKING_THREADS: usize = 4;

/// Runs the agent: reads its configuration, hardens itself, serves the host on fd 3 and exits
/// when the host closes the channel. Never returns.
pub fn agent_main() -> ! {
    match run() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("moat agent: {e}");
            std::process::exit(1)
        }
    }
}

fn run() -> Result<(), String> {
    // Everything before the runtime starts runs single-threaded, which `remove_var` and a
    // thread-local seccomp install rely on.
    let text =
        std::env::var(AGENT_CONFIG_ENV).map_err(|_| format!("{AGENT_CONFIG_ENV} is not set"))?;
    // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
    unsafe { std::env::remove_var(AGENT_CONFIG_ENV) };
    let config: AgentConfig =
        serde_json::from_str(&text).map_err(|e| format!("invalid {AGENT_CONFIG_ENV}: {e}"))?;

    // Not dumpable: user code (even as root inside) cannot ptrace the agent or read its memory.
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(format!(
            "prctl(PR_SET_DUMPABLE): {}",
            std::io::Error::last_os_error()
        ));
    }

    if config.channel_on_stdin {
        move_channel_from_stdin()?;
        // Its sandbox may be checkpointed and restored (gVisor), whose restore replays events
        // of closed descriptors (see `pollfd`).
        crate::pollfd::keep_recent_registrations()
            .map_err(|e| format!("opening /dev/null: {e}"))?;
    }

    // The channel must never leak into user processes.
    // SAFETY: fcntl with integer arguments; fails cleanly if fd 3 is not open.
    if unsafe { libc::fcntl(AGENT_CHANNEL_FD, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(format!(
            "channel fd {AGENT_CHANNEL_FD}: {}",
            std::io::Error::last_os_error()
        ));
    }

    if config.listener {
        // SAFETY: fcntl with integer arguments; fails cleanly if the fd is not open.
        if unsafe { libc::fcntl(AGENT_LISTENER_FD, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(format!(
                "listener fd {AGENT_LISTENER_FD}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }

    // The writable layer, if the backend handed one over (fd 4), likewise never for users.
    let layer = config
        .writable_layer
        .map(|kind| {
            crate::layer::Layer::take(kind)
                .map_err(|e| format!("writable layer fd {AGENT_LAYER_FD}: {e}"))
        })
        .transpose()?;

    // The user processes' cgroups (fds 6 and up), likewise close-on-exec: a user process writes
    // to each once, between fork and exec.
    let mut user_cgroups = Vec::new();
    for i in 0..config.user_cgroups.min(8) as i32 {
        let fd = AGENT_USER_CGROUP_FD + i;
        // SAFETY: fcntl with integer arguments; fails cleanly if the fd is not open.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(format!(
                "user cgroup fd {fd}: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: the fd was checked open above and nothing else in the agent uses its number.
        user_cgroups.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    crate::process::spawn::set_user_cgroups(user_cgroups);

    install_seccomp()?;

    let pid1 = std::process::id() == 1;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_keep_alive(Duration::from_secs(5))
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async move {
        // SAFETY: fd 3 is the channel the backend handed over (checked open above); the agent
        // owns it from here on and nothing else uses that number.
        let fd = unsafe { OwnedFd::from_raw_fd(AGENT_CHANNEL_FD) };
        let opts = if pid1 {
            ServeOptions::pid1()
        } else {
            ServeOptions::default()
        };
        if config.channel_on_stdin && !config.listener {
            // A channel the host can hand over anew after a memory checkpoint.
            let mut state = AgentState::new(config);
            if let Some(layer) = layer {
                state = state.with_layer(layer);
            }
            let _ = serve_resumable(fd, Arc::new(state), opts).await;
            return Ok(());
        }
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        std_stream
            .set_nonblocking(true)
            .map_err(|e| format!("channel: {e}"))?;
        let stream =
            tokio::net::UnixStream::from_std(std_stream).map_err(|e| format!("channel: {e}"))?;
        if config.listener {
            // SAFETY: AGENT_LISTENER_FD is the listener the backend handed over (made close-on-exec above);
            // the agent owns it from here on.
            let fd = unsafe { OwnedFd::from_raw_fd(AGENT_LISTENER_FD) };
            let std_listener = std::os::unix::net::UnixListener::from(fd);
            std_listener
                .set_nonblocking(true)
                .map_err(|e| format!("listener: {e}"))?;
            let listener = tokio::net::UnixListener::from_std(std_listener)
                .map_err(|e| format!("listener: {e}"))?;
            let mut state = AgentState::new(config);
            if let Some(layer) = layer {
                state = state.with_layer(layer);
            }
            return serve_with_listener(stream, listener, Arc::new(state), opts)
                .await
                .map_err(|e| format!("serving: {e}"));
        }
        // The connection ends when the host closes the channel, gracefully or by going away
        // (it destroys the sandbox either way); neither is the agent's failure.
        let mut state = AgentState::new(config);
        if let Some(layer) = layer {
            state = state.with_layer(layer);
        }
        let _ = serve(stream, Arc::new(state), opts).await;
        Ok(())
    })
}

/// Installs the agent's own seccomp filter. Without `CAP_SYS_ADMIN` the kernel wants
/// `no_new_privs` first; user processes get it from their confinement anyway.
fn install_seccomp() -> Result<(), String> {
    let filter =
        moat_jail::seccomp::agent_filter().map_err(|e| format!("agent seccomp filter: {e}"))?;
    if moat_jail::seccomp::install(&filter).is_ok() {
        return Ok(());
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "prctl(PR_SET_NO_NEW_PRIVS): {}",
            std::io::Error::last_os_error()
        ));
    }
    moat_jail::seccomp::install(&filter)
        .map_err(|e| format!("installing agent seccomp filter: {e}"))
}

/// Moves the channel from standard input to [`AGENT_CHANNEL_FD`], and puts `/dev/null` on
/// standard input, so the agent's streams are what they are under every backend.
fn move_channel_from_stdin() -> Result<(), String> {
    // SAFETY: dup2 with integer arguments; fd 0 is the channel the runtime handed over.
    if unsafe { libc::dup2(0, AGENT_CHANNEL_FD) } < 0 {
        return Err(format!(
            "channel on standard input: {}",
            std::io::Error::last_os_error()
        ));
    }
    let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
    // SAFETY: dup2 with integer arguments; `null` stays open for the call.
    if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0) } < 0 {
        return Err(format!(
            "standard input to /dev/null: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
