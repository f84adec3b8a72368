//! Builds asked for before their steps are known: a front end (E2B's `POST /v3/templates`)
//! names the template and hands out the build's id, and its steps come in a later call.
//!
//! Each is kept as `<build-dir>/asked/<id>.json`, synced before its id is handed out, so a
//! server restart between the two calls loses none. One lapses [`ASKED_BUILD_TTL`] after it
//! was asked for; at most [`MAX_ASKED_BUILDS`] wait on the server and
//! [`MAX_ASKED_BUILDS_PER_TENANT`] per tenant.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use moat_proto::v1;
use serde::{Deserialize, Serialize};

use super::builds::{is_build_id, new_build_uuid};
use super::{ManagerError, ManagerResult, SandboxManager, lock};
use crate::auth::Caller;
use crate::clock::now_ms;

/// Builds asked for and not yet started, on the server.
pub const MAX_ASKED_BUILDS: usize = 1024;
/// Builds asked for and not yet started, per tenant: one tenant cannot take the server's room
/// for them.
pub const MAX_ASKED_BUILDS_PER_TENANT: usize = 16;
/// How long a build asked for may wait for its steps.
pub const ASKED_BUILD_TTL: Duration = Duration::from_secs(3600);

/// One build asked for, as its file holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Asked {
    tenant: String,
    /// What the build will make (its template, tags and limits); the steps come later.
    plan: v1::CreateBuild,
    asked_at_ms: i64,
}

impl Asked {
    fn lapsed(&self, now: i64) -> bool {
        now.saturating_sub(self.asked_at_ms) >= ASKED_BUILD_TTL.as_millis() as i64
    }
}

/// The builds asked for and not yet started, by id, and the directory that keeps them.
pub(super) struct AskedBuilds {
    dir: PathBuf,
    waiting: Mutex<HashMap<String, Asked>>,
}

impl AskedBuilds {
    /// Those kept under `dir` (made, 0700, if missing); lapsed and unreadable ones, and files
    /// a stop left half written, are removed.
    pub(super) fn open(dir: &Path) -> ManagerResult<AskedBuilds> {
        let io = |what: &str, e: std::io::Error| {
            ManagerError::Internal(format!("{what} {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| io("making", e))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| io("securing", e))?;
        let now = now_ms();
        let mut waiting = HashMap::new();
        for entry in std::fs::read_dir(dir)
            .map_err(|e| io("listing", e))?
            .flatten()
        {
            let path = entry.path();
            let kept = path
                .file_name()
                .and_then(|n| n.to_str()?.strip_suffix(".json"))
                .filter(|id| is_build_id(id))
                .map(str::to_owned)
                .zip(
                    std::fs::read(&path)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Asked>(&b).ok()),
                )
                .filter(|(_, asked)| !asked.lapsed(now));
            match kept {
                Some((id, asked)) => {
                    waiting.insert(id, asked);
                }
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(AskedBuilds {
            dir: dir.to_owned(),
            waiting: Mutex::new(waiting),
        })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Keeps `plan` of `tenant` under a new id, synced to disk; the id.
    fn ask(&self, tenant: &str, plan: v1::CreateBuild) -> ManagerResult<String> {
        let mut waiting = lock(&self.waiting);
        let now = now_ms();
        waiting.retain(|id, asked| {
            let keep = !asked.lapsed(now);
            if !keep {
                let _ = std::fs::remove_file(self.path(id));
            }
            keep
        });
        if waiting.len() >= MAX_ASKED_BUILDS {
            return Err(ManagerError::Unavailable(format!(
                "{MAX_ASKED_BUILDS} builds are waiting for their start on this server; try \
                 again later"
            )));
        }
        if waiting.values().filter(|a| a.tenant == tenant).count() >= MAX_ASKED_BUILDS_PER_TENANT {
            return Err(ManagerError::QuotaExceeded(format!(
                "{MAX_ASKED_BUILDS_PER_TENANT} builds of yours are waiting for their start; \
                 start them or let them lapse (after an hour) first"
            )));
        }
        let id = new_build_uuid()?;
        let asked = Asked {
            tenant: tenant.to_owned(),
            plan,
            asked_at_ms: now,
        };
        // Its place taken now; written (and synced) without holding up the others.
        waiting.insert(id.clone(), asked.clone());
        drop(waiting);
        if let Err(e) = self.write(&id, &asked) {
            lock(&self.waiting).remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// Takes the build `id` of `tenant` whose template's name (without a tag) is `base`:
    /// its plan, removed from disk. Not found when no such build waits.
    fn take(&self, tenant: &str, id: &str, base: &str) -> ManagerResult<v1::CreateBuild> {
        let mut waiting = lock(&self.waiting);
        let now = now_ms();
        let found = waiting.get(id).is_some_and(|a| {
            a.tenant == tenant
                && !a.lapsed(now)
                && crate::ids::split_template_name(&a.plan.template).0 == base
        });
        let asked = match found {
            true => waiting.remove(id),
            false => None,
        }
        .ok_or_else(|| ManagerError::NotFound(format!("build {id} not found")))?;
        // Gone from memory even if the file stays: it is then removed at the next start.
        let _ = std::fs::remove_file(self.path(id));
        Ok(asked.plan)
    }

    /// Puts back build `id` of `tenant` taken with `plan` (its start was refused), as if it
    /// had never been taken: within the bounds it was counted in when asked for.
    fn put_back(&self, tenant: &str, id: &str, plan: v1::CreateBuild) -> ManagerResult<()> {
        let asked = Asked {
            tenant: tenant.to_owned(),
            plan,
            asked_at_ms: now_ms(),
        };
        lock(&self.waiting).insert(id.to_owned(), asked.clone());
        if let Err(e) = self.write(id, &asked) {
            lock(&self.waiting).remove(id);
            return Err(e);
        }
        Ok(())
    }

    /// Whether `tenant`'s build `id` waits for its steps.
    fn waits(&self, tenant: &str, id: &str) -> bool {
        lock(&self.waiting)
            .get(id)
            .is_some_and(|a| a.tenant == tenant && !a.lapsed(now_ms()))
    }

    fn write(&self, id: &str, asked: &Asked) -> ManagerResult<()> {
        let io = |e: std::io::Error| {
            ManagerError::Internal(format!("recording the build {id} asked for: {e}"))
        };
        let bytes = serde_json::to_vec(asked)
            .map_err(|e| ManagerError::Internal(format!("build asked for: {e}")))?;
        let staged = self.dir.join(format!(".{id}.tmp"));
        let mut f = std::fs::File::create(&staged).map_err(io)?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&staged, self.path(id)).map_err(io)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

impl SandboxManager {
    /// Keeps a build of the caller's that will make `plan`'s template (with its tags and
    /// limits) until its steps come ([`SandboxManager::take_asked_build`]); its id (a UUID).
    /// `429` past the tenant's [`MAX_ASKED_BUILDS_PER_TENANT`], `503` past the server's.
    pub async fn ask_build(&self, caller: &Caller, plan: v1::CreateBuild) -> ManagerResult<String> {
        let tenant = caller.tenant.clone();
        self.on_builds(move |b| b.asked.ask(&tenant, plan)).await
    }

    /// The plan of the caller's build `id` asked for with a template named `base` (without a
    /// tag), no longer waiting: its steps are about to start it. `404` when no such build
    /// waits (never asked for, another tenant's or template's, lapsed or taken already).
    pub async fn take_asked_build(
        &self,
        caller: &Caller,
        id: &str,
        base: &str,
    ) -> ManagerResult<v1::CreateBuild> {
        let (tenant, id, base) = (caller.tenant.clone(), id.to_owned(), base.to_owned());
        self.on_builds(move |b| b.asked.take(&tenant, &id, &base))
            .await
    }

    /// Puts back the caller's build `id`, taken with `plan` by
    /// [`SandboxManager::take_asked_build`] but refused its start (a bound, a bad step): the
    /// client may start it again.
    pub async fn put_back_asked_build(
        &self,
        caller: &Caller,
        id: &str,
        plan: v1::CreateBuild,
    ) -> ManagerResult<()> {
        let (tenant, id) = (caller.tenant.clone(), id.to_owned());
        self.on_builds(move |b| b.asked.put_back(&tenant, &id, plan))
            .await
    }

    /// Whether the caller's build `id` was asked for and waits for its steps.
    pub fn build_waits_for_steps(&self, caller: &Caller, id: &str) -> bool {
        self.builds()
            .is_ok_and(|b| b.asked.waits(&caller.tenant, id))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn plan(template: &str) -> v1::CreateBuild {
        v1::CreateBuild {
            template: template.into(),
            tags: vec!["v2".into()],
            ..Default::default()
        }
    }

    #[test]
    fn builds_asked_for_are_kept_across_opens_until_taken_or_lapsed() {
        let dir = tempfile::tempdir().unwrap();
        let asked = AskedBuilds::open(dir.path()).unwrap();
        let id = asked.ask("t", plan("app:v1")).unwrap();
        let old = asked.ask("t", plan("old")).unwrap();
        // A build asked for more than the time it may wait, and a file a stop cut short.
        let mut lapsed: Asked =
            serde_json::from_slice(&std::fs::read(asked.path(&old)).unwrap()).unwrap();
        lapsed.asked_at_ms -= ASKED_BUILD_TTL.as_millis() as i64;
        asked.write(&old, &lapsed).unwrap();
        std::fs::write(dir.path().join(".x.tmp"), b"{").unwrap();
        drop(asked);

        let asked = AskedBuilds::open(dir.path()).unwrap();
        assert!(asked.waits("t", &id) && !asked.waits("other", &id));
        assert!(!asked.waits("t", &old));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [format!("{id}.json")]);
        // Only its tenant, with its template's name, takes it, and only once.
        for (tenant, base) in [("other", "app"), ("t", "ap"), ("t", "app:v1")] {
            assert!(matches!(
                asked.take(tenant, &id, base),
                Err(ManagerError::NotFound(_))
            ));
        }
        assert_eq!(asked.take("t", &id, "app").unwrap(), plan("app:v1"));
        assert!(matches!(
            asked.take("t", &id, "app"),
            Err(ManagerError::NotFound(_))
        ));
        assert!(!asked.path(&id).exists());
    }

    #[test]
    fn a_tenant_waits_with_at_most_its_share() {
        let dir = tempfile::tempdir().unwrap();
        let asked = AskedBuilds::open(dir.path()).unwrap();
        for n in 0..MAX_ASKED_BUILDS_PER_TENANT {
            asked.ask("greedy", plan(&format!("t{n}"))).unwrap();
        }
        assert!(matches!(
            asked.ask("greedy", plan("more")),
            Err(ManagerError::QuotaExceeded(_))
        ));
        asked.ask("other", plan("mine")).unwrap();
    }
}
