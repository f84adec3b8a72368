//! Images built from a Dockerfile: the parts that need no sandbox. The manager runs the steps
//! (`manager::builds`); this module parses the Dockerfile, writes `COPY` layers and names the
//! states a build goes through.
//!
//! A build's state after each step is its layers (base first, each a layer of the image cache)
//! and its run configuration; [`BuildState::digest`] names it. The merged tree of its layers
//! is kept in the cache under [`BuildState::tree_digest`], as a pulled image's is under its
//! manifest's. A `RUN`
//! step's layer is recorded in the cache under [`run_key`], the digest of everything that
//! shapes what the step does, so running the same step on the same state again reuses it.
//! A `COPY` layer needs no record: it is made again (cheaply, on the host) and is the same
//! archive, so it is stored once.
//!
//! - [`dockerfile`]: the Dockerfile subset moat builds.
//! - [`copy`]: `COPY` and `ADD` as a layer archive.

pub mod copy;
pub mod dockerfile;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::cache::PulledImage;
use super::registry::RunConfig;

/// Steps a Dockerfile may have after `FROM`.
pub const MAX_BUILD_STEPS: usize = 128;

/// An image as a build step leaves it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildState {
    /// Its layers' digests, base first.
    pub layers: Vec<String>,
    /// How its containers run.
    pub config: RunConfig,
}

impl BuildState {
    /// The digest naming this state: of its layers and configuration, as JSON.
    pub fn digest(&self) -> String {
        digest_of(&serde_json::json!({
            "layers": self.layers,
            "config": self.config,
        }))
    }

    /// The digest naming the state's tree: of its layers alone, so states that differ only
    /// in their configuration (an `ENV`, a `USER`) share one tree.
    pub fn tree_digest(&self) -> String {
        digest_of(&serde_json::json!({ "layers": self.layers }))
    }

    /// The state's tree as the image cache keeps it, named for `template` (the record's
    /// configuration is the first state's with these layers: a tree is shared by states with
    /// other configurations, which their users keep themselves).
    pub fn image(&self, template: &str) -> PulledImage {
        PulledImage {
            reference: format!("build:{template}"),
            digest: self.tree_digest(),
            config: self.config.clone(),
            layers: self.layers.clone(),
            rootfs: PathBuf::new(),
        }
    }

    /// The value of `name` in the state's environment.
    pub fn env(&self, name: &str) -> Option<String> {
        self.config.env.iter().flatten().find_map(|entry| {
            let (k, v) = entry.split_once('=')?;
            (k == name).then(|| v.to_owned())
        })
    }

    /// The state's environment as a map.
    pub fn env_map(&self) -> BTreeMap<String, String> {
        self.config
            .env
            .iter()
            .flatten()
            .filter_map(|entry| {
                let (k, v) = entry.split_once('=')?;
                Some((k.to_owned(), v.to_owned()))
            })
            .collect()
    }

    /// Sets `name` to `value` in the environment, in place of an earlier value.
    pub fn set_env(&mut self, name: &str, value: &str) {
        let env = self.config.env.get_or_insert_with(Vec::new);
        let entry = format!("{name}={value}");
        match env
            .iter_mut()
            .find(|e| e.split_once('=').is_some_and(|(k, _)| k == name))
        {
            Some(old) => *old = entry,
            None => env.push(entry),
        }
    }
}

/// What a `RUN` step is, beside the state it runs on: together they decide what it makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunInputs<'a> {
    /// The tenant whose build it is: a step's result is reused only by builds of the same
    /// tenant, since its sandbox was the tenant's to change while it ran.
    pub tenant: &'a str,
    /// The command as it is run (the shell and the script, or the exec form).
    pub argv: &'a [String],
    /// Its environment: the state's, with the build arguments in scope.
    pub env: &'a BTreeMap<String, String>,
    /// The user it runs as.
    pub user: &'a str,
    /// Its working directory.
    pub workdir: &'a str,
    /// Its network, as the build asked for it.
    pub network: &'a serde_json::Value,
    /// The backend it runs on.
    pub backend: &'a str,
}

/// The key of the `RUN` step `inputs` on `state`.
pub fn run_key(state: &BuildState, inputs: &RunInputs<'_>) -> String {
    digest_of(&serde_json::json!({
        "state": state.digest(),
        "run": inputs,
    }))
}

/// `sha256:<hex>` of `value` as JSON (object keys in a fixed order: `serde_json`'s maps are
/// sorted).
fn digest_of(value: &serde_json::Value) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let hash = Sha256::digest(&bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_s_digest_follows_its_layers_and_config() {
        let mut a = BuildState::default();
        let empty = a.digest();
        a.layers.push("sha256:aa".into());
        assert_ne!(a.digest(), empty);
        let with_layer = a.digest();
        let tree = a.tree_digest();
        a.set_env("A", "1");
        assert_ne!(a.digest(), with_layer);
        assert_eq!(a.tree_digest(), tree, "the configuration is not the tree's");
        a.set_env("A", "2");
        assert_eq!(a.env("A").as_deref(), Some("2"));
        assert_eq!(a.config.env.as_ref().map(Vec::len), Some(1));
        assert_eq!(a.clone().digest(), a.digest());
    }
}
