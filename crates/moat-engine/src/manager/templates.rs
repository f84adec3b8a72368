//! Templates as the API sees them: checked on the way in, shown with their warm pool.

use moat_proto::v1;

use super::{ManagerError, ManagerResult, SandboxManager, check_env, resolve_resources};
use crate::auth::Caller;
use crate::resources::fmt_bytes;
use crate::store::{SandboxQuotas, StoreError, TemplateRecord};

/// Refuses a warm pool that alone would take its maker's key over `limits`: `pool_size`
/// members of the template's default limits, each counted like a sandbox.
fn check_pool_quota(spec: &v1::TemplateSpec, limits: SandboxQuotas) -> ManagerResult<()> {
    let size = u64::from(spec.pool_size);
    let each = resolve_resources(spec, None)?;
    let over = |what: &str, total: String, limit: String| {
        Err(ManagerError::QuotaExceeded(format!(
            "a warm pool of {size} would hold {total} {what}, over the key's quota of {limit}; \
             lower pool_size or the template's limits"
        )))
    };
    if let Some(max) = limits.max_sandboxes
        && size > max
    {
        return over("sandboxes", size.to_string(), max.to_string());
    }
    let memory = each.memory_bytes.saturating_mul(size);
    if let Some(max) = limits.max_memory_bytes
        && memory > max
    {
        return over("of memory", fmt_bytes(memory), fmt_bytes(max));
    }
    let pids = each.pids.saturating_mul(size);
    if let Some(max) = limits.max_pids
        && pids > max
    {
        return over("pids", pids.to_string(), max.to_string());
    }
    Ok(())
}

impl SandboxManager {
    /// Defines a template for the caller's tenant, made with the caller's key (if it holds
    /// one): its warm pool's members count against that key's quotas, and a pool that alone
    /// would be over them is refused (429). A `{"dir": …}` root filesystem reads a directory
    /// of the host: only an admin caller may name one.
    pub async fn create_template(
        &self,
        caller: &Caller,
        req: v1::CreateTemplate,
    ) -> ManagerResult<v1::Template> {
        self.create_template_with_progress(caller, req, std::sync::Arc::new(|_| {}))
            .await
    }

    /// [`SandboxManager::create_template`], telling `progress` how the pull of its image goes
    /// (nothing for a template without an image, or one whose image is here already).
    pub async fn create_template_with_progress(
        &self,
        caller: &Caller,
        req: v1::CreateTemplate,
        progress: std::sync::Arc<dyn Fn(crate::images::PullEvent) + Send + Sync>,
    ) -> ManagerResult<v1::Template> {
        let mut req = req;
        self.check_template_spec(&req.spec, caller.is_admin())?;
        if matches!(req.spec.rootfs, v1::Rootfs::Image(_)) {
            // A name already taken is refused before a pull that would be for nothing (the
            // create below still decides a race).
            let (t, n) = (caller.tenant.clone(), req.name.clone());
            if self.inner.db(move |s| s.get_template(&t, &n)).await.is_ok() {
                return Err(ManagerError::Conflict(format!(
                    "template {} already exists",
                    req.name
                )));
            }
        }
        // Pulled now, so a sandbox of it never waits on a registry.
        self.inner
            .pull_template_image(&mut req.spec, &caller.tenant, progress)
            .await?;
        if let Some(snapshot) = req.spec.snapshot.clone() {
            self.inner
                .check_template_snapshot(&caller.tenant, &snapshot, &mut req.spec)
                .await?;
        }
        if let Some(key) = caller.key_id()
            && req.spec.pool_size > 0
        {
            let limits = self.inner.key_limits(&caller.tenant, key).await?;
            check_pool_quota(&req.spec, limits)?;
        }
        // Parsed once here; creates read the typed form stored beside the spec.
        let limits = super::limits_json(&req.spec)?;
        let spec = serde_json::to_value(&req.spec)
            .map_err(|e| ManagerError::Internal(format!("template spec: {e}")))?;
        let tenant = caller.tenant.clone();
        let key = caller.key_id.clone();
        let rec = self
            .write_templates(move |s| {
                s.create_template_with(
                    Some(&tenant),
                    key.as_deref(),
                    &req.name,
                    &spec,
                    Some(&limits),
                )
            })
            .await?;
        self.to_template(&rec)
    }

    /// The template `name` as the caller sees it (its tenant's own or a built-in).
    pub async fn get_template(&self, caller: &Caller, name: &str) -> ManagerResult<v1::Template> {
        let (tenant, name) = (caller.tenant.clone(), name.to_owned());
        let rec = self
            .inner
            .db(move |s| s.get_template(&tenant, &name))
            .await?;
        self.to_template(&rec)
    }

    /// Every template the caller sees, by name.
    pub async fn list_templates(&self, caller: &Caller) -> ManagerResult<v1::TemplateList> {
        let tenant = caller.tenant.clone();
        let recs = self
            .inner
            .db(move |s| s.list_templates(Some(&tenant)))
            .await?;
        let templates = recs
            .iter()
            .map(|r| self.to_template(r))
            .collect::<ManagerResult<_>>()?;
        Ok(v1::TemplateList { templates })
    }

    /// Deletes the caller's template `name`, or for an admin key a tag of a built-in one
    /// (which admin keys write; the built-ins themselves stay). Refused (409) while its
    /// sandboxes run unless `force`; they keep running either way. Its warm pool is emptied.
    pub async fn delete_template(
        &self,
        caller: &Caller,
        name: &str,
        force: bool,
    ) -> ManagerResult<()> {
        let (t, n) = (caller.tenant.clone(), name.to_owned());
        let builtin_tag = caller.is_admin() && crate::ids::split_template_name(name).1.is_some();
        self.write_templates(move |s| match s.delete_template(Some(&t), &n, force) {
            Err(StoreError::BuiltIn { .. }) if builtin_tag => s.delete_template(None, &n, force),
            other => other,
        })
        .await
    }

    /// Copies the template `name` (`name` or `name:tag`, the caller's own or, for an admin, a
    /// built-in) to each of `tags` of its name, in one write: a tag that exists is moved, the
    /// name alone (`default`) only over what a build made. The copies keep the build that made
    /// the original and have no warm pool of their own. What each is now.
    pub async fn tag_template(
        &self,
        caller: &Caller,
        name: &str,
        tags: &[String],
    ) -> ManagerResult<Vec<v1::Template>> {
        crate::store::check_template_name(name).map_err(ManagerError::from)?;
        let (base, _) = crate::ids::split_template_name(name);
        let names: Vec<String> = super::builds::tagged_names(base, name, tags)?
            .into_iter()
            .skip(1)
            .collect();
        if names.is_empty() {
            return Err(ManagerError::Invalid(format!(
                "no tag to give {name} but its own"
            )));
        }
        let (t, n) = (caller.tenant.clone(), name.to_owned());
        let source = self.inner.db(move |s| s.get_template(&t, &n)).await?;
        if source.tenant.is_none() && !caller.is_admin() {
            return Err(ManagerError::Conflict(format!(
                "{name} is a built-in template: its tags are the server's (an admin key may \
                 write them)"
            )));
        }
        if let Some(existing) = self
            .existing_templates(caller, &names)
            .await?
            .into_iter()
            .find(|t| !super::builds::replaceable(t))
        {
            return Err(ManagerError::Conflict(format!(
                "template {} exists and no build made it: a tag may not replace it",
                existing.name
            )));
        }
        let mut spec: v1::TemplateSpec = serde_json::from_value(source.spec.clone())
            .map_err(|e| ManagerError::Internal(format!("template {name} has a bad spec: {e}")))?;
        spec.pool_size = 0;
        let written = self
            .put_templates(
                source.tenant,
                caller.key_id.clone(),
                names,
                &spec,
                source.build_id,
                super::builds::replaceable,
            )
            .await?;
        written.iter().map(|r| self.to_template(r)).collect()
    }

    /// Those of `names` the caller sees now (its own or built-ins): what a write of them
    /// would replace.
    pub(super) async fn existing_templates(
        &self,
        caller: &Caller,
        names: &[String],
    ) -> ManagerResult<Vec<TemplateRecord>> {
        let (tenant, names) = (caller.tenant.clone(), names.to_vec());
        self.inner
            .db(move |s| {
                let mut found = Vec::new();
                for name in &names {
                    match s.get_template(&tenant, name) {
                        Ok(t) => found.push(t),
                        Err(StoreError::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(found)
            })
            .await
    }

    /// Writes `spec` as each of `names` of `tenant` (built-ins for `None`) in one store
    /// write, recorded as made by `build_id` and (for a name that is new) by the key `key`;
    /// a name that exists is replaced only if `replace` says yes to it.
    pub(super) async fn put_templates(
        &self,
        tenant: Option<String>,
        key: Option<String>,
        names: Vec<String>,
        spec: &v1::TemplateSpec,
        build_id: Option<String>,
        replace: fn(&TemplateRecord) -> bool,
    ) -> ManagerResult<Vec<TemplateRecord>> {
        let limits = super::limits_json(spec)?;
        let json = serde_json::to_value(spec)
            .map_err(|e| ManagerError::Internal(format!("template spec: {e}")))?;
        // A built-in is charged to no key (its pool is bounded by the pool budget alone).
        let key = key.filter(|_| tenant.is_some());
        self.write_templates(move |s| {
            s.put_templates(
                tenant.as_deref(),
                key.as_deref(),
                &names,
                &json,
                &limits,
                build_id.as_deref(),
                replace,
            )
        })
        .await
    }

    /// The templates of the name `base` the caller sees: the name alone and each of its tags.
    /// Not found when there are none.
    pub async fn template_tags(
        &self,
        caller: &Caller,
        base: &str,
    ) -> ManagerResult<Vec<v1::Template>> {
        crate::store::check_template_name(base).map_err(ManagerError::from)?;
        let tagged = self
            .list_templates(caller)
            .await?
            .templates
            .into_iter()
            .filter(|t| crate::ids::is_of_name(&t.name, base))
            .collect::<Vec<_>>();
        if tagged.is_empty() {
            return Err(ManagerError::NotFound(format!("template {base}")));
        }
        Ok(tagged)
    }

    /// Checks everything about a spec that can be checked before a sandbox is made from it.
    fn check_template_spec(&self, spec: &v1::TemplateSpec, host_paths: bool) -> ManagerResult<()> {
        let invalid = |m: String| Err(ManagerError::Invalid(m));
        if let v1::Rootfs::Build(_) = &spec.rootfs {
            return invalid(
                "a {\"build\": …} root is made by builds only: build the template with POST \
                 /v1/builds (moat template build)"
                    .into(),
            );
        }
        if let v1::Rootfs::Dir(dir) = &spec.rootfs {
            if !host_paths {
                return Err(ManagerError::Forbidden(
                    "a template's rootfs directory is a host path: only an admin key may name one"
                        .into(),
                ));
            }
            let path = std::path::Path::new(dir);
            if !path.is_absolute() {
                return invalid(format!("rootfs dir {dir:?} is not an absolute path"));
            }
            if !path.is_dir() {
                return invalid(format!("rootfs dir {dir:?} is not a directory on the host"));
            }
        }
        if let v1::Rootfs::Image(reference) = &spec.rootfs {
            let image = crate::images::ImageRef::parse(reference)
                .map_err(|e| ManagerError::Invalid(e.to_string()))?;
            let registry = image.registry();
            if !host_paths && !self.inner.opts.registries.open_to_tenants(registry) {
                return Err(ManagerError::Forbidden(format!(
                    "registry {registry} is not one this server lets every key pull from: an \
                     admin key may, or the operator can add it (moat serve --allow-registry)"
                )));
            }
        }
        let backend = self.inner.backends.resolve(spec.backend.as_deref())?;
        if let Some(n) = &spec.network {
            let policy = self.inner.policy_of(n, host_paths)?;
            super::network::check_backend(backend.as_ref(), &policy)?;
        }
        resolve_resources(spec, None)?;
        check_env("env", &spec.env)?;
        if let Some(user) = &spec.user
            && !matches!(user.as_str(), "user" | "root")
        {
            return invalid(format!("user {user:?} must be \"user\" or \"root\""));
        }
        // A directory brings its own accounts: without the one commands run as, every exec
        // would fail, so the template is refused now with what to add.
        if let v1::Rootfs::Dir(dir) = &spec.rootfs {
            let user = spec.user.as_deref().unwrap_or("user");
            crate::rootfs_users::check_account(std::path::Path::new(dir), user)?;
        }
        if let Some(dir) = &spec.workdir
            && (!dir.starts_with('/') || dir.contains('\0'))
        {
            return invalid(format!("workdir {dir:?} is not an absolute path"));
        }
        for (what, script) in [("start", &spec.start), ("ready", &spec.ready)] {
            if let Some(s) = script
                && (s.trim().is_empty() || s.contains('\0'))
            {
                return invalid(format!("{what} must be a non-empty script without NUL"));
            }
        }
        if let Some(t) = spec.ready_timeout_secs
            && (t == 0 || t > v1::MAX_READY_TIMEOUT_SECS)
        {
            return invalid(format!(
                "ready_timeout_secs {t} must be 1 to {}",
                v1::MAX_READY_TIMEOUT_SECS
            ));
        }
        if spec.timeout_secs.is_some() {
            self.inner.ttl(spec.timeout_secs)?;
        }
        if spec.pool_size > v1::MAX_POOL_SIZE {
            return invalid(format!(
                "pool_size {} is over the maximum of {}",
                spec.pool_size,
                v1::MAX_POOL_SIZE
            ));
        }
        Ok(())
    }

    fn to_template(&self, rec: &TemplateRecord) -> ManagerResult<v1::Template> {
        let spec: v1::TemplateSpec = serde_json::from_value(rec.spec.clone()).map_err(|e| {
            ManagerError::Internal(format!("template {:?} has a bad spec: {e}", rec.name))
        })?;
        Ok(v1::Template {
            pool: self.pool_status(rec.tenant.as_deref(), &rec.name),
            name: rec.name.clone(),
            builtin: rec.tenant.is_none(),
            build_id: rec.build_id.clone(),
            spec,
            created_at: rec.created_at,
        })
    }
}

/// What a name a sandbox is asked to start from stands for (the E2B API's `templateID` names
/// either).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFrom {
    /// A snapshot of the tenant's, by id.
    Snapshot(String),
    /// A template the tenant sees, by name.
    Template(String),
}

impl SandboxManager {
    /// Resolves `name` for the caller in one look-up: a snapshot when it has a snapshot id's
    /// shape and the caller's tenant has one by that id, else a template, which must exist
    /// ([`ManagerError::NotFound`] when it does not). `base:<build id>` (a UUID, which no tag
    /// may be) is the template of that name, or one of its tags, the build made.
    pub async fn resolve_start(&self, caller: &Caller, name: &str) -> ManagerResult<StartFrom> {
        let (tenant, name) = (caller.tenant.clone(), name.to_owned());
        self.inner
            .db(move |s| {
                if crate::ids::is_snapshot_id(&name) && s.get_snapshot(&tenant, &name).is_ok() {
                    return Ok(Ok(StartFrom::Snapshot(name)));
                }
                if let (base, Some(build)) = crate::ids::split_template_name(&name)
                    && crate::ids::looks_like_uuid(build)
                {
                    let mut made = s
                        .list_templates(Some(&tenant))?
                        .into_iter()
                        .filter(|t| {
                            crate::ids::is_of_name(&t.name, base)
                                && t.build_id.as_deref() == Some(build)
                        })
                        .map(|t| t.name)
                        .collect::<Vec<_>>();
                    // The name alone before its tags.
                    made.sort_by_key(|n| n.contains(crate::ids::TAG_SEPARATOR));
                    return Ok(match made.into_iter().next() {
                        Some(found) => Ok(StartFrom::Template(found)),
                        None => Err(ManagerError::NotFound(format!(
                            "no template {base:?} made by build {build}"
                        ))),
                    });
                }
                match s.get_template(&tenant, &name) {
                    Ok(_) => Ok(Ok(StartFrom::Template(name))),
                    Err(StoreError::NotFound { .. }) => Ok(Err(ManagerError::NotFound(format!(
                        "template {name:?} not found"
                    )))),
                    Err(e) => Err(e),
                }
            })
            .await?
    }
}
