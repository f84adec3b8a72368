//! Listing queries over a tenant's sandboxes that `/v1`'s [`v1::ListSandboxes`] cannot say
//! (the E2B API's: by template, by start time, either order), and their page tokens.

use moat_proto::v1;

use crate::auth::Caller;
use crate::manager::{ManagerError, ManagerResult, SandboxManager};
use crate::store::{Cursor, SandboxFilter};

/// Which of a tenant's sandboxes one page lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxQuery {
    /// Only these states; empty means all.
    pub states: Vec<v1::SandboxState>,
    /// Only sandboxes whose metadata has every one of these key/value pairs.
    pub metadata: Vec<(String, String)>,
    /// Only sandboxes made from the template of this name.
    pub template: Option<String>,
    /// Only sandboxes created at or after this time (Unix milliseconds).
    pub created_since: Option<i64>,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
    /// Start after this page token (the previous page's `next`, listed in the same order).
    pub after: Option<String>,
    /// Page size, 1 to the store's largest page.
    pub limit: u32,
}

impl Default for SandboxQuery {
    fn default() -> Self {
        SandboxQuery {
            states: Vec::new(),
            metadata: Vec::new(),
            template: None,
            created_since: None,
            newest_first: false,
            after: None,
            limit: 100,
        }
    }
}

/// Whether `token` is a page token this server hands out (a listing's `next`).
pub fn is_page_token(token: &str) -> bool {
    Cursor::decode(token).is_ok()
}

impl SandboxManager {
    /// One page of the caller's sandboxes that `query` selects.
    pub async fn list_where(
        &self,
        caller: &Caller,
        query: SandboxQuery,
    ) -> ManagerResult<v1::SandboxList> {
        let after = query
            .after
            .as_deref()
            .map(Cursor::decode)
            .transpose()
            .map_err(ManagerError::from)?;
        let filter = SandboxFilter {
            states: query.states,
            metadata: query.metadata,
            template: query.template,
            created_since: query.created_since,
            newest_first: query.newest_first,
            after,
            limit: query.limit,
        };
        self.list_filtered(&caller.tenant, filter).await
    }

    /// Every one of the caller's sandboxes that `query` selects, page by page from
    /// `query.after` (`query.limit` a page): for listings that answer in one piece. The
    /// tenant's quotas and the host bound how many there are.
    pub async fn list_all(
        &self,
        caller: &Caller,
        mut query: SandboxQuery,
    ) -> ManagerResult<Vec<v1::Sandbox>> {
        let mut all = Vec::new();
        loop {
            let page = self.list_where(caller, query.clone()).await?;
            all.extend(page.sandboxes);
            match page.next {
                Some(next) => query.after = Some(next),
                None => return Ok(all),
            }
        }
    }
}
