//! Places for work under way, counted per tenant (and, where given, on the whole server):
//! what keeps one tenant from taking all of a shared, bounded thing (one-shot runs, image
//! pulls, requests in flight) from the others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The places taken, per tenant.
#[derive(Debug)]
pub struct TenantSlots {
    taken: Mutex<HashMap<String, usize>>,
    per_tenant: usize,
    total: Option<usize>,
}

/// One place of a tenant; given back when dropped.
#[derive(Debug)]
pub struct TenantSlot {
    owner: Arc<TenantSlots>,
    tenant: String,
}

/// Why no place was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotsFull {
    /// The tenant has [`TenantSlots::per_tenant`] already.
    Tenant,
    /// The server has [`TenantSlots::total`] taken already.
    Server,
}

impl TenantSlots {
    /// At most `per_tenant` places per tenant, and `total` on the server when given.
    pub fn new(per_tenant: usize, total: Option<usize>) -> Arc<TenantSlots> {
        Arc::new(TenantSlots {
            taken: Mutex::new(HashMap::new()),
            per_tenant,
            total,
        })
    }

    /// The most places one tenant may hold.
    pub fn per_tenant(&self) -> usize {
        self.per_tenant
    }

    /// A place for `tenant`, or which limit is reached.
    pub fn enter(self: &Arc<Self>, tenant: &str) -> Result<TenantSlot, SlotsFull> {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        if taken.get(tenant).copied().unwrap_or(0) >= self.per_tenant {
            return Err(SlotsFull::Tenant);
        }
        if self
            .total
            .is_some_and(|t| taken.values().sum::<usize>() >= t)
        {
            return Err(SlotsFull::Server);
        }
        *taken.entry(tenant.to_owned()).or_default() += 1;
        Ok(TenantSlot {
            owner: self.clone(),
            tenant: tenant.to_owned(),
        })
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        let mut taken = self.owner.taken.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = taken.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                taken.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tenants_and_the_server_are_held_to_their_limits_and_places_come_back() {
        let slots = TenantSlots::new(2, Some(3));
        let a1 = slots.enter("a").unwrap();
        let _a2 = slots.enter("a").unwrap();
        assert_eq!(slots.enter("a").unwrap_err(), SlotsFull::Tenant);
        let _b = slots.enter("b").unwrap();
        assert_eq!(slots.enter("c").unwrap_err(), SlotsFull::Server);
        drop(a1);
        let _c = slots.enter("c").unwrap();
        assert!(slots.taken.lock().unwrap().get("a") == Some(&1));
        let unbounded = TenantSlots::new(1, None);
        let _x = unbounded.enter("x").unwrap();
        let _y = unbounded.enter("y").unwrap();
    }
}
