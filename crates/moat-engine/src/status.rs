//! What a server reports about itself: the sandboxes on record by state (its readiness probe
//! asks for them, so a store that does not answer makes it unready) and the metrics text.

use std::collections::BTreeMap;

use moat_proto::v1::SandboxState;

use crate::manager::{ManagerError, ManagerResult, SandboxManager};

impl SandboxManager {
    /// How many sandboxes the store holds in each state (every state present, maybe 0). A
    /// failure is [`ManagerError::Internal`] with the store's own message.
    pub async fn sandbox_counts(&self) -> ManagerResult<BTreeMap<SandboxState, u64>> {
        let store = self.store().clone();
        tokio::task::spawn_blocking(move || store.count_by_state())
            .await
            .map_err(|e| ManagerError::Internal(format!("store task: {e}")))?
            .map_err(|e| ManagerError::Internal(e.to_string()))
    }

    /// The metrics in the Prometheus text format: the counters and histograms, the sandboxes
    /// on record by state, the warm pools and the output buffered execs hold.
    pub async fn render_metrics(&self) -> ManagerResult<String> {
        let states = self
            .sandbox_counts()
            .await
            .map_err(|e| ManagerError::Internal(format!("counting sandboxes: {e}")))?;
        Ok(self
            .metrics()
            .render(&states, &self.pools(), self.exec_output_held()))
    }
}
