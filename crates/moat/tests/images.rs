//! Images from a real registry (`docker-registry` on loopback, `moat_test_support::registry`)
//! with images the tests build and push: manifests resolved for linux/amd64, blobs checked
//! against their digests, and the errors a user gets for what cannot be pulled.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use moat_engine::images::registry::OciDescriptor;
use moat_engine::images::registry::{Credentials, Registry, RegistryAccess};
use moat_engine::images::{ImageError, ImageRef};
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

/// Fetches the blob of `desc` of image `reference` into `dest`, with `progress`.
fn fetch(
    reference: &str,
    desc: &OciDescriptor,
    dest: &std::path::Path,
    progress: Arc<dyn Fn(u64) + Send + Sync>,
) -> Result<(), ImageError> {
    let r = ImageRef::parse(reference).unwrap();
    block_on(Registry::new(&r, &RegistryAccess::default()).fetch_blob(desc, dest, progress))
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
