//! Requests in flight per tenant: a tenant may have at most [`TenantRequests::cap`] requests
//! being served at once (from its key's check to the end of the answer's body), so that its
//! requests, even ones it stalls on purpose (a body never sent, an answer never read), cannot
//! take every connection the listener allows from other tenants. One over is `429`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The count of each tenant's requests in flight.
#[derive(Debug)]
pub(crate) struct TenantRequests {
    in_flight: Mutex<HashMap<String, usize>>,
    cap: usize,
}

/// One request of a tenant in flight; it leaves the count when dropped.
#[derive(Debug)]
pub(crate) struct RequestSlot {
    owner: Arc<TenantRequests>,
    tenant: String,
}

impl TenantRequests {
    /// At most `cap` requests in flight per tenant.
    pub(crate) fn new(cap: usize) -> TenantRequests {
        TenantRequests {
            in_flight: Mutex::new(HashMap::new()),
            cap,
        }
    }

    /// The most requests one tenant may have in flight.
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// A slot for a request of `tenant`, or `None` when it has [`TenantRequests::cap`] already.
    pub(crate) fn enter(self: &Arc<Self>, tenant: &str) -> Option<RequestSlot> {
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(tenant.to_owned()).or_default();
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(RequestSlot {
            owner: self.clone(),
            tenant: tenant.to_owned(),
        })
    }
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        let mut map = self
            .owner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn each_tenant_has_its_own_cap_and_slots_come_back() {
        let requests = Arc::new(TenantRequests::new(2));
        let a1 = requests.enter("a").unwrap();
        let _a2 = requests.enter("a").unwrap();
        assert!(requests.enter("a").is_none());
        let _b = requests.enter("b").unwrap();
        drop(a1);
        assert!(requests.enter("a").is_some());
        assert_eq!(requests.in_flight.lock().unwrap().get("a"), Some(&1));
    }
}
