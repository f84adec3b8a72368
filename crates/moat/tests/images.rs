//! Images from a real registry (`docker-registry` on loopback, `moat_test_support::registry`)
//! with images the tests build and push: manifests resolved for linux/amd64, blobs checked
//! against their digests, and the errors a user gets for what cannot be pulled.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use moat_engine::images::registry::OciDescriptor;
use moat_engine::images::registry::{Credentials, Registry, RegistryAccess};
use moat_engine::images::{ImageCache, ImageError, ImageRef, PullEvent, PulledImage};
use moat_test_support::registry::{self as reg, LayerBuilder, TestImage};

fn base_layer() -> Vec<u8> {
    LayerBuilder::new()
        .dir("etc/", 0o755)
        .file("etc/os-release", 0o644, b"ID=moat-test\n")
        .dir("usr/bin/", 0o755)
        .file("usr/bin/hello", 0o755, b"#!/bin/sh\necho hello\n")
        .build()
}

fn two_layer_image() -> TestImage {
    let top = LayerBuilder::new()
        .file("etc/motd", 0o644, b"second layer\n")
        .build();
    let mut image = TestImage::new(vec![base_layer(), top]);
    image.run = serde_json::json!({"Env": ["PATH=/usr/bin", "LANG=C.UTF-8"], "Cmd": ["/usr/bin/hello"], "WorkingDir": "/srv", "User": "1000"});
    image
}

fn resolve(
    reference: &str,
    access: &RegistryAccess,
) -> Result<moat_engine::images::registry::ResolvedImage, ImageError> {
    let r = ImageRef::parse(reference).unwrap();
    block_on(Registry::new(&r, access).resolve())
}

/// Fetches the blob of `desc` of image `reference` into the file `dest`, with `progress`.
fn fetch(
    reference: &str,
    desc: &OciDescriptor,
    dest: &std::path::Path,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<(), ImageError> {
    let r = ImageRef::parse(reference).unwrap();
    let bytes = block_on(
        Registry::new(&r, &RegistryAccess::default()).fetch_blob_into(desc, Vec::new(), progress),
    )?;
    std::fs::write(dest, bytes).unwrap();
    Ok(())
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn a_tag_resolves_to_its_manifest_and_configuration_and_blobs_arrive_checked() {
    let registry = reg::Registry::start();
    let image = two_layer_image();
    let digest = registry.push("team/tool", "v1", &image);
    let reference = format!("{}/team/tool:v1", registry.host());
    let resolved = resolve(&reference, &RegistryAccess::default()).unwrap();
    assert_eq!(resolved.digest, digest);
    assert_eq!(resolved.manifest.layers.len(), 2);
    assert_eq!(resolved.config.rootfs.diff_ids, image.diff_ids);
    assert_eq!(resolved.config.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(resolved.config.config.user.as_deref(), Some("1000"));

    // By digest, the same.
    let by_digest = resolve(
        &format!("{}/team/tool@{digest}", registry.host()),
        &RegistryAccess::default(),
    )
    .unwrap();
    assert_eq!(by_digest.digest, digest);

    // Each blob arrives whole, with progress reported up to its size.
    let dir = tempfile::tempdir().unwrap();
    for (i, desc) in resolved.manifest.layers.iter().enumerate() {
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let progress = {
            let seen = seen.clone();
            Arc::new(move |n: u64| seen.store(n, std::sync::atomic::Ordering::SeqCst))
        };
        let dest = dir.path().join(format!("layer{i}"));
        fetch(&reference, desc, &dest, progress).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), image.layers[i]);
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            image.layers[i].len() as u64
        );
    }
}

#[test]
fn a_blob_changed_in_the_registry_is_refused() {
    let registry = reg::Registry::start();
    let image = two_layer_image();
    registry.push("team/tool", "v1", &image);
    let reference = format!("{}/team/tool:v1", registry.host());
    let resolved = resolve(&reference, &RegistryAccess::default()).unwrap();
    let desc = &resolved.manifest.layers[1];
    // Same length, other bytes: only the digest can tell.
    let file = registry.blob_file(&desc.digest);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = fetch(&reference, desc, &dir.path().join("x"), Arc::new(|_| {})).unwrap_err();
    assert!(matches!(e, ImageError::Tampered(_)), "{e}");
    assert!(e.to_string().contains("digest"), "{e}");
}

#[test]
fn an_index_is_resolved_to_linux_amd64_and_an_image_without_it_is_refused_by_name() {
    let registry = reg::Registry::start();
    let amd64 = two_layer_image();
    let mut arm64 = TestImage::new(vec![base_layer()]);
    arm64.platform = ("linux".into(), "arm64".into());
    let amd64_digest = registry.push("multi", "amd64", &amd64);
    let arm64_digest = registry.push("multi", "arm64", &arm64);
    let size = |tag: &str| registry.manifest_bytes("multi", tag).len();
    registry.push_index(
        "multi",
        "both",
        &[
            (arm64_digest.clone(), size("arm64"), "linux", "arm64"),
            (amd64_digest.clone(), size("amd64"), "linux", "amd64"),
        ],
    );
    registry.push_index(
        "multi",
        "armonly",
        &[(arm64_digest, size("arm64"), "linux", "arm64")],
    );
    let access = RegistryAccess::default();
    let both = resolve(&format!("{}/multi:both", registry.host()), &access).unwrap();
    assert_eq!(both.digest, amd64_digest);
    let e = resolve(&format!("{}/multi:armonly", registry.host()), &access).unwrap_err();
    assert!(matches!(e, ImageError::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("linux/arm64"), "{e}");
    // A single-platform image for another architecture, asked for directly.
    let e = resolve(&format!("{}/multi:arm64", registry.host()), &access).unwrap_err();
    assert!(e.to_string().contains("is for linux/arm64"), "{e}");
}

#[test]
fn missing_tags_unreachable_registries_and_credentials_get_clear_errors() {
    let registry = reg::Registry::start();
    registry.push("team/tool", "v1", &two_layer_image());
    let access = RegistryAccess::default();
    let e = resolve(&format!("{}/team/tool:nope", registry.host()), &access).unwrap_err();
    assert!(matches!(e, ImageError::NotFound(_)), "{e}");
    let e = resolve(&format!("{}/no/such:v1", registry.host()), &access).unwrap_err();
    assert!(matches!(e, ImageError::NotFound(_)), "{e}");

    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = resolve(&format!("127.0.0.1:{closed}/a:b"), &access).unwrap_err();
    assert!(matches!(e, ImageError::Unreachable(_)), "{e}");
    assert!(
        e.to_string().contains(&format!("127.0.0.1:{closed}")),
        "{e}"
    );

    let private = reg::Registry::start_with_auth("puller", "s3cret-pass");
    private.push("team/tool", "v1", &two_layer_image());
    let reference = format!("{}/team/tool:v1", private.host());
    let e = resolve(&reference, &access).unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized(_)), "{e}");
    let mut wrong = RegistryAccess::default();
    wrong.credentials.insert(
        private.host(),
        Credentials {
            username: "puller".into(),
            password: "wrong".into(),
        },
    );
    let e = resolve(&reference, &wrong).unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized(_)), "{e}");
    let right = RegistryAccess {
        insecure: Vec::new(),
        open_to_tenants: Vec::new(),
        credentials: BTreeMap::from([(
            private.host(),
            Credentials {
                username: "puller".into(),
                password: "s3cret-pass".into(),
            },
        )]),
    };
    resolve(&reference, &right).unwrap();
}

/// Pulls `reference` into `cache`, collecting the progress events.
fn pull(cache: &ImageCache, reference: &str) -> (Result<PulledImage, ImageError>, Vec<PullEvent>) {
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let progress = {
        let events = events.clone();
        Arc::new(move |e: PullEvent| events.lock().unwrap().push(e))
    };
    let r = ImageRef::parse(reference).unwrap();
    let result = block_on(cache.pull(&r, progress));
    let events = events.lock().unwrap().clone();
    (result, events)
}

/// The paths under `dir`, relative, sorted.
fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(dir).unwrap().display().to_string());
            if path.is_dir() && !path.is_symlink() {
                todo.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_pull_merges_the_layers_honours_whiteouts_and_shares_layers_between_images() {
    use std::os::unix::fs::MetadataExt as _;
    let registry = reg::Registry::start();
    let base = LayerBuilder::new()
        .dir("etc/", 0o755)
        .file("etc/os-release", 0o644, b"ID=moat-test\n")
        .file("etc/old", 0o644, b"goes away\n")
        .dir("data/", 0o755)
        .file("data/a", 0o644, b"a")
        .file("data/b", 0o644, b"b")
        .file("usr-suid", 0o4755, b"#!/bin/sh\n")
        .build();
    let top = LayerBuilder::new()
        .file("etc/.wh.old", 0o644, b"")
        .file("data/.wh..wh..opq", 0o644, b"")
        .file("data/c", 0o644, b"c")
        .file("etc/motd", 0o644, b"top\n")
        .build();
    let other_top = LayerBuilder::new()
        .file("etc/other", 0o644, b"other\n")
        .build();
    let mut first = TestImage::new(vec![base.clone(), top]);
    first.run = serde_json::json!({"Env": ["A=1"], "WorkingDir": "/data"});
    let first_digest = registry.push("app", "first", &first);
    registry.push("app", "second", &TestImage::new(vec![base, other_top]));

    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::open(&dir.path().join("images"), RegistryAccess::default()).unwrap();
    let (one, events) = pull(&cache, &format!("{}/app:first", registry.host()));
    let one = one.unwrap();
    assert_eq!(one.digest, first_digest);
    assert_eq!(
        one.reference,
        format!("{}/app:first@{first_digest}", registry.host())
    );
    assert_eq!(one.config.working_dir.as_deref(), Some("/data"));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, PullEvent::Fetching { index: 1, .. }))
    );
    assert_eq!(
        listing(&one.rootfs),
        [
            "data",
            "data/c",
            "etc",
            "etc/group",
            "etc/motd",
            "etc/os-release",
            "etc/passwd",
            "usr-suid"
        ]
    );
    // The image had no accounts: moat's user was added.
    let passwd = std::fs::read_to_string(one.rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("\nuser:x:1000:1000:"), "{passwd}");
    let suid = std::fs::metadata(one.rootfs.join("usr-suid")).unwrap();
    assert_eq!(suid.mode() & 0o7777, 0o755, "setuid dropped");

    // The second image shares the base layer: the same files on disk, not copies.
    let (two, events) = pull(&cache, &format!("{}/app:second", registry.host()));
    let two = two.unwrap();
    assert_eq!(two.layers[0], one.layers[0]);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, PullEvent::Fetching { index: 0, .. })),
        "the shared layer is not fetched again: {events:?}"
    );
    let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(&one.rootfs.join("etc/os-release")),
        ino(&two.rootfs.join("etc/os-release"))
    );
    assert_eq!(listing(&two.rootfs).len(), 10, "{:?}", listing(&two.rootfs));

    // Pulled already: nothing is fetched or unpacked.
    let (again, events) = pull(&cache, &format!("{}/app:first", registry.host()));
    assert_eq!(again.unwrap(), one);
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn hostile_or_mislabelled_layers_fail_the_pull_and_leave_nothing() {
    let registry = reg::Registry::start();
    let hostile = LayerBuilder::new()
        .symlink("evil", "/")
        .file("evil/moat-image-test-pwned", 0o644, b"x")
        .build();
    registry.push("bad", "escape", &TestImage::new(vec![hostile]));
    let linked = LayerBuilder::new().symlink("home", "/etc").build();
    registry.push("bad", "home", &TestImage::new(vec![linked]));
    let mut mislabelled = TestImage::new(vec![base_layer()]);
    mislabelled.diff_ids = vec![reg::sha256_digest(b"something else")];
    registry.push("bad", "label", &mislabelled);

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let cache = ImageCache::open(&root, RegistryAccess::default()).unwrap();
    let (r, _) = pull(&cache, &format!("{}/bad:escape", registry.host()));
    let e = r.unwrap_err();
    assert!(matches!(e, ImageError::Invalid(_)), "{e}");
    assert!(e.to_string().contains("evil"), "{e}");
    assert!(!std::path::Path::new("/moat-image-test-pwned").exists());

    let (r, _) = pull(&cache, &format!("{}/bad:label", registry.host()));
    let e = r.unwrap_err();
    assert!(matches!(e, ImageError::Tampered(_)), "{e}");

    // A reserve the disk cannot keep: refused before anything is fetched.
    registry.push("good", "1", &two_layer_image());
    let greedy = ImageCache::open(&root, RegistryAccess::default())
        .unwrap()
        .with_reserve(u64::MAX / 2);
    let (r, events) = pull(&greedy, &format!("{}/good:1", registry.host()));
    let e = r.unwrap_err();
    assert!(matches!(e, ImageError::InsufficientStorage(_)), "{e}");
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, PullEvent::Fetching { .. })),
        "{events:?}"
    );

    for sub in ["layers", "trees", "tmp"] {
        assert_eq!(listing(&root.join(sub)), Vec::<String>::new(), "{sub}");
    }

    // A sound layer making /home a link: the layer is kept (another image may use it), the
    // image is refused, and no tree is made.
    let (r, _) = pull(&cache, &format!("{}/bad:home", registry.host()));
    let e = r.unwrap_err();
    assert!(matches!(e, ImageError::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("/home"), "{e}");
    assert_eq!(listing(&root.join("trees")), Vec::<String>::new());
}

#[test]
fn a_collection_removes_unused_trees_and_the_layers_only_they_used() {
    use std::collections::HashSet;
    use std::time::Duration;
    let registry = reg::Registry::start();
    let top = |name: &str| {
        LayerBuilder::new()
            .file(&format!("etc/{name}"), 0o644, name.as_bytes())
            .build()
    };
    registry.push("app", "a", &TestImage::new(vec![base_layer(), top("a")]));
    registry.push("app", "b", &TestImage::new(vec![base_layer(), top("b")]));
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let cache = ImageCache::open(&root, RegistryAccess::default()).unwrap();
    let a = pull(&cache, &format!("{}/app:a", registry.host()))
        .0
        .unwrap();
    let b = pull(&cache, &format!("{}/app:b", registry.host()))
        .0
        .unwrap();
    assert_eq!(std::fs::read_dir(root.join("layers")).unwrap().count(), 3);

    // Within the grace period nothing goes, used or not.
    assert_eq!(
        cache
            .collect(&HashSet::new(), Duration::from_secs(3600))
            .unwrap(),
        (0, 0)
    );

    // B unused: its tree and its own layer go; the base layer A shares stays.
    let in_use = HashSet::from([a.digest.clone()]);
    assert_eq!(cache.collect(&in_use, Duration::ZERO).unwrap(), (1, 1));
    assert!(!cache.tree_dir(&b.digest).exists());
    assert!(!cache.layer_dir(&b.layers[1]).exists());
    assert!(cache.layer_dir(&b.layers[0]).exists());
    assert_eq!(
        std::fs::read(a.rootfs.join("etc/os-release")).unwrap(),
        b"ID=moat-test\n"
    );
    assert!(cache.find(&a.digest).unwrap().is_some());

    // Nothing in use: everything goes, and a pull makes it again.
    assert_eq!(
        cache.collect(&HashSet::new(), Duration::ZERO).unwrap(),
        (1, 2)
    );
    for sub in ["layers", "trees", "tmp"] {
        assert_eq!(listing(&root.join(sub)), Vec::<String>::new(), "{sub}");
    }
    let again = pull(&cache, &format!("{}/app:a", registry.host()))
        .0
        .unwrap();
    assert_eq!(again.digest, a.digest);
    assert!(again.rootfs.join("etc/a").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn housekeeping_keeps_images_that_templates_and_sandboxes_use_and_removes_the_rest() {
    use moat_backend_native::{NativeBackend, NativeOptions};
    use moat_engine::auth::Caller;
    use moat_engine::manager::{ManagerOptions, SandboxManager, ShutdownMode};
    use moat_engine::store::{Role, Store};
    use moat_proto::v1;
    moat_test_support::need_root!("the native backend needs root");
    let registry = reg::Registry::start();
    let top = |name: &str| {
        LayerBuilder::new()
            .file(&format!("etc/{name}"), 0o644, name.as_bytes())
            .build()
    };
    registry.push(
        "app",
        "kept",
        &TestImage::new(vec![base_layer(), top("kept")]),
    );
    registry.push(
        "app",
        "used",
        &TestImage::new(vec![base_layer(), top("used")]),
    );
    let dir = tempfile::Builder::new()
        .prefix("moat-images-")
        .tempdir_in("/tmp")
        .unwrap();
    let store = Arc::new(Store::open(dir.path().join("moat.db")).unwrap());
    store.create_tenant("a", "A").unwrap();
    let backend = NativeBackend::new(&NativeOptions {
        agent_binary: Some(std::path::PathBuf::from(env!("CARGO_BIN_EXE_moat"))),
        ..NativeOptions::default()
    })
    .unwrap();
    let images = dir.path().join("images");
    let opts = ManagerOptions {
        image_dir: Some(images.clone()),
        image_grace: std::time::Duration::ZERO,
        ..ManagerOptions::default()
    };
    let mgr = SandboxManager::new(store.clone(), Arc::new(backend), opts).unwrap();
    let admin = Caller {
        tenant: "a".into(),
        key_id: None,
        role: Role::Admin,
        requests_per_minute: None,
    };
    for name in ["kept", "used"] {
        let spec =
            v1::TemplateSpec::new(v1::Rootfs::Image(format!("{}/app:{name}", registry.host())));
        let req = v1::CreateTemplate {
            name: name.into(),
            spec,
        };
        mgr.create_template(&admin, req).await.unwrap();
    }
    let trees = || std::fs::read_dir(images.join("trees")).unwrap().count();
    let layers = || std::fs::read_dir(images.join("layers")).unwrap().count();
    let of = |template: &str| v1::CreateSandbox {
        template: template.into(),
        ..Default::default()
    };
    let sandbox = mgr.create(&admin, of("used")).await.unwrap();
    // Both images have a template: nothing goes.
    assert_eq!(mgr.collect_images().await.unwrap(), 0);
    // "used" loses its template but its sandbox runs on: its tree stays.
    mgr.delete_template(&admin, "used", true).await.unwrap();
    assert_eq!(mgr.collect_images().await.unwrap(), 0);
    assert_eq!((trees(), layers()), (2, 3));
    // Its sandbox ends: its tree and its own layer go; the base "kept" shares stays.
    mgr.delete(&admin, &sandbox.id).await.unwrap();
    assert_eq!(mgr.collect_images().await.unwrap(), 2);
    assert_eq!((trees(), layers()), (1, 2));
    // "kept" still makes sandboxes.
    let sb = mgr.create(&admin, of("kept")).await.unwrap();
    mgr.delete(&admin, &sb.id).await.unwrap();
    mgr.shutdown(ShutdownMode::Destroy).await;
}
