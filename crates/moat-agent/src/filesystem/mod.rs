//! The `filesystem.Filesystem` service: every operation runs inside the sandbox, as the calling
//! user.

use std::sync::Arc;

use futures_util::stream::BoxStream;
use moat_proto::filesystem::*;

use crate::rpc::{Code, RpcError};
use crate::state::AgentState;
use crate::users::User;

/// The filesystem service.
#[derive(Debug)]
pub struct FsService {
    #[allow(dead_code)]
    state: Arc<AgentState>,
}

fn unimplemented<T>() -> Result<T, RpcError> {
    Err(RpcError::new(
        Code::Unimplemented,
        "filesystem service not implemented yet",
    ))
}

impl FsService {
    /// The service over `state`.
    pub fn new(state: Arc<AgentState>) -> Self {
        FsService { state }
    }

    /// `Stat`.
    pub async fn stat(&self, _user: &User, _req: StatRequest) -> Result<StatResponse, RpcError> {
        unimplemented()
    }

    /// `MakeDir`.
    pub async fn make_dir(
        &self,
        _user: &User,
        _req: MakeDirRequest,
    ) -> Result<MakeDirResponse, RpcError> {
        unimplemented()
    }

    /// `Move`.
    pub async fn move_entry(
        &self,
        _user: &User,
        _req: MoveRequest,
    ) -> Result<MoveResponse, RpcError> {
        unimplemented()
    }

    /// `ListDir`.
    pub async fn list_dir(
        &self,
        _user: &User,
        _req: ListDirRequest,
    ) -> Result<ListDirResponse, RpcError> {
        unimplemented()
    }

    /// `Remove`.
    pub async fn remove(
        &self,
        _user: &User,
        _req: RemoveRequest,
    ) -> Result<RemoveResponse, RpcError> {
        unimplemented()
    }

    /// `WatchDir`: the stream of events after the `start` event (the transport sends `start` first
    /// and interleaves keepalives).
    pub async fn watch_dir(
        &self,
        _user: &User,
        _req: WatchDirRequest,
    ) -> Result<BoxStream<'static, Result<FilesystemEvent, RpcError>>, RpcError> {
        unimplemented()
    }

    /// `CreateWatcher`.
    pub async fn create_watcher(
        &self,
        _user: &User,
        _req: CreateWatcherRequest,
    ) -> Result<CreateWatcherResponse, RpcError> {
        unimplemented()
    }

    /// `GetWatcherEvents`.
    pub async fn get_watcher_events(
        &self,
        _user: &User,
        _req: GetWatcherEventsRequest,
    ) -> Result<GetWatcherEventsResponse, RpcError> {
        unimplemented()
    }

    /// `RemoveWatcher`.
    pub async fn remove_watcher(
        &self,
        _user: &User,
        _req: RemoveWatcherRequest,
    ) -> Result<RemoveWatcherResponse, RpcError> {
        unimplemented()
    }
}
