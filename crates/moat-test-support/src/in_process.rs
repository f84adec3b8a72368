//! A server in the test's own process, over a manager the test made: for tests that give the
//! engine a backend of their own, which `moat serve` cannot be handed.

use std::sync::Arc;

use moat_engine::manager::SandboxManager;
use moat_engine::store::{Quotas, Role, Store};

/// A store in a new directory under `/tmp` (named from `prefix`) with one tenant, `a`, and an
/// admin key of it: the directory (removed when dropped), the store and the key's secret.
pub fn store_with_admin(prefix: &str) -> (tempfile::TempDir, Arc<Store>, String) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("tempdir");
    let store = Arc::new(Store::open(dir.path().join("moat.db")).expect("store"));
    store.create_tenant("a", "A").expect("tenant");
    let (_key, secret) = store
        .create_key("a", "admin", Role::Admin, Quotas::default())
        .expect("key");
    (dir, store, secret.expose().to_owned())
}

/// A server on a loopback port, serving one manager, with a client of it.
pub struct InProcess {
    /// A client with the key the test gave.
    pub client: moat_client::Client,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl InProcess {
    /// Serves `manager` on a free loopback port; the client uses `secret` as its API key.
    pub async fn start(manager: SandboxManager, secret: &str) -> InProcess {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(moat_server::serve(
            listener,
            manager,
            moat_server::ServerOptions::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        let client = moat_client::Client::new(&url, secret).expect("client");
        InProcess { client, stop, task }
    }

    /// Stops the server and waits for it; panics if it failed.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("server task").expect("server");
    }
}
