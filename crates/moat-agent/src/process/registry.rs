//! The processes the agent started: live ones, and exited ones for a short while so that a late
//! `Connect` still learns how they ended.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use moat_proto::process::process_event::{EndEvent, Event};
use moat_proto::process::{ProcessConfig, ProcessEvent, ProcessSelector, process_selector};
use tokio::sync::{mpsc, watch};

use super::fdio::FdIo;
use crate::rpc::{Code, RpcError};

/// Events a subscriber may have queued before the output pump waits for it. With data chunks of
/// at most 32 KiB this bounds a subscriber's queue to 256 KiB.
pub const SUBSCRIBER_QUEUE: usize = 8;

/// One started process.
#[derive(Debug)]
pub struct Proc {
    /// Its pid (also its process group id).
    pub pid: u32,
    /// The configuration it was started with.
    pub config: ProcessConfig,
    /// Its tag, if the request set one.
    pub tag: Option<String>,
    /// The agent's end of its stdin pipe, until closed.
    pub stdin: Mutex<Option<Arc<FdIo>>>,
    /// The PTY master, for a process started with a PTY.
    pub pty: Option<Arc<FdIo>>,
    state: Mutex<ProcState>,
    exited: watch::Sender<bool>,
}

#[derive(Debug)]
enum ProcState {
    Running {
        subscribers: Vec<(u64, mpsc::Sender<ProcessEvent>)>,
        next_id: u64,
    },
    Exited(EndEvent),
}

/// What a new reader of a process gets.
#[derive(Debug)]
pub enum Subscription {
    /// Events from now on.
    Live(mpsc::Receiver<ProcessEvent>),
    /// The process has exited; this is how.
    Exited(EndEvent),
}

impl Proc {
    /// A running process whose first reader is the returned receiver.
    pub fn new(
        pid: u32,
        config: ProcessConfig,
        tag: Option<String>,
        stdin: Option<Arc<FdIo>>,
        pty: Option<Arc<FdIo>>,
    ) -> (Arc<Proc>, mpsc::Receiver<ProcessEvent>) {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let proc = Proc {
            pid,
            config,
            tag,
            stdin: Mutex::new(stdin),
            pty,
            state: Mutex::new(ProcState::Running {
                subscribers: vec![(0, tx)],
                next_id: 1,
            }),
            exited: watch::channel(false).0,
        };
        (Arc::new(proc), rx)
    }

    fn state(&self) -> MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the process is still running (its end not yet reported).
    pub fn is_running(&self) -> bool {
        matches!(*self.state(), ProcState::Running { .. })
    }

    /// Adds a reader.
    pub fn subscribe(&self) -> Subscription {
        match &mut *self.state() {
            ProcState::Running {
                subscribers,
                next_id,
            } => {
                let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
                subscribers.push((*next_id, tx));
                *next_id += 1;
                Subscription::Live(rx)
            }
            ProcState::Exited(end) => Subscription::Exited(end.clone()),
        }
    }

    /// Sends `event` to every reader, waiting for room in each reader's queue (this is what slows
    /// the process down when a reader is slow). Readers that went away are dropped.
    pub async fn broadcast(&self, event: ProcessEvent) {
        let subs = match &*self.state() {
            ProcState::Running { subscribers, .. } => subscribers.clone(),
            ProcState::Exited(_) => return,
        };
        let mut gone = Vec::new();
        for (id, tx) in subs {
            if tx.send(event.clone()).await.is_err() {
                gone.push(id);
            }
        }
        if !gone.is_empty()
            && let ProcState::Running { subscribers, .. } = &mut *self.state()
        {
            subscribers.retain(|(id, _)| !gone.contains(id));
        }
    }

    /// Records the end, sends it to every reader and ends their streams.
    pub async fn finish(&self, end: EndEvent) {
        let previous = std::mem::replace(&mut *self.state(), ProcState::Exited(end.clone()));
        self.exited.send_replace(true);
        self.stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let ProcState::Running { subscribers, .. } = previous {
            let event = ProcessEvent {
                event: Some(Event::End(end)),
            };
            for (_, tx) in subscribers {
                let _ = tx.send(event.clone()).await;
            }
        }
    }

    /// Resolves once the process has ended.
    pub async fn wait_exited(&self) {
        let mut rx = self.exited.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }
}

/// Every process the agent started and has not yet forgotten.
#[derive(Debug, Default)]
pub struct Registry {
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
}

impl Registry {
    fn procs(&self) -> MutexGuard<'_, HashMap<u32, Arc<Proc>>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a process (replacing an exited one whose pid was reused).
    pub fn insert(&self, proc: Arc<Proc>) {
        self.procs().insert(proc.pid, proc);
    }

    /// Forgets `proc`, unless its pid now belongs to a newer process.
    pub fn remove(&self, proc: &Arc<Proc>) {
        let mut procs = self.procs();
        if procs.get(&proc.pid).is_some_and(|p| Arc::ptr_eq(p, proc)) {
            procs.remove(&proc.pid);
        }
    }

    /// The process `selector` names, live or recently exited (a live one wins a tag tie).
    pub fn find(&self, selector: Option<&ProcessSelector>) -> Result<Arc<Proc>, RpcError> {
        let sel = selector.and_then(|s| s.selector.as_ref()).ok_or_else(|| {
            RpcError::new(
                Code::InvalidArgument,
                "process selector (pid or tag) is required",
            )
        })?;
        let procs = self.procs();
        let found = match sel {
            process_selector::Selector::Pid(pid) => procs.get(pid).cloned(),
            process_selector::Selector::Tag(tag) => {
                let mut matching = procs.values().filter(|p| p.tag.as_deref() == Some(tag));
                let first = matching.next().cloned();
                match first {
                    Some(p) if !p.is_running() => {
                        matching.find(|p| p.is_running()).cloned().or(Some(p))
                    }
                    other => other,
                }
            }
        };
        found.ok_or_else(|| {
            RpcError::new(Code::NotFound, format!("process {} not found", show(sel)))
        })
    }

    /// Like [`Registry::find`], but an exited process is `not_found`.
    pub fn find_live(&self, selector: Option<&ProcessSelector>) -> Result<Arc<Proc>, RpcError> {
        let proc = self.find(selector)?;
        if proc.is_running() {
            Ok(proc)
        } else {
            Err(RpcError::new(
                Code::NotFound,
                format!("process {} not found (it has exited)", proc.pid),
            ))
        }
    }

    /// The processes still running.
    pub fn live(&self) -> Vec<Arc<Proc>> {
        let mut live: Vec<_> = self
            .procs()
            .values()
            .filter(|p| p.is_running())
            .cloned()
            .collect();
        live.sort_by_key(|p| p.pid);
        live
    }
}

fn show(sel: &process_selector::Selector) -> String {
    match sel {
        process_selector::Selector::Pid(pid) => format!("with pid {pid}"),
        process_selector::Selector::Tag(tag) => format!("with tag {tag:?}"),
    }
}
