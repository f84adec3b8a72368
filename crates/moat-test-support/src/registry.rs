//! A real OCI registry (Debian's `docker-registry`) on loopback, and images the tests build
//! and push themselves: no image comes from outside the machine.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::server::{Reply, http_send, sigterm};

/// The registry program scripts/test-deps.sh installs.
const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running registry on 127.0.0.1, stopped on drop.
pub struct Registry {
    child: Child,
    /// Its port.
    pub port: u16,
    /// Where it keeps its data (`docker/registry/v2/...`).
    pub storage: PathBuf,
    /// `user:password` it asks for, if any.
    auth: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts an open registry.
    pub fn start() -> Registry {
        Registry::start_inner(None)
    }

    /// Starts a registry that asks for `user` and `password` (HTTP basic).
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        Registry::start_inner(Some((user.to_owned(), password.to_owned())))
    }

    fn start_inner(auth: Option<(String, String)>) -> Registry {
        assert!(
            std::path::Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: run scripts/test-deps.sh"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = dir.path().join("storage");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let auth_section = match &auth {
            Some((user, password)) => {
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{}\n", bcrypt(password)))
                    .expect("htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: moat-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth_section}",
                storage.display()
            ),
        )
        .expect("registry config");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let mut registry = Registry {
            child,
            port,
            storage,
            auth,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!("docker-registry exited during start-up: {status}");
            }
            // 200 open, 401 with auth: either way it answers.
            if let Ok(r) = http_send(port, "GET", "/v2/", &[], None)
                && (r.status == 200 || r.status == 401)
            {
                break;
            }
            assert!(Instant::now() < deadline, "docker-registry never answered");
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// `127.0.0.1:PORT`, the registry part of its image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes `image` as `repo:tag` and returns its manifest's digest.
    pub fn push(&self, repo: &str, tag: &str, image: &TestImage) -> String {
        let config = serde_json::to_vec(&image.config()).expect("config json");
        self.push_blob(repo, &config);
        for layer in &image.layers {
            self.push_blob(repo, layer);
        }
        let manifest = serde_json::to_vec(&image.manifest(&config)).expect("manifest json");
        self.push_manifest(
            repo,
            tag,
            "application/vnd.oci.image.manifest.v1+json",
            &manifest,
        )
    }

    /// Pushes an index as `repo:tag` naming the manifests `entries` (digest, size, os, arch)
    /// already pushed, and returns its digest.
    pub fn push_index(
        &self,
        repo: &str,
        tag: &str,
        entries: &[(String, usize, &str, &str)],
    ) -> String {
        let manifests: Vec<Value> = entries
            .iter()
            .map(|(digest, size, os, arch)| {
                json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest,
                    "size": size,
                    "platform": {"os": os, "architecture": arch},
                })
            })
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let bytes = serde_json::to_vec(&index).expect("index json");
        self.push_manifest(repo, tag, "application/vnd.oci.image.index.v1+json", &bytes)
    }

    /// The manifest of `repo:reference` as stored: its bytes.
    pub fn manifest_bytes(&self, repo: &str, reference: &str) -> Vec<u8> {
        let accept =
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";
        let r = self.send(
            "GET",
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Accept", accept)],
            None,
        );
        assert_eq!(r.status, 200, "manifest {repo}:{reference}: {}", r.text());
        r.body
    }

    /// Where the registry keeps the bytes of blob `digest` (for tests that tamper with them).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256_digest(bytes);
        let start = self.send(
            "POST",
            &format!("/v2/{repo}/blobs/uploads/"),
            &[],
            Some(&[]),
        );
        assert_eq!(start.status, 202, "upload start: {}", start.text());
        let location = start
            .header("location")
            .expect("upload location")
            .to_owned();
        // The location is absolute or a path; only its path and query matter on loopback.
        let path = match location.find("/v2/") {
            Some(i) => location[i..].to_owned(),
            None => location,
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let put = self.send(
            "PUT",
            &format!("{path}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            Some(bytes),
        );
        assert_eq!(put.status, 201, "blob upload: {}", put.text());
        digest
    }

    fn push_manifest(&self, repo: &str, tag: &str, media_type: &str, bytes: &[u8]) -> String {
        let r = self.send(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", media_type)],
            Some(bytes),
        );
        assert_eq!(r.status, 201, "manifest push: {}", r.text());
        sha256_digest(bytes)
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let basic = self.auth.as_ref().map(|(u, p)| {
            use base64::Engine as _;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let mut all: Vec<(&str, &str)> = basic
            .as_deref()
            .map(|b| ("Authorization", b))
            .into_iter()
            .collect();
        all.extend_from_slice(headers);
        http_send(self.port, method, path, &all, body).expect("registry request")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        sigterm(&self.child);
        let _ = self.child.wait();
    }
}

/// A bcrypt hash of `password` for an htpasswd file, made by the host's crypt(3) through
/// Python (Debian's libxcrypt has bcrypt).
fn bcrypt(password: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
            password,
        ])
        .output()
        .expect("python3 for bcrypt");
    assert!(
        out.status.success(),
        "bcrypt: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// `sha256:` and the hex digest of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// An image to push: gzipped tar layers and a configuration.
pub struct TestImage {
    /// The layers, base first, gzipped.
    pub layers: Vec<Vec<u8>>,
    /// Their uncompressed digests.
    pub diff_ids: Vec<String>,
    /// The `config` section (Env, Cmd, User, WorkingDir, Entrypoint).
    pub run: Value,
    /// `os`/`architecture` it claims.
    pub platform: (String, String),
}

impl TestImage {
    /// An image of `layers` (plain tars, base first) for linux/amd64 with no run settings.
    pub fn new(layers: Vec<Vec<u8>>) -> TestImage {
        let diff_ids = layers.iter().map(|l| sha256_digest(l)).collect();
        let layers = layers.iter().map(|l| gzip(l)).collect();
        TestImage {
            layers,
            diff_ids,
            run: json!({}),
            platform: ("linux".into(), "amd64".into()),
        }
    }

    fn config(&self) -> Value {
        json!({
            "architecture": self.platform.1,
            "os": self.platform.0,
            "config": self.run,
            "rootfs": {"type": "layers", "diff_ids": self.diff_ids},
        })
    }

    fn manifest(&self, config: &[u8]) -> Value {
        let layers: Vec<Value> = self
            .layers
            .iter()
            .map(|l| {
                json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256_digest(l),
                    "size": l.len(),
                })
            })
            .collect();
        json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256_digest(config),
                "size": config.len(),
            },
            "layers": layers,
        })
    }
}

/// `bytes` gzipped.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).expect("gzip");
    gz.finish().expect("gzip")
}

/// A tar layer built entry by entry.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> LayerBuilder {
        LayerBuilder {
            tar: tar::Builder::new(Vec::new()),
        }
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> LayerBuilder {
        LayerBuilder::default()
    }

    /// A directory.
    pub fn dir(self, path: &str, mode: u32) -> LayerBuilder {
        self.entry(path, tar::EntryType::Directory, mode, b"", None)
    }

    /// A regular file.
    pub fn file(self, path: &str, mode: u32, content: &[u8]) -> LayerBuilder {
        self.entry(path, tar::EntryType::Regular, mode, content, None)
    }

    /// A symbolic link to `target`.
    pub fn symlink(self, path: &str, target: &str) -> LayerBuilder {
        self.entry(path, tar::EntryType::Symlink, 0o777, b"", Some(target))
    }

    /// A hard link to `target` (a path in the layer).
    pub fn hardlink(self, path: &str, target: &str) -> LayerBuilder {
        self.entry(path, tar::EntryType::Link, 0o644, b"", Some(target))
    }

    /// A character device.
    pub fn char_device(self, path: &str) -> LayerBuilder {
        self.entry(path, tar::EntryType::Char, 0o666, b"", None)
    }

    /// An entry of any type, its name written as is (hostile names included).
    pub fn entry(
        mut self,
        path: &str,
        kind: tar::EntryType,
        mode: u32,
        content: &[u8],
        link: Option<&str>,
    ) -> LayerBuilder {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(content.len() as u64);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        let name = &mut header.as_old_mut().name;
        assert!(path.len() < name.len(), "test layer path too long: {path}");
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            let field = &mut header.as_old_mut().linkname;
            assert!(link.len() < field.len(), "test link too long: {link}");
            field[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_cksum();
        self.tar.append(&header, content).expect("tar entry");
        self
    }

    /// The layer as a tar (with its end marker).
    pub fn build(self) -> Vec<u8> {
        self.tar.into_inner().expect("tar")
    }
}

/// A layer whose one program is the host's static busybox (`/bin/busybox`, which
/// scripts/test-deps.sh installs), with `applets` linked to it in `bin/`.
pub fn busybox_layer(applets: &[&str]) -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox: run scripts/test-deps.sh");
    let mut layer = LayerBuilder::new()
        .dir("bin/", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .file("etc/os-release", 0o644, b"ID=moat-busybox\n");
    for applet in applets {
        layer = layer.symlink(&format!("bin/{applet}"), "busybox");
    }
    layer.build()
}
