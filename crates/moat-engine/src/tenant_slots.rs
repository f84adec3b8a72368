//! Places for work under way, counted per tenant (and, where given, on the whole server):
//! what keeps one tenant from taking all of a shared, bounded thing (one-shot runs, image
//! pulls, requests in flight, the output buffered execs hold) from the others. A place is
//! taken whole ([`TenantSlots::enter`]); an amount such as bytes is taken as it is needed,
//! as far as the limits leave room ([`TenantShare::grow`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The places (or amounts, such as bytes) taken, per tenant and in all.
#[derive(Debug)]
pub struct TenantSlots {
    taken: Mutex<Taken>,
    per_tenant: usize,
    total: Option<usize>,
}

#[derive(Debug, Default)]
struct Taken {
    by_tenant: HashMap<String, usize>,
    all: usize,
}

/// One place of a tenant; given back when dropped.
#[derive(Debug)]
pub struct TenantSlot {
    owner: Arc<TenantSlots>,
    tenant: String,
}

/// An amount a tenant holds, grown as the limits allow ([`TenantShare::grow`]); given back
/// when dropped.
#[derive(Debug)]
pub struct TenantShare {
    owner: Arc<TenantSlots>,
    tenant: String,
    held: usize,
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
            taken: Mutex::default(),
            per_tenant,
            total,
        })
    }

    /// The most places one tenant may hold.
    pub fn per_tenant(&self) -> usize {
        self.per_tenant
    }

    /// What all tenants hold now, in all.
    pub fn taken_in_all(&self) -> usize {
        self.lock().all
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Taken> {
        self.taken.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How much of `want` `tenant` may take now, and which limit cuts it short.
    fn room(&self, taken: &Taken, tenant: &str, want: usize) -> (usize, Option<SlotsFull>) {
        let mine = taken.by_tenant.get(tenant).copied().unwrap_or(0);
        let tenant_room = self.per_tenant.saturating_sub(mine);
        let server_room = self
            .total
            .map_or(usize::MAX, |t| t.saturating_sub(taken.all));
        match (want <= tenant_room, want <= server_room) {
            (true, true) => (want, None),
            (false, _) if tenant_room <= server_room => (tenant_room, Some(SlotsFull::Tenant)),
            _ => (server_room.min(tenant_room), Some(SlotsFull::Server)),
        }
    }

    fn take(taken: &mut Taken, tenant: &str, n: usize) {
        *taken.by_tenant.entry(tenant.to_owned()).or_default() += n;
        taken.all += n;
    }

    fn give_back(&self, tenant: &str, n: usize) {
        if n == 0 {
            return;
        }
        let mut taken = self.lock();
        taken.all = taken.all.saturating_sub(n);
        if let Some(mine) = taken.by_tenant.get_mut(tenant) {
            *mine = mine.saturating_sub(n);
            if *mine == 0 {
                taken.by_tenant.remove(tenant);
            }
        }
    }

    /// A place for `tenant`, or which limit is reached.
    pub fn enter(self: &Arc<Self>, tenant: &str) -> Result<TenantSlot, SlotsFull> {
        let mut taken = self.lock();
        if let (_, Some(full)) = self.room(&taken, tenant, 1) {
            return Err(full);
        }
        Self::take(&mut taken, tenant, 1);
        Ok(TenantSlot {
            owner: self.clone(),
            tenant: tenant.to_owned(),
        })
    }

    /// An empty share of `tenant`'s, to grow.
    pub fn share(self: &Arc<Self>, tenant: &str) -> TenantShare {
        TenantShare {
            owner: self.clone(),
            tenant: tenant.to_owned(),
            held: 0,
        }
    }
}

impl TenantShare {
    /// Grows by as much of `want` as the tenant's and the server's limits leave; how much.
    pub fn grow(&mut self, want: usize) -> usize {
        if want == 0 {
            return 0;
        }
        let mut taken = self.owner.lock();
        let (got, _) = self.owner.room(&taken, &self.tenant, want);
        TenantSlots::take(&mut taken, &self.tenant, got);
        self.held += got;
        got
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        self.owner.give_back(&self.tenant, 1);
    }
}

impl Drop for TenantShare {
    fn drop(&mut self) {
        self.owner.give_back(&self.tenant, self.held);
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
        assert!(slots.lock().by_tenant.get("a") == Some(&1));
        let unbounded = TenantSlots::new(1, None);
        let _x = unbounded.enter("x").unwrap();
        let _y = unbounded.enter("y").unwrap();
    }

    #[test]
    fn shares_grow_within_the_limits_and_come_back() {
        let slots = TenantSlots::new(10, Some(15));
        let mut a = slots.share("a");
        assert_eq!(a.grow(8), 8);
        assert_eq!(slots.share("a").grow(5), 2, "the tenant's room is shared");
        let mut b = slots.share("b");
        assert_eq!(b.grow(10), 7, "the server's room");
        assert_eq!(slots.enter("c").unwrap_err(), SlotsFull::Server);
        drop(a);
        assert_eq!(b.grow(10), 3);
        assert!(slots.enter("c").is_ok());
    }
}
