//! A build's steps, run in order: `FROM` pulls (or starts empty), `RUN` runs in a sandbox of
//! the tenant's whose root is the image so far and keeps what it wrote as a layer, `COPY`
//! writes its layer on the host, and the other instructions change the run configuration.
//!
//! A `RUN` step's sandbox is like any other: the tenant's, charged to the build's key,
//! limited by the build's resources (its disk bounds what the step may write), on the build's
//! backend and network, ended when the step is. What it wrote comes out through its agent as
//! a layer archive, holes written as zeros, and is unpacked into the image cache as a pulled
//! layer is: read as untrusted, since the step's code is the tenant's.
//!
//! Build arguments are in scope from their `ARG` on: they expand words and are in the
//! environment of `RUN` steps, but not in the image. Environment variables (`ENV`) expand
//! words too, and win over an argument of the same name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moat_proto::v1;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::task::TaskTracker;

use super::builds::{BuildLog, BuildRecord, Builds, DEFAULT_BUILD_TIMEOUT, MAX_BUILD_TIMEOUT};
use super::images::{apply_config, image_error};
use super::{Inner, ManagerError, ManagerResult, SandboxManager};
use crate::auth::Caller;
use crate::images::ImageRef;
use crate::images::build::copy::{CopySpec, copy_layer, dir_layer, resolve_owner};
use crate::images::build::dockerfile::{Command, Dockerfile, Instruction, Word};
use crate::images::build::{BuildState, RunInputs, run_key};
use crate::images::registry::RunConfig;
use crate::images::unpack::{UnpackLimits, unpack_layer};
use crate::network::NetworkPolicy;
use crate::plan::TemplateLimits;
use crate::resources::Resources;

/// The metadata key of a `RUN` step's sandbox: the build's id.
pub const BUILD_METADATA: &str = "moat.build";
/// Time a step's sandbox lives beyond what is left of its build.
const STEP_TTL_MARGIN: Duration = Duration::from_secs(60);
/// Entries a build's contexts may hold, all together.
const MAX_CONTEXT_ENTRIES: u64 = 200_000;
/// Bytes of a build's environment and arguments together.
const MAX_ENV_BYTES: usize = 1 << 20;
/// Bytes a `COPY` or `WORKDIR` layer may hold (as a pulled layer's file data).
const MAX_HOST_LAYER_BYTES: u64 = 16 << 30;
/// Bytes a `RUN` step's archive may hold beyond its sandbox's disk size (headers, and room
/// for what a disk limit does not count).
const CAPTURE_SLACK: u64 = 256 << 20;
/// How often a layer being written checks the data dir's free space.
const FREE_CHECK_EVERY: u64 = 64 << 20;
/// Entries the trees a build merges may hold together (each step on new layers merges one).
pub const MAX_BUILD_MERGED_ENTRIES: u64 = 8_000_000;
/// Disk a merged tree is counted to take per entry (its directories and links; files are
/// hard links to the layers).
const TREE_BYTES_PER_ENTRY: u64 = 512;

/// A build request, checked.
pub(super) struct BuildPlan {
    pub dockerfile: Dockerfile,
    pub template: String,
    /// Every name the build writes: the template and its tags.
    pub names: Vec<String>,
    pub args: BTreeMap<String, String>,
    pub backend: String,
    pub resources: Resources,
    pub network: NetworkPolicy,
    /// The network as asked for: part of each `RUN` step's key.
    pub network_json: serde_json::Value,
    pub timeout: Duration,
    pub context: Option<String>,
    /// Named contexts for `COPY --from`, by name: their digests.
    pub contexts: BTreeMap<String, String>,
    /// Templates `FROM` may name, by the name it uses.
    pub from_templates: BTreeMap<String, String>,
    pub start: Option<String>,
    pub ready: Option<String>,
    pub no_cache: bool,
    /// The caller may pull from any registry.
    pub admin: bool,
    /// The template is a built-in one, which the build (an admin's) replaces for every tenant.
    pub builtin: bool,
}

impl Inner {
    /// Checks what of `req` the Dockerfile does not say: backend, network, limits, time. The
    /// build writes `names` (its template and tags, which the caller checked against the
    /// templates that exist), replacing a built-in template when `builtin`.
    pub(super) fn build_plan(
        &self,
        caller: &Caller,
        req: &v1::CreateBuild,
        dockerfile: Dockerfile,
        names: Vec<String>,
        builtin: bool,
    ) -> ManagerResult<BuildPlan> {
        let backend = self.backends.resolve(req.backend.as_deref())?;
        // A RUN step's result is its sandbox's writable layer, which the agent must be handed.
        let runs = dockerfile
            .steps
            .iter()
            .any(|s| matches!(s.instruction, Instruction::Run(_)));
        if runs && !backend.capabilities().files_snapshot {
            return Err(ManagerError::Invalid(format!(
                "the {} backend cannot run a build's RUN steps yet (its sandboxes do not hand \
                 their writable layer over); build on a backend that can, such as native",
                backend.name()
            )));
        }
        let network = match &req.network {
            Some(n) => self.policy_of(n, caller.is_admin())?,
            None => NetworkPolicy::None,
        };
        super::network::check_backend(backend.as_ref(), &network)?;
        let limits = TemplateLimits::of(&super::host_template_spec())?;
        let resources = limits.resolve(req.resources.as_ref())?;
        let timeout = match req.timeout_secs {
            None => DEFAULT_BUILD_TIMEOUT,
            Some(0) => {
                return Err(ManagerError::Invalid(
                    "timeout_secs must be positive".into(),
                ));
            }
            Some(s) if Duration::from_secs(s) > MAX_BUILD_TIMEOUT => {
                return Err(ManagerError::Invalid(format!(
                    "timeout_secs {s} is over the {} s a build may take",
                    MAX_BUILD_TIMEOUT.as_secs()
                )));
            }
            Some(s) => Duration::from_secs(s),
        };
        super::check_env("args", &req.args)?;
        for (what, script) in [("start", &req.start), ("ready", &req.ready)] {
            if let Some(s) = script
                && (s.trim().is_empty() || s.contains('\0'))
            {
                return Err(ManagerError::Invalid(format!(
                    "{what} must be a non-empty script without NUL"
                )));
            }
        }
        Ok(BuildPlan {
            dockerfile,
            template: req.template.clone(),
            names,
            args: req.args.clone(),
            backend: backend.name().to_owned(),
            resources,
            network,
            network_json: serde_json::to_value(&req.network).unwrap_or_default(),
            timeout,
            context: req.context.clone(),
            contexts: req.contexts.clone(),
            from_templates: req.from_templates.clone(),
            start: req.start.clone(),
            ready: req.ready.clone(),
            no_cache: req.no_cache,
            admin: caller.is_admin(),
            builtin,
        })
    }
}

/// Where a build is while its steps run.
struct Progress<'a> {
    state: BuildState,
    /// Arguments declared so far, with their values.
    args: BTreeMap<String, String>,
    /// The shell of shell-form commands.
    shell: Vec<String>,
    context: Option<PathBuf>,
    /// Entries of the trees this build merged so far.
    merged_entries: u64,
    /// Named contexts, unpacked, by name.
    named: BTreeMap<String, PathBuf>,
    deadline: Instant,
    plan: &'a BuildPlan,
    /// Where step sandboxes are made: a create runs to its end even when the build is
    /// cancelled mid-way, so that what it made is recorded and can be ended.
    creates: &'a TaskTracker,
    /// Where the build's work on the host runs (pulls, context unpacks, layers, merges): to
    /// its end even when the build is cancelled, the tenant's turn held until it is done.
    host_work: &'a TaskTracker,
}

impl Progress<'_> {
    /// Expands `word` with the environment over the arguments in scope.
    fn expand(&self, word: &Word) -> ManagerResult<String> {
        let env = self.state.env_map();
        word.expand(&|name| env.get(name).or_else(|| self.args.get(name)).cloned())
            .map_err(ManagerError::Invalid)
    }

    /// The working directory (`/` when none is set).
    fn workdir(&self) -> String {
        self.state
            .config
            .working_dir
            .clone()
            .unwrap_or_else(|| "/".into())
    }

    /// `path` made absolute against the working directory.
    fn absolute(&self, path: &str) -> String {
        if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("{}/{path}", self.workdir().trim_end_matches('/'))
        }
    }

    fn command(&self, cmd: &Command) -> Vec<String> {
        match cmd {
            Command::Exec(argv) => argv.clone(),
            Command::Shell(script) => {
                let mut argv = self.shell.clone();
                argv.push(script.clone());
                argv
            }
        }
    }

    /// Refuses an environment and arguments over [`super::MAX_ENV_VARS`] entries or
    /// [`MAX_ENV_BYTES`] together.
    fn check_env_size(&self) -> ManagerResult<()> {
        let env = self.state.env_map();
        let count = env.len() + self.args.len();
        let bytes: usize = env
            .iter()
            .chain(self.args.iter())
            .map(|(k, v)| k.len() + v.len())
            .sum();
        if count > super::MAX_ENV_VARS || bytes > MAX_ENV_BYTES {
            return Err(ManagerError::Invalid(format!(
                "the environment and build arguments hold {count} entries of {bytes} bytes; a \
                 build takes at most {} entries and {MAX_ENV_BYTES} bytes",
                super::MAX_ENV_VARS
            )));
        }
        Ok(())
    }

    /// Adds a layer [`SandboxManager::host_layer`] made, if it made one; whether the cache
    /// had it already (the step's result reused).
    fn add_host_layer(&mut self, layer: Option<(String, bool)>) -> bool {
        match layer {
            Some((digest, had)) => {
                self.state.layers.push(digest);
                had
            }
            None => false,
        }
    }

    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

impl SandboxManager {
    /// Runs `plan`'s steps, recording progress in `rec`; the image made (`sha256:…`), which
    /// the template then uses.
    pub(super) async fn run_steps(
        &self,
        caller: &Caller,
        rec: &mut BuildRecord,
        builds: &Builds,
        plan: &BuildPlan,
        (creates, host_work): (&TaskTracker, &TaskTracker),
        log: &mut BuildLog,
    ) -> ManagerResult<(String, RunConfig)> {
        let cache = self
            .inner
            .images
            .clone()
            .ok_or_else(|| ManagerError::Invalid("this server keeps no images".into()))?;
        // What all of the build's contexts may unpack to together, whatever they compress to:
        // bytes, and entries (each an inode, whatever its size).
        let mut budget = super::builds::MAX_CONTEXT_BYTES;
        let mut entries_left = MAX_CONTEXT_ENTRIES;
        let context = match &plan.context {
            Some(digest) => {
                let archive = builds.context(&caller.tenant, digest).ok_or_else(|| {
                    ManagerError::NotFound(format!("build context {digest} is gone"))
                })?;
                let dir = builds.build_dir(&rec.build.id).join("context");
                log.line(&format!("unpacking the build context {digest}"))
                    .await;
                self.inner.check_build_disk(budget)?;
                let (bytes, entries) =
                    unpack_context(host_work, &archive, &dir, budget, entries_left).await?;
                budget -= bytes;
                entries_left -= entries;
                Some(dir)
            }
            None => None,
        };
        let mut named = BTreeMap::new();
        // A digest named twice is unpacked once: its names share the directory.
        let mut unpacked: BTreeMap<&str, PathBuf> = BTreeMap::new();
        for (name, digest) in &plan.contexts {
            if let Some(dir) = unpacked.get(digest.as_str()) {
                named.insert(name.clone(), dir.clone());
                continue;
            }
            let archive = builds.context(&caller.tenant, digest).ok_or_else(|| {
                ManagerError::NotFound(format!("build context {name} ({digest}) is gone"))
            })?;
            let root = builds.build_dir(&rec.build.id).join("named");
            std::fs::create_dir_all(&root)
                .map_err(|e| ManagerError::Internal(format!("making a context directory: {e}")))?;
            log.line(&format!("unpacking the build context {name}"))
                .await;
            let dir = root.join(name);
            self.inner.check_build_disk(budget)?;
            let (bytes, entries) =
                unpack_context(host_work, &archive, &dir, budget, entries_left).await?;
            budget -= bytes;
            entries_left -= entries;
            unpacked.insert(digest, dir.clone());
            named.insert(name.clone(), dir);
        }
        let global: BTreeMap<String, String> = self.declared_args(plan, log).await?;
        let from = &plan.dockerfile.from;
        let image = from
            .image
            .expand(&|name| global.get(name).cloned())
            .map_err(|e| ManagerError::Invalid(format!("line {}: {e}", from.line)))?;
        let mut progress = Progress {
            state: BuildState::default(),
            args: BTreeMap::new(),
            shell: vec!["/bin/sh".into(), "-c".into()],
            context,
            merged_entries: 0,
            named,
            deadline: Instant::now() + plan.timeout,
            plan,
            creates,
            host_work,
        };
        log.line(&format!("FROM {image}")).await;
        if let Some(template) = plan.from_templates.get(&image) {
            progress.state = self.template_state(caller, template).await?;
            log.line(&format!(" ---> template {template}")).await;
        } else if image != "scratch" {
            let reference = ImageRef::parse(&image).map_err(image_error)?;
            let registry = reference.registry().to_owned();
            if !plan.admin && !self.inner.opts.registries.open_to_tenants(&registry) {
                return Err(ManagerError::Forbidden(format!(
                    "registry {registry} is not one this server lets every key pull from"
                )));
            }
            let pulled = self
                .inner
                .pull_image(
                    None,
                    Some(host_work),
                    &cache,
                    reference,
                    std::sync::Arc::new(|_| {}),
                )
                .await?;
            log.line(&format!(" ---> {}", pulled.reference)).await;
            progress.state = BuildState {
                layers: pulled.layers.clone(),
                config: pulled.config.clone(),
            };
        }
        let total = plan.dockerfile.steps.len();
        for (i, step) in plan.dockerfile.steps.iter().enumerate() {
            log.line(&format!("Step {}/{total} : {}", i + 1, step.text))
                .await;
            let at = |e: ManagerError| with_line(e, step.line);
            let cached = self
                .run_step(caller, &mut progress, &step.instruction, log, &rec.build.id)
                .await
                .map_err(at)?;
            rec.build.steps_done += 1;
            if cached {
                rec.build.steps_cached += 1;
                log.line(" ---> cached").await;
            }
            let written = rec.clone();
            self.on_builds(move |b| b.write(&written)).await?;
        }
        let limit = crate::images::registry::MAX_LAYERS;
        if progress.state.layers.len() > limit {
            return Err(ManagerError::Invalid(format!(
                "the image would have {} layers, more than the {limit} moat takes",
                progress.state.layers.len()
            )));
        }
        let built = self.merged(&mut progress).await?;
        Ok((built.digest, progress.state.config))
    }

    /// The image of the caller's template `name` (one made from an image or a build) as a
    /// build's first state: its layers, and its environment, working directory and user.
    pub(super) async fn template_state(
        &self,
        caller: &Caller,
        name: &str,
    ) -> ManagerResult<BuildState> {
        let cache = self
            .inner
            .images
            .clone()
            .ok_or_else(|| ManagerError::Invalid("this server keeps no images".into()))?;
        let template = self.get_template(caller, name).await.map_err(|e| match e {
            ManagerError::NotFound(_) => ManagerError::Invalid(format!("no template {name}")),
            e => e,
        })?;
        let digest = match &template.spec.rootfs {
            v1::Rootfs::Build(digest) => digest.clone(),
            v1::Rootfs::Image(reference) => {
                super::images::pinned_digest(reference).ok_or_else(|| {
                    ManagerError::Internal(format!("template {name}'s image is not pinned"))
                })?
            }
            v1::Rootfs::Host | v1::Rootfs::Dir(_) => {
                return Err(ManagerError::Invalid(format!(
                    "template {name}'s root is this host's own files, not an image: a build \
                     starts from an image, or a template made from one or by a build"
                )));
            }
        };
        let image = cache.find(&digest).map_err(image_error)?.ok_or_else(|| {
            ManagerError::Conflict(format!(
                "template {name}'s image is no longer on this server: make the template again"
            ))
        })?;
        let spec = &template.spec;
        let config = crate::images::registry::RunConfig {
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            working_dir: spec.workdir.clone(),
            user: spec.user.clone(),
            ..Default::default()
        };
        Ok(BuildState {
            layers: image.layers,
            config,
        })
    }

    /// The arguments declared before `FROM`, with the request's values over their defaults;
    /// logs the request's arguments no `ARG` declares.
    async fn declared_args(
        &self,
        plan: &BuildPlan,
        log: &mut BuildLog,
    ) -> ManagerResult<BTreeMap<String, String>> {
        let mut global = BTreeMap::new();
        for decl in &plan.dockerfile.global_args {
            let value = match (plan.args.get(&decl.name), &decl.default) {
                (Some(v), _) => Some(v.clone()),
                (None, Some(d)) => Some(
                    d.expand(&|name| global.get(name).cloned())
                        .map_err(ManagerError::Invalid)?,
                ),
                (None, None) => None,
            };
            if let Some(v) = value {
                global.insert(decl.name.clone(), v);
            }
        }
        let declared: std::collections::HashSet<&str> = plan
            .dockerfile
            .global_args
            .iter()
            .map(|a| a.name.as_str())
            .chain(
                plan.dockerfile
                    .steps
                    .iter()
                    .filter_map(|s| match &s.instruction {
                        Instruction::Arg(a) => Some(a.name.as_str()),
                        _ => None,
                    }),
            )
            .collect();
        for name in plan.args.keys() {
            if !declared.contains(name.as_str()) {
                log.line(&format!(
                    "warning: the build argument {name} is not declared by any ARG"
                ))
                .await;
            }
        }
        Ok(global)
    }

    /// Runs one step; whether an earlier build's result was reused.
    async fn run_step(
        &self,
        caller: &Caller,
        p: &mut Progress<'_>,
        instruction: &Instruction,
        log: &mut BuildLog,
        build_id: &str,
    ) -> ManagerResult<bool> {
        match instruction {
            Instruction::Env(pairs) => {
                for (name, value) in pairs {
                    let value = p.expand(value)?;
                    p.state.set_env(name, &value);
                    p.check_env_size()?;
                }
            }
            Instruction::Arg(decl) => {
                let value = match (p.plan.args.get(&decl.name), &decl.default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(d)) => Some(p.expand(d)?),
                    (None, None) => None,
                };
                p.args.insert(decl.name.clone(), value.unwrap_or_default());
                p.check_env_size()?;
            }
            Instruction::User(word) => {
                let user = p.expand(word)?;
                if user.is_empty() {
                    return Err(ManagerError::Invalid("USER names no user".into()));
                }
                p.state.config.user = Some(user);
            }
            Instruction::Workdir(word) => {
                let dir = p.absolute(&p.expand(word)?);
                p.state.config.working_dir = Some(dir.clone());
                return self.make_workdir(p, &dir).await;
            }
            Instruction::Cmd(cmd) => p.state.config.cmd = Some(p.command(cmd)),
            Instruction::Entrypoint(cmd) => {
                p.state.config.entrypoint = Some(p.command(cmd));
                // As Docker does: an entrypoint set here drops the base image's command.
                p.state.config.cmd = None;
            }
            Instruction::Label(_) => {
                log.line(" ---> labels have no effect in moat templates")
                    .await;
            }
            Instruction::Shell(shell) => p.shell = shell.clone(),
            Instruction::Copy(copy) => return self.copy_step(p, copy).await,
            Instruction::Run(cmd) => return self.run_command(caller, p, cmd, log, build_id).await,
        }
        Ok(false)
    }

    /// `WORKDIR`: makes the directory (owned by the step's user) when the image lacks it.
    async fn make_workdir(&self, p: &mut Progress<'_>, dir: &str) -> ManagerResult<bool> {
        let tree = self.tree_of(p).await?;
        let user = p.state.config.user.clone();
        let dir = dir.to_owned();
        let layer = self
            .host_layer(p.host_work, move |out| {
                let owner = match &user {
                    Some(u) => resolve_owner(&tree, u).unwrap_or((0, 0)),
                    None => (0, 0),
                };
                dir_layer(&tree, &dir, owner, out)
            })
            .await?;
        Ok(p.add_host_layer(layer))
    }

    /// `COPY` and `ADD`: the layer written on the host from the context.
    async fn copy_step(
        &self,
        p: &mut Progress<'_>,
        copy: &crate::images::build::dockerfile::Copy,
    ) -> ManagerResult<bool> {
        let context = match &copy.from {
            Some(word) => {
                let name = p.expand(word)?;
                p.named.get(&name).cloned().ok_or_else(|| {
                    ManagerError::Invalid(format!(
                        "COPY --from={name}: the build has no context of that name (moat \
                         builds have no stages; --from names a context given with the build)"
                    ))
                })?
            }
            None => p.context.clone().ok_or_else(|| {
                ManagerError::Invalid("COPY needs a build context, and the build has none".into())
            })?,
        };

        let sources = copy
            .sources
            .iter()
            .map(|w| p.expand(w))
            .collect::<ManagerResult<Vec<_>>>()?;
        let dest = p.expand(&copy.dest)?;
        let mut dest_abs = p.absolute(&dest);
        if dest.ends_with('/') && !dest_abs.ends_with('/') {
            dest_abs.push('/');
        }
        let tree = self.tree_of(p).await?;
        let owner = match &copy.chown {
            Some(w) => {
                let spec = p.expand(w)?;
                let tree = tree.clone();
                tokio::task::spawn_blocking(move || resolve_owner(&tree, &spec))
                    .await
                    .map_err(|e| ManagerError::Internal(format!("chown task: {e}")))?
                    .map_err(ManagerError::Invalid)?
            }
            None => (0, 0),
        };
        let mode = match &copy.chmod {
            Some(w) => {
                let text = p.expand(w)?;
                Some(
                    u32::from_str_radix(&text, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| {
                            ManagerError::Invalid(format!(
                                "--chmod={text}: expected octal permission bits such as 755"
                            ))
                        })?,
                )
            }
            None => None,
        };
        let spec = CopySpec {
            sources,
            dest: dest_abs,
            owner,
            mode,
            unpack_archives: copy.add,
        };
        let layer = self
            .host_layer(p.host_work, move |out| {
                copy_layer(&context, &tree, &spec, out).map(|_| true)
            })
            .await?;
        Ok(p.add_host_layer(layer))
    }

    /// A layer written on the host by `write` (which says whether it wrote one) into the
    /// image cache; its digest, and whether the cache had it already.
    async fn host_layer(
        &self,
        tasks: &TaskTracker,
        write: impl FnOnce(&mut HashingFile) -> Result<bool, String> + Send + 'static,
    ) -> ManagerResult<Option<(String, bool)>> {
        let cache = self
            .inner
            .images
            .clone()
            .ok_or_else(|| ManagerError::Invalid("this server keeps no images".into()))?;
        let work = cache.work_dir("copy-").map_err(image_error)?;
        let path = work.path().join("layer.tar");
        let room = cache.clone();
        let written = {
            let path = path.clone();
            tasks
                .spawn_blocking(move || -> ManagerResult<Option<String>> {
                    let file = std::fs::File::create_new(&path)
                        .map_err(|e| ManagerError::Internal(format!("staging a layer: {e}")))?;
                    let mut out = HashingFile {
                        file,
                        hash: Sha256::new(),
                        written: 0,
                        cache: room,
                    };
                    if !write(&mut out).map_err(ManagerError::Invalid)? {
                        return Ok(None);
                    }
                    std::io::Write::flush(&mut out.file)
                        .map_err(|e| ManagerError::Internal(format!("staging a layer: {e}")))?;
                    Ok(Some(hex_digest(out.hash)))
                })
                .await
                .map_err(|e| ManagerError::Internal(format!("layer task: {e}")))??
        };
        let Some(digest) = written else {
            return Ok(None);
        };
        let had = cache.has_layer(&digest);
        add_layer(tasks, &cache, work, path, &digest).await?;
        Ok(Some((digest, had)))
    }

    /// The merged tree of the build's state ([`Self::merged`]).
    async fn tree_of(&self, p: &mut Progress<'_>) -> ManagerResult<PathBuf> {
        Ok(self.merged(p).await?.rootfs)
    }

    /// The build's state merged (made if needed, within the build's
    /// [`MAX_BUILD_MERGED_ENTRIES`] and the data dir's reserve): its image.
    async fn merged(&self, p: &mut Progress<'_>) -> ManagerResult<crate::images::PulledImage> {
        let cache = self
            .inner
            .images
            .clone()
            .ok_or_else(|| ManagerError::Invalid("this server keeps no images".into()))?;
        if cache
            .find(&p.state.tree_digest())
            .map_err(image_error)?
            .is_none()
        {
            // Each layer's index read whole (up to 64 MiB of paths): off the async workers.
            let (reader, layers) = (cache.clone(), p.state.layers.clone());
            let entries = tokio::task::spawn_blocking(move || reader.layer_entries(&layers))
                .await
                .map_err(|e| ManagerError::Internal(format!("counting layer entries: {e}")))?
                .map_err(image_error)?;
            p.merged_entries = p.merged_entries.saturating_add(entries);
            if p.merged_entries > MAX_BUILD_MERGED_ENTRIES {
                return Err(ManagerError::TooLarge(format!(
                    "the build's steps would merge images of more than {MAX_BUILD_MERGED_ENTRIES} \
                     entries together; combine steps (each RUN, COPY and WORKDIR on a new image \
                     merges one)"
                )));
            }
            cache
                .check_free(entries.saturating_mul(TREE_BYTES_PER_ENTRY))
                .map_err(image_error)?;
        }
        assemble(p.host_work, &cache, p.state.image(&p.plan.template)).await
    }

    /// `RUN`: the command in a sandbox on the image so far; what it wrote becomes a layer.
    async fn run_command(
        &self,
        caller: &Caller,
        p: &mut Progress<'_>,
        cmd: &Command,
        log: &mut BuildLog,
        build_id: &str,
    ) -> ManagerResult<bool> {
        let cache = self
            .inner
            .images
            .clone()
            .ok_or_else(|| ManagerError::Invalid("this server keeps no images".into()))?;
        let argv = p.command(cmd);
        let mut env = p.args.clone();
        env.extend(p.state.env_map());
        let user = run_user(p.state.config.user.as_deref());
        let workdir = p.workdir();
        let inputs = RunInputs {
            tenant: &caller.tenant,
            argv: &argv,
            env: &env,
            user: &user,
            workdir: &workdir,
            network: &p.plan.network_json,
            backend: &p.plan.backend,
        };
        let key = run_key(&p.state, &inputs);
        if !p.plan.no_cache
            && let Some(layer) = cache.step_layer(&key)
        {
            p.state.layers.push(layer);
            return Ok(true);
        }
        let tree = self.tree_of(p).await?;
        let mut spec = super::host_template_spec();
        spec.rootfs = v1::Rootfs::Dir(
            tree.to_str()
                .ok_or_else(|| ManagerError::Internal("an image tree path is not UTF-8".into()))?
                .to_owned(),
        );
        spec.backend = Some(p.plan.backend.clone());
        spec.user = Some("root".into());
        let limits = TemplateLimits::of(&spec)?;
        // Recorded as a sandbox of the built-in template (a sandbox names an existing one);
        // its metadata tells it is a build's.
        let mut plan = self
            .inner
            .plan_of_template(v1::DEFAULT_TEMPLATE, None, &spec, &limits)?;
        plan.resources = p.plan.resources;
        plan.network = p.plan.network.clone();
        plan.poolable = false;
        plan.metadata = [(BUILD_METADATA.to_owned(), build_id.to_owned())].into();
        plan.timeout_secs = Some(p.left().saturating_add(STEP_TTL_MARGIN).as_secs().max(1));
        let create = self.inner.clone().create_planned(
            caller.tenant.clone(),
            caller.key_id.clone(),
            plan,
            Instant::now(),
        );
        let sandbox = p
            .creates
            .spawn(create)
            .await
            .map_err(|e| ManagerError::Internal(format!("step sandbox task: {e}")))??;
        let outcome = self
            .run_in_step_sandbox(caller, &sandbox.id, p, argv, env, user, workdir, log)
            .await;
        if let Err(e) = self.delete(caller, &sandbox.id).await {
            tracing::warn!(sandbox = %sandbox.id, "ending a build step's sandbox: {e}");
        }
        let layer = outcome?;
        cache.record_step(&key, &layer).map_err(image_error)?;
        p.state.layers.push(layer);
        Ok(false)
    }

    /// Runs the step's command in sandbox `id` with its output in the log, then takes what it
    /// wrote into the image cache; the layer's digest.
    #[allow(clippy::too_many_arguments)]
    async fn run_in_step_sandbox(
        &self,
        caller: &Caller,
        id: &str,
        p: &Progress<'_>,
        argv: Vec<String>,
        env: BTreeMap<String, String>,
        user: String,
        workdir: String,
        log: &mut BuildLog,
    ) -> ManagerResult<String> {
        let req = v1::ExecRequest {
            cmd: Some(argv),
            env,
            cwd: Some(workdir),
            user: Some(user),
            timeout_secs: Some(p.left().as_secs().max(1)),
            ..Default::default()
        };
        let mut events = self.exec_stream(caller, id, req).await?;
        let mut end = None;
        while let Some(event) = events.next().await {
            match event {
                v1::ExecEvent::Start { .. } => {}
                v1::ExecEvent::Stdout { data } | v1::ExecEvent::Stderr { data } => {
                    log.write(&data).await;
                }
                v1::ExecEvent::End(e) => end = Some(e),
                v1::ExecEvent::Error(e) => {
                    return Err(ManagerError::Unavailable(format!(
                        "following the step's command failed: {}",
                        e.message
                    )));
                }
            }
        }
        let end = end.ok_or_else(|| {
            ManagerError::Unavailable("the step's command ended without a status".into())
        })?;
        if end.timed_out {
            return Err(ManagerError::Timeout(
                "the step ran out of the build's time".into(),
            ));
        }
        if end.exit_code != Some(0) {
            let how = match (end.exit_code, &end.signal, end.oom_killed) {
                (_, _, true) => "was killed for want of memory (raise the build's memory)".into(),
                (Some(code), _, _) => format!("exited with status {code}"),
                (None, Some(signal), _) => format!("was ended by {signal}"),
                (None, None, _) => "ended abnormally".into(),
            };
            return Err(ManagerError::Invalid(format!("the command {how}")));
        }
        self.capture_step_layer(caller, id, p.plan.resources.disk_bytes, p.host_work)
            .await
    }

    /// Streams what sandbox `id` wrote into the image cache as a layer; its digest. The
    /// archive may hold at most the sandbox's disk size and [`CAPTURE_SLACK`].
    async fn capture_step_layer(
        &self,
        caller: &Caller,
        id: &str,
        disk: u64,
        tasks: &TaskTracker,
    ) -> ManagerResult<String> {
        let limit = disk.saturating_add(CAPTURE_SLACK);
        let cache = self
            .inner
            .images
            .clone()
            .ok_or_else(|| ManagerError::Invalid("this server keeps no images".into()))?;
        let work = cache.work_dir("run-").map_err(image_error)?;
        let path = work.path().join("layer.tar");
        let client = self.agent(caller, id).await?;
        let mut stream = client
            .capture_layer(true)
            .await
            .map_err(|e| ManagerError::Unavailable(format!("taking the step's layer: {e}")))?;
        let io = |e: std::io::Error| ManagerError::Internal(format!("staging a layer: {e}"));
        let mut file = tokio::fs::File::create_new(&path).await.map_err(io)?;
        let mut hash = Sha256::new();
        let mut size: u64 = 0;
        while let Some(piece) = stream.next().await {
            let piece = piece
                .map_err(|e| ManagerError::Unavailable(format!("taking the step's layer: {e}")))?;
            let before = size;
            size = size.saturating_add(piece.len() as u64);
            if size > limit {
                return Err(ManagerError::TooLarge(format!(
                    "the step wrote more than its sandbox's disk allows ({} with the holes of \
                     sparse files counted)",
                    moat_proto::units::describe_size(limit)
                )));
            }
            if before / FREE_CHECK_EVERY != size / FREE_CHECK_EVERY {
                self.inner.check_build_disk(FREE_CHECK_EVERY)?;
            }
            hash.update(&piece);
            file.write_all(&piece).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        drop(file);
        let digest = hex_digest(hash);
        add_layer(tasks, &cache, work, path, &digest).await?;
        Ok(digest)
    }

    /// Makes (or replaces, if a build made it or it is a tag) each name of `plan` on the tree
    /// `digest`, with the defaults of `config`, recorded as made by the build `build_id`.
    pub(super) async fn write_built_template(
        &self,
        caller: &Caller,
        plan: &BuildPlan,
        digest: &str,
        config: &RunConfig,
        build_id: &str,
    ) -> ManagerResult<()> {
        let mut spec = v1::TemplateSpec::new(v1::Rootfs::Build(digest.to_owned()));
        spec.backend = Some(plan.backend.clone());
        spec.start = plan.start.clone();
        spec.ready = plan.ready.clone();
        apply_config(&mut spec, config);
        super::check_env("the image's environment", &spec.env)?;
        // An admin's build over a built-in writes built-ins, for every tenant, replacing
        // whatever they were (checked when the build was asked for).
        let (tenant, replace): (_, fn(&crate::store::TemplateRecord) -> bool) = if plan.builtin {
            (None, |_| true)
        } else {
            (Some(caller.tenant.clone()), super::builds::replaceable)
        };
        self.put_templates(
            tenant,
            caller.key_id.clone(),
            plan.names.clone(),
            &spec,
            Some(build_id.to_owned()),
            replace,
        )
        .await?;
        Ok(())
    }
}

/// The account a `RUN` step runs as: the image's `USER` (its name; a group is ignored),
/// root when none is set or it is uid 0.
fn run_user(user: Option<&str>) -> String {
    let name = user
        .map(|u| u.split(':').next().unwrap_or(u))
        .filter(|u| !u.is_empty());
    match name {
        None | Some("0") => "root".into(),
        Some(u) => u.to_owned(),
    }
}

/// An error of the step on Dockerfile line `line`.
fn with_line(e: ManagerError, line: usize) -> ManagerError {
    let prefix = |m: String| format!("line {line}: {m}");
    match e {
        ManagerError::Invalid(m) => ManagerError::Invalid(prefix(m)),
        ManagerError::Forbidden(m) => ManagerError::Forbidden(prefix(m)),
        ManagerError::Timeout(m) => ManagerError::Timeout(prefix(m)),
        ManagerError::Unavailable(m) => ManagerError::Unavailable(prefix(m)),
        ManagerError::TooLarge(m) => ManagerError::TooLarge(prefix(m)),
        other => other,
    }
}

/// A layer being written on the host, hashed as it goes, within [`MAX_HOST_LAYER_BYTES`]
/// and the data dir's reserve.
pub(super) struct HashingFile {
    file: std::fs::File,
    hash: Sha256,
    written: u64,
    cache: std::sync::Arc<crate::images::ImageCache>,
}

impl std::io::Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let before = self.written;
        let after = before.saturating_add(buf.len() as u64);
        if after > MAX_HOST_LAYER_BYTES {
            return Err(std::io::Error::other(format!(
                "the layer would hold more than {}",
                moat_proto::units::describe_size(MAX_HOST_LAYER_BYTES)
            )));
        }
        if before / FREE_CHECK_EVERY != after / FREE_CHECK_EVERY {
            self.cache
                .check_free(FREE_CHECK_EVERY)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        let n = self.file.write(buf)?;
        self.written = before.saturating_add(n as u64);
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn hex_digest(hash: Sha256) -> String {
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Adds the layer archive `path` (in `work`, kept until it is done) of `digest` to `cache`, in
/// a task of the build's `tasks`.
async fn add_layer(
    tasks: &TaskTracker,
    cache: &std::sync::Arc<crate::images::ImageCache>,
    work: tempfile::TempDir,
    path: PathBuf,
    digest: &str,
) -> ManagerResult<()> {
    let (cache, digest) = (cache.clone(), digest.to_owned());
    tasks
        .spawn(async move {
            let _work = work;
            cache.add_layer(&path, &digest).await
        })
        .await
        .map_err(|e| ManagerError::Internal(format!("layer task: {e}")))?
        .map_err(image_error)
}

/// Merges `image`'s tree in a task of the build's `tasks`: a cancel leaves it to finish, and
/// the build's end waits for it.
async fn assemble(
    tasks: &TaskTracker,
    cache: &std::sync::Arc<crate::images::ImageCache>,
    image: crate::images::PulledImage,
) -> ManagerResult<crate::images::PulledImage> {
    let cache = cache.clone();
    tasks
        .spawn(async move { cache.assemble(image).await })
        .await
        .map_err(|e| ManagerError::Internal(format!("merge task: {e}")))?
        .map_err(image_error)
}

/// Unpacks the context archive at `archive` into `dir` with the image unpacker's containment
/// (no path leaves `dir`, no link is followed, no device is made), within `budget` bytes of
/// file contents and `entries` entries, in a task of the build's `tasks` (which the build's
/// end waits for); returns the bytes and entries it took.
async fn unpack_context(
    tasks: &TaskTracker,
    archive: &Path,
    dir: &Path,
    budget: u64,
    entries: u64,
) -> ManagerResult<(u64, u64)> {
    let (archive, dir) = (archive.to_owned(), dir.to_owned());
    tasks
        .spawn_blocking(move || {
            std::fs::create_dir(&dir)
                .map_err(|e| ManagerError::Internal(format!("making {}: {e}", dir.display())))?;
            let mut file = std::io::BufReader::new(
                std::fs::File::open(&archive)
                    .map_err(|e| ManagerError::Internal(format!("opening the context: {e}")))?,
            );
            let limits = UnpackLimits {
                max_bytes: budget,
                max_entries: entries,
                ..UnpackLimits::default()
            };
            // A gzipped archive (E2B's SDK sends them) is told by its magic number.
            let gzipped = std::io::BufRead::fill_buf(&mut file)
                .map(|head| head.starts_with(&[0x1f, 0x8b]))
                .map_err(|e| ManagerError::Internal(format!("reading the context: {e}")))?;
            let reader: Box<dyn std::io::Read> = if gzipped {
                Box::new(flate2::read::MultiGzDecoder::new(file))
            } else {
                Box::new(file)
            };
            let index = unpack_layer(reader, &dir, &limits).map_err(|e| match &e {
                // The host's disk, not the context, is at fault.
                e if e.is_disk_full() => {
                    ManagerError::InsufficientStorage(format!("unpacking the build context: {e}"))
                }
                _ => ManagerError::Invalid(format!(
                    "the build context (a build's contexts unpack to at most {} in all): {e}",
                    moat_proto::units::describe_size(super::builds::MAX_CONTEXT_BYTES)
                )),
            })?;
            Ok((index.bytes.min(budget), index.entries.min(entries)))
        })
        .await
        .map_err(|e| ManagerError::Internal(format!("context task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_run_as_the_image_s_user_or_root() {
        assert_eq!(run_user(None), "root");
        assert_eq!(run_user(Some("0")), "root");
        assert_eq!(run_user(Some("0:0")), "root");
        assert_eq!(run_user(Some("app:staff")), "app");
        assert_eq!(run_user(Some("")), "root");
    }
}
