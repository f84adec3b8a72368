//! Warm pools: sandboxes started ahead of demand for templates with a `pool_size`, so a create
//! is a claim (a store transaction) rather than a cold start.
//!
//! A member belongs to no tenant until claimed. It is recorded in the store (`pool_members`)
//! before the backend makes it, so a restart after a crash reaps it; a claim moves it to the
//! tenant in one transaction that also deletes the member row, so no member is handed out
//! twice even if two claims race (the in-memory queue already hands each to one claimer).
//!
//! A maintenance pass (every [`POOL_TICK`], and at once after a claim or a template change)
//! follows the templates, replaces members whose agent went away, fails running sandboxes
//! whose agent went away, and refills each pool up to its size within the memory budget.
//!
//! The budget counts what members use, not their limits: each ready member is charged the
//! memory its cgroup holds, measured once it is ready and again at every pass (a `start`
//! script keeps running after readiness and may grow), and a member still starting is charged
//! the largest such measurement of its template ([`FIRST_MEMBER_ESTIMATE`] before there is
//! one). An idle sandbox holds about a megabyte or two, so even a small budget keeps many
//! ready. When the members together hold more than the budget, the largest are destroyed
//! until the rest fit, and their template backs off before it refills; a member never holds
//! more than its template's memory limit.
//!
//! Members also count against quotas: a member of a template made with a key is recorded
//! against that key's quotas (its count, memory and pids limits), so a pool cannot hold more
//! than its maker could hold as sandboxes. A template whose pool alone is over the key's
//! quota is refused at create; a pool the quota does not leave room for stays short.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moat_proto::v1;
use tokio::sync::{Notify, watch};

use super::{Inner, Live, ManagerError, ManagerResult, SandboxManager, lock, to_the_end};
use crate::agent_client::AgentClient;
use crate::backend::{Backend, Instance};
use crate::plan::TemplateLimits;
use crate::store::{
    EndReason, NewPoolMember, SandboxQuotas, SandboxState, Store, StoreError, TemplateRecord,
};

/// How often the pools are checked and refilled when nothing wakes them sooner.
pub const POOL_TICK: Duration = Duration::from_secs(1);
/// Members being started at once, over all pools: starts compete for the same CPUs as the
/// sandboxes in use.
pub const MAX_CONCURRENT_STARTS: u32 = 4;
/// Members of one tenant's templates being started at once (the built-in templates' count as
/// one more tenant's): a tenant whose members start slowly leaves the other starts to the
/// other tenants' pools.
pub const MAX_STARTS_PER_TENANT: u32 = MAX_CONCURRENT_STARTS / 2;
/// What a member of a template is assumed to use before one has been measured.
pub const FIRST_MEMBER_ESTIMATE: u64 = 8 << 20;
/// Longest wait before retrying a template whose members keep failing to start.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Wait before trying again to add a member its owner's quota had no room for.
const QUOTA_RETRY: Duration = Duration::from_secs(5);
/// How often every ready member's agent is asked for its health: a member whose agent hangs
/// (its connection open, nothing answering) is replaced rather than handed out.
pub const MEMBER_PROBE_EVERY: Duration = Duration::from_secs(5);

/// Which template a pool serves: the owner (`None` for a built-in) and the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PoolKey {
    pub(crate) tenant: Option<String>,
    pub(crate) name: String,
}

/// A started, ready, unclaimed sandbox.
pub(crate) struct Member {
    pub(crate) id: String,
    pub(crate) client: AgentClient,
    /// The backend that made it.
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) instance: Box<dyn Instance>,
    /// What its cgroup held once it was ready.
    memory: u64,
    /// Its template's network, being served.
    egress: Option<crate::network::Egress>,
    /// The template as it was made from: a member of an older version never rejoins a pool.
    spec: v1::TemplateSpec,
}

struct Pool {
    spec: v1::TemplateSpec,
    /// The template's limits, typed (as stored with it).
    limits: TemplateLimits,
    /// The key whose quotas the members count against (the template's maker).
    owner_key: Option<String>,
    /// Members destroyed for the budget.
    evicted: u64,
    ready: VecDeque<Member>,
    starting: u32,
    /// What the last measured member used (the charge of one still starting).
    estimate: u64,
    /// The size the budget allows, from the last maintenance pass.
    target: u32,
    failures: u32,
    retry_at: Option<Instant>,
}

impl Pool {
    /// Counts one more failure in a row and holds refills back for longer each time (100 ms,
    /// doubling, at most [`MAX_BACKOFF`]); returns the wait.
    fn back_off(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let backoff = Duration::from_millis(100)
            .saturating_mul(1 << self.failures.min(12))
            .min(MAX_BACKOFF);
        self.retry_at = Some(Instant::now() + backoff);
        backoff
    }

    fn new(spec: v1::TemplateSpec, limits: TemplateLimits, owner_key: Option<String>) -> Pool {
        Pool {
            spec,
            limits,
            owner_key,
            evicted: 0,
            ready: VecDeque::new(),
            starting: 0,
            estimate: FIRST_MEMBER_ESTIMATE,
            target: 0,
            failures: 0,
            retry_at: None,
        }
    }

    fn charge(&self) -> u64 {
        let ready: u64 = self.ready.iter().map(|m| m.memory).sum();
        ready.saturating_add(u64::from(self.starting).saturating_mul(self.estimate))
    }
}

/// Every warm pool of a manager.
pub(crate) struct Pools {
    pools: std::sync::Mutex<HashMap<PoolKey, Pool>>,
    wake: Notify,
    /// Templates changed since the pools last followed them.
    stale: AtomicBool,
    budget: u64,
    /// When the members' health was last probed.
    probed: std::sync::Mutex<Instant>,
    /// A probe is under way (probes never overlap).
    probing: Arc<AtomicBool>,
}

impl Pools {
    pub(crate) fn new(budget: u64) -> Pools {
        Pools {
            pools: std::sync::Mutex::new(HashMap::new()),
            wake: Notify::new(),
            stale: AtomicBool::new(true),
            budget,
            probed: std::sync::Mutex::new(Instant::now()),
            probing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A ready member of the pool `key`, if it has one. Never waits. The pool refills once
    /// the claim is settled ([`Pools::claimed`]), so a claim that gives the member back does
    /// not leave the pool one over.
    pub(crate) fn take(&self, key: &PoolKey) -> Option<Member> {
        lock(&self.pools)
            .get_mut(key)
            .and_then(|p| p.ready.pop_front())
    }

    /// A member was claimed: refill now.
    pub(crate) fn claimed(&self) {
        self.wake.notify_one();
    }

    /// Returns a member a claim could not use (a quota refused it) to the front of its pool;
    /// hands it back, for the caller to destroy, when its pool is gone or its template has
    /// changed since it was made.
    pub(crate) fn put_back(&self, key: &PoolKey, member: Member) -> Option<Member> {
        match lock(&self.pools).get_mut(key) {
            Some(pool) if pool.spec == member.spec => {
                pool.ready.push_front(member);
                None
            }
            _ => Some(member),
        }
    }

    pub(crate) fn status(&self, key: &PoolKey) -> v1::PoolStatus {
        lock(&self.pools)
            .get(key)
            .map_or_else(v1::PoolStatus::default, |p| v1::PoolStatus {
                target: p.target,
                ready: u32::try_from(p.ready.len()).unwrap_or(u32::MAX),
                evicted: p.evicted,
            })
    }

    pub(crate) fn all(&self) -> Vec<(PoolKey, v1::PoolStatus)> {
        let pools = lock(&self.pools);
        let mut all: Vec<_> = pools
            .iter()
            .map(|(k, p)| {
                let status = v1::PoolStatus {
                    target: p.target,
                    ready: u32::try_from(p.ready.len()).unwrap_or(u32::MAX),
                    evicted: p.evicted,
                };
                (k.clone(), status)
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Templates changed: follow them at the next pass, which starts now.
    pub(crate) fn templates_changed(&self) {
        self.stale.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Every member, out of the pools (at shutdown).
    fn drain_all(&self) -> Vec<Member> {
        lock(&self.pools)
            .drain()
            .flat_map(|(_, p)| p.ready)
            .collect()
    }
}

impl SandboxManager {
    /// Keeps the warm pools filled and the sandboxes' agents watched until `stop` turns true.
    /// `moat serve` runs this beside the API; without it no pool fills and claims fall back to
    /// cold starts.
    pub async fn run_pools(&self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(POOL_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.inner.pools.wake.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.inner.clone().maintain().await;
        }
    }

    /// The warm pool of the template `name` (of `tenant`, or built-in for `None`): the
    /// template's owner, not a caller; callers see it on their templates.
    pub(crate) fn pool_status(&self, tenant: Option<&str>, name: &str) -> v1::PoolStatus {
        self.inner.pools.status(&PoolKey {
            tenant: tenant.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// Every warm pool, as (template owner, template name, status), ordered.
    pub fn pools(&self) -> Vec<(Option<String>, String, v1::PoolStatus)> {
        self.inner
            .pools
            .all()
            .into_iter()
            .map(|(k, s)| (k.tenant, k.name, s))
            .collect()
    }

    /// Changes templates with `write`, then has the warm pools follow, both to the end even
    /// when the caller stops waiting: a write the pools never heard of would leave a deleted
    /// template's pool running, or a new one's empty, until the next change.
    pub(super) async fn write_templates<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> ManagerResult<T> {
        let inner = self.inner.clone();
        to_the_end("template write", async move {
            let written = inner.db(write).await?;
            inner.pools.templates_changed();
            Ok(written)
        })
        .await
    }

    /// Destroys every pool member (at shutdown). Returns how many.
    pub(super) async fn drain_pools(&self) -> usize {
        let members = self.inner.pools.drain_all();
        let n = members.len();
        for member in members {
            self.inner.discard(member).await;
        }
        n
    }
}

impl Inner {
    /// One maintenance pass: follow the templates, drop dead members, probe the sandboxes'
    /// agents, fail sandboxes whose agent is gone, refill.
    async fn maintain(self: Arc<Self>) {
        if self.pools.stale.swap(false, Ordering::SeqCst)
            && let Err(e) = self.follow_templates().await
        {
            self.pools.stale.store(true, Ordering::SeqCst);
            tracing::warn!("warm pools could not read the templates: {e}");
        }
        self.replace_dead_members().await;
        self.enforce_budget().await;
        self.probe_members();
        self.probe_sandboxes();
        self.fail_dead_sandboxes();
        self.refill();
    }

    /// Every [`MEMBER_PROBE_EVERY`], asks each ready member's agent for its health (in the
    /// background, all at once); a member that fails is taken out of its pool and destroyed.
    fn probe_members(self: &Arc<Self>) {
        {
            let mut probed = lock(&self.pools.probed);
            if probed.elapsed() < MEMBER_PROBE_EVERY
                || self.pools.probing.swap(true, Ordering::SeqCst)
            {
                return;
            }
            *probed = Instant::now();
        }
        let members: Vec<(PoolKey, String, AgentClient)> = lock(&self.pools.pools)
            .iter()
            .flat_map(|(key, pool)| {
                pool.ready
                    .iter()
                    .map(move |m| (key.clone(), m.id.clone(), m.client.clone()))
            })
            .collect();
        let inner = self.clone();
        tokio::spawn(async move {
            let checks = members.into_iter().map(|(key, id, client)| async move {
                let healthy = client.health().await.is_ok();
                (key, id, healthy)
            });
            let results = futures_util::future::join_all(checks).await;
            for (key, id, healthy) in results {
                if healthy {
                    continue;
                }
                let member = lock(&inner.pools.pools).get_mut(&key).and_then(|pool| {
                    let at = pool.ready.iter().position(|m| m.id == id)?;
                    pool.ready.remove(at)
                });
                if let Some(member) = member {
                    tracing::warn!(member = %id, "a warm pool member's agent does not answer; replacing it");
                    inner.discard(member).await;
                }
            }
            inner.pools.probing.store(false, Ordering::SeqCst);
            inner.pools.wake.notify_one();
        });
    }

    /// Makes the set of pools match the templates with a `pool_size`; a pool whose template
    /// went away or changed is emptied.
    async fn follow_templates(&self) -> ManagerResult<()> {
        let records: Vec<TemplateRecord> = self.db(|s| s.all_templates()).await?;
        let mut wanted = HashMap::new();
        for rec in records {
            match super::read_template(&rec) {
                Ok((spec, limits)) if spec.pool_size > 0 => {
                    let key = PoolKey {
                        tenant: rec.tenant,
                        name: rec.name,
                    };
                    wanted.insert(key, (spec, limits, rec.key_id));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(template = %rec.name, "{e}"),
            }
        }
        let mut gone = Vec::new();
        {
            let mut pools = lock(&self.pools.pools);
            pools.retain(|key, pool| {
                let keep = wanted
                    .get(key)
                    .is_some_and(|(spec, _, owner)| *spec == pool.spec && *owner == pool.owner_key);
                if !keep {
                    gone.extend(pool.ready.drain(..));
                }
                keep
            });
            for (key, (spec, limits, owner)) in wanted {
                pools
                    .entry(key)
                    .or_insert_with(|| Pool::new(spec, limits, owner));
            }
        }
        for member in gone {
            self.discard(member).await;
        }
        Ok(())
    }

    /// Drops members whose agent went away, and members over the pool's size (a refill that
    /// raced a claim which then gave its member back).
    async fn replace_dead_members(&self) {
        let mut dead = Vec::new();
        let mut surplus = Vec::new();
        {
            let mut pools = lock(&self.pools.pools);
            for pool in pools.values_mut() {
                let (alive, gone): (VecDeque<Member>, VecDeque<Member>) =
                    pool.ready.drain(..).partition(|m| !m.client.is_closed());
                pool.ready = alive;
                dead.extend(gone);
                while pool.ready.len() > pool.spec.pool_size as usize {
                    surplus.extend(pool.ready.pop_back());
                }
            }
        }
        for member in dead {
            tracing::warn!(member = %member.id, "a warm pool member's agent went away; replacing it");
            self.discard(member).await;
        }
        for member in surplus {
            self.discard(member).await;
        }
    }

    /// Running sandboxes whose agent connection closed (the agent died, or everything in the
    /// sandbox was killed) are destroyed and recorded failed. Paused ones are not looked at.
    fn fail_dead_sandboxes(self: &Arc<Self>) {
        // A paused sandbox is left alone: its agent is frozen on purpose (its connection stays
        // open anyway); a resume that finds it gone leaves it to the next pass.
        let dead: Vec<(String, String)> = lock(&self.live)
            .iter()
            .filter(|(_, live)| !live.is_paused() && live.client.is_closed())
            .map(|(id, live)| (id.clone(), live.tenant.clone()))
            .collect();
        for (id, tenant) in dead {
            let inner = self.clone();
            tokio::spawn(async move {
                tracing::warn!(sandbox = %id, "the sandbox's agent went away; ending it");
                let reason = EndReason::Failed("the sandbox's agent exited".into());
                if let Err(e) = inner
                    .end_as(&tenant, &id, SandboxState::Failed, reason)
                    .await
                {
                    tracing::warn!(sandbox = %id, "ending a sandbox whose agent went away: {e}");
                }
            });
        }
    }

    /// Starts members where pools are short, within the budget and the start concurrency.
    fn refill(self: &Arc<Self>) {
        let mut pools = lock(&self.pools.pools);
        let mut used: u64 = pools.values().map(Pool::charge).sum();
        let mut starting: u32 = pools.values().map(|p| p.starting).sum();
        let mut starting_of: HashMap<Option<String>, u32> = HashMap::new();
        for (key, pool) in pools.iter() {
            *starting_of.entry(key.tenant.clone()).or_default() += pool.starting;
        }
        let now = Instant::now();
        let mut keys: Vec<PoolKey> = pools.keys().cloned().collect();
        keys.sort();
        for key in keys {
            let Some(pool) = pools.get_mut(&key) else {
                continue;
            };
            let have = u32::try_from(pool.ready.len())
                .unwrap_or(u32::MAX)
                .saturating_add(pool.starting);
            let room = self.pools.budget.saturating_sub(used) / pool.estimate.max(1);
            let room = u32::try_from(room).unwrap_or(u32::MAX);
            pool.target = pool.spec.pool_size.min(have.saturating_add(room));
            if pool.retry_at.is_some_and(|t| t > now) {
                continue;
            }
            let mine = starting_of.entry(key.tenant.clone()).or_default();
            while pool.ready.len() + (pool.starting as usize) < pool.target as usize
                && starting < MAX_CONCURRENT_STARTS
                && *mine < MAX_STARTS_PER_TENANT
            {
                pool.starting += 1;
                starting += 1;
                *mine += 1;
                used = used.saturating_add(pool.estimate);
                let inner = self.clone();
                let (key, spec, owner) = (key.clone(), pool.spec.clone(), pool.owner_key.clone());
                let limits = pool.limits;
                tokio::spawn(async move { inner.start_member(key, spec, limits, owner).await });
            }
        }
    }

    async fn start_member(
        self: Arc<Self>,
        key: PoolKey,
        spec: v1::TemplateSpec,
        limits: TemplateLimits,
        owner: Option<String>,
    ) {
        let made = self.make_member(&key, &spec, &limits, owner).await;
        let mut leftover = None;
        {
            let mut pools = lock(&self.pools.pools);
            match pools.get_mut(&key) {
                Some(pool) => {
                    pool.starting = pool.starting.saturating_sub(1);
                    match made {
                        Ok(member) if pool.spec == spec => {
                            pool.estimate = pool.estimate.max(member.memory).max(1);
                            pool.failures = 0;
                            pool.retry_at = None;
                            pool.ready.push_back(member);
                        }
                        // The template changed while it started.
                        Ok(member) => leftover = Some(member),
                        // The owner's quota has no room now: try again later, quietly.
                        Err(ManagerError::QuotaExceeded(e)) => {
                            pool.retry_at = Some(Instant::now() + QUOTA_RETRY);
                            tracing::debug!(template = %key.name, "a warm pool waits for its owner's quota: {e}");
                        }
                        Err(e) => {
                            let backoff = pool.back_off();
                            tracing::warn!(
                                template = %key.name,
                                retry_in = ?backoff,
                                "a warm pool member could not start: {e}"
                            );
                        }
                    }
                }
                None => leftover = made.ok(),
            }
        }
        if let Some(member) = leftover {
            self.discard(member).await;
        }
        self.pools.wake.notify_one();
    }

    /// Records a member (charged to `owner_key`'s quotas, if any) and starts it.
    async fn make_member(
        &self,
        key: &PoolKey,
        spec: &v1::TemplateSpec,
        limits: &TemplateLimits,
        owner_key: Option<String>,
    ) -> ManagerResult<Member> {
        let plan = self.plan_of_template(&key.name, key.tenant.clone(), spec, limits)?;
        limits.check(plan.resources)?;
        let backend = self.backends.get(&plan.backend)?.clone();
        let id = crate::store::generate_sandbox_id().map_err(ManagerError::from)?;
        let limits = match (&key.tenant, &owner_key) {
            (Some(tenant), Some(owner)) => self.key_limits(tenant, owner).await?,
            _ => SandboxQuotas::default(),
        };
        let new = NewPoolMember {
            id: id.clone(),
            template: key.name.clone(),
            template_tenant: key.tenant.clone(),
            key_id: owner_key,
            memory_bytes: plan.resources.memory_bytes,
            pids: plan.resources.pids,
        };
        self.db(move |s| s.add_pool_member_within(&new, limits))
            .await?;
        // Until it is claimed, its connections count for its template's owner.
        let owner = key.tenant.clone().unwrap_or_default();
        match self.boot(&owner, &backend, &id, &plan).await {
            Ok((instance, client, egress)) => {
                let memory = instance.stats().memory_bytes;
                Ok(Member {
                    id,
                    client,
                    backend,
                    instance,
                    memory,
                    egress,
                    spec: spec.clone(),
                })
            }
            Err(e) => {
                let i = id.clone();
                if let Err(store_err) = self.db(move |s| s.remove_pool_member(&i)).await {
                    tracing::warn!(member = %id, "forgetting a failed pool member: {store_err}");
                }
                Err(e)
            }
        }
    }

    /// Measures every ready member again; while the members together hold more than the
    /// budget, destroys the largest (its template backs off before refilling, as after a
    /// failed start).
    async fn enforce_budget(&self) {
        let mut evicted = Vec::new();
        {
            let mut pools = lock(&self.pools.pools);
            for pool in pools.values_mut() {
                for member in &mut pool.ready {
                    member.memory = member.instance.stats().memory_bytes;
                    pool.estimate = pool.estimate.max(member.memory);
                }
            }
            let mut used: u64 = pools.values().map(Pool::charge).sum();
            while used > self.pools.budget {
                let largest = pools
                    .iter()
                    .flat_map(|(key, pool)| {
                        pool.ready
                            .iter()
                            .enumerate()
                            .map(move |(at, m)| (m.memory, key.clone(), at))
                    })
                    .max_by_key(|(memory, _, _)| *memory);
                let Some((_, key, at)) = largest else {
                    // Only starting members are charged: nothing to destroy yet.
                    break;
                };
                let Some(pool) = pools.get_mut(&key) else {
                    break;
                };
                let Some(member) = pool.ready.remove(at) else {
                    break;
                };
                used = used.saturating_sub(member.memory);
                pool.evicted += 1;
                pool.back_off();
                tracing::warn!(
                    template = %key.name,
                    member = %member.id,
                    memory = member.memory,
                    budget = self.pools.budget,
                    "warm pools over their memory budget: destroying the largest member"
                );
                evicted.push(member);
            }
        }
        for member in evicted {
            self.discard(member).await;
        }
    }

    /// Destroys a member and forgets it.
    pub(super) async fn discard(&self, mut member: Member) {
        if let Err(e) = member.instance.destroy().await {
            tracing::warn!(member = %member.id, "destroying a pool member: {e}");
        }
        let id = member.id.clone();
        if let Err(e) = self.db(move |s| s.remove_pool_member(&id)).await {
            tracing::warn!(member = %member.id, "forgetting a pool member: {e}");
        }
    }

    /// A member turned into `tenant`'s live sandbox.
    pub(super) fn adopt(&self, tenant: &str, member: Member, public_traffic: bool) {
        if let Some(egress) = &member.egress {
            egress.set_owner(tenant);
        }
        lock(&self.live).insert(
            member.id.clone(),
            Arc::new(
                Live::new(
                    tenant,
                    member.client,
                    member.backend,
                    member.instance,
                    Default::default(),
                    public_traffic,
                )
                .with_egress(member.egress),
            ),
        );
    }
}
