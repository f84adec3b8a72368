//! `moat-client` against a real `moat serve`: every call family once, the typed errors, and a
//! streamed command's events. Needs root (the server's native backend); skips otherwise.

use moat_test_support as support;

use moat_client::types::{
    CreateKey, CreateSandbox, CreateTemplate, ExecRequest, FileType, KeyRole, ListSandboxes,
    OutputEncoding, SandboxState, TemplateSpec,
};
use moat_client::{Body, Client, Error, StreamEvent};
use support::need_root;
use support::server::Server;

#[tokio::test]
async fn client_against_a_server() {
    need_root!("moat serve's native backend needs root");
    let server = Server::start();
    let url = format!("http://127.0.0.1:{}", server.port);
    let client = Client::new(&url, &server.admin_key()).expect("client");

    // Sandboxes, with paging over two pages.
    let mut ids = Vec::new();
    for n in 0..3 {
        let mut req = CreateSandbox::default();
        req.metadata.insert("n".into(), n.to_string());
        ids.push(client.create_sandbox(&req).await.expect("create").id);
    }
    let page = client
        .list_sandboxes(&ListSandboxes {
            limit: Some(2),
            ..Default::default()
        })
        .await
        .expect("page");
    assert_eq!(page.sandboxes.len(), 2);
    assert!(page.next.is_some());
    let all = client
        .list_all_sandboxes(&ListSandboxes {
            limit: Some(2),
            states: vec![SandboxState::Running],
            ..Default::default()
        })
        .await
        .expect("all");
    let listed: Vec<&str> = all.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
    let id = ids[0].clone();
    let later = client.set_timeout(&id, 3600).await.expect("timeout");
    assert!(later.expires_at > all[0].expires_at);

    // Buffered and streamed exec.
    let result = client
        .exec(
            &id,
            &ExecRequest {
                shell: Some("echo hi; exit 4".into()),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    assert_eq!(
        (result.stdout.as_str(), result.exit_code),
        ("hi\n", Some(4))
    );
    let mut stream = client
        .exec_stream(
            &id,
            &ExecRequest {
                shell: Some("printf 'a\\0b'; printf err >&2; exit 2".into()),
                encoding: OutputEncoding::Base64,
                ..Default::default()
            },
        )
        .await
        .expect("stream");
    let first = stream.next().await.expect("event").expect("ok");
    assert!(matches!(first, StreamEvent::Started { .. }), "{first:?}");
    let out = stream.finish().await.expect("finish");
    assert_eq!(out.stdout, b"a\0b");
    assert_eq!(out.stderr, b"err");
    assert_eq!(out.end.exit_code, Some(2));

    // Files.
    let entry = client
        .upload(&id, "/tmp/dir/a.txt", "alpha")
        .await
        .expect("upload");
    assert_eq!((entry.kind, entry.size), (FileType::File, 5));
    let made = client.mkdir(&id, "/tmp/dir/sub").await.expect("mkdir");
    assert_eq!(made.kind, FileType::Dir);
    let moved = client
        .move_path(&id, "/tmp/dir/a.txt", "/tmp/dir/sub/b.txt")
        .await
        .expect("move");
    assert_eq!(moved.path, "/tmp/dir/sub/b.txt");
    let names: Vec<String> = client
        .list_files(&id, "/tmp/dir", Some(2))
        .await
        .expect("list")
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(names, ["/tmp/dir/sub", "/tmp/dir/sub/b.txt"]);
    let bytes = client
        .download(&id, "/tmp/dir/sub/b.txt")
        .await
        .expect("download")
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(&bytes[..], b"alpha");
    // A streamed upload from a reader, then a directory as tar and back.
    let big: Vec<u8> = (0..=255u8).cycle().take(2 << 20).collect();
    let reader = std::io::Cursor::new(big.clone());
    client
        .upload(&id, "/tmp/big", Body::from_reader(reader))
        .await
        .expect("upload reader");
    assert_eq!(
        client.stat(&id, "/tmp/big").await.expect("stat").size,
        2 << 20
    );
    let tar = client
        .download_tar(&id, "/tmp/dir")
        .await
        .expect("tar")
        .bytes()
        .await
        .expect("bytes");
    let copy = client
        .upload_tar(&id, "/tmp/copy", tar)
        .await
        .expect("upload tar");
    assert_eq!(copy.kind, FileType::Dir);
    let text = client
        .download(&id, "/tmp/copy/sub/b.txt")
        .await
        .expect("download")
        .bytes()
        .await
        .expect("bytes");
    assert_eq!(&text[..], b"alpha");
    client.remove(&id, "/tmp/dir").await.expect("remove");
    let gone = client.stat(&id, "/tmp/dir").await.expect_err("an error");
    assert!(gone.is_not_found(), "{gone}");

    // Templates.
    let spec: TemplateSpec = serde_json::from_str(r#"{"rootfs":"host"}"#).expect("spec");
    client
        .create_template(&CreateTemplate {
            name: "t1".into(),
            spec,
        })
        .await
        .expect("template");
    assert_eq!(client.get_template("t1").await.expect("get").name, "t1");
    assert!(
        client
            .list_templates()
            .await
            .expect("list")
            .iter()
            .any(|t| t.name == "t1")
    );
    client.delete_template("t1", false).await.expect("delete");

    // Keys, and what a revoked one gets.
    let created = client
        .create_key(&CreateKey {
            name: "short-lived".into(),
            role: KeyRole::User,
            ..Default::default()
        })
        .await
        .expect("key");
    let user = Client::new(&url, &created.secret).expect("client");
    let e = user.list_keys(None).await.expect_err("an error");
    assert_eq!((e.status(), e.code()), (Some(403), Some("forbidden")));
    assert_eq!(
        client.list_keys(None).await.expect("keys").len(),
        2,
        "admin and the new key"
    );
    let revoked = client
        .revoke_key(&created.key.id, None)
        .await
        .expect("revoke");
    assert!(revoked.revoked_at.is_some());
    let e = user.get_sandbox(&id).await.expect_err("an error");
    assert_eq!((e.status(), e.code()), (Some(401), Some("unauthenticated")));

    // Typed errors.
    let e = client
        .get_sandbox("aaaaaaaaaaaaaaaaaaaa")
        .await
        .expect_err("an error");
    assert!(e.is_not_found(), "{e}");
    assert!(matches!(&e, Error::Api(api) if api.message.contains("aaaaaaaaaaaaaaaaaaaa")));
    let e = client
        .exec(&id, &ExecRequest::default())
        .await
        .expect_err("an error");
    assert_eq!(e.code(), Some("invalid"), "{e}");
    let nowhere = Client::new("http://127.0.0.1:1", "moat_x").expect("client");
    assert!(matches!(
        nowhere.get_sandbox(&id).await,
        Err(Error::Transport { .. })
    ));

    for id in &ids {
        client.delete_sandbox(id).await.expect("delete");
    }
    assert_eq!(
        client.get_sandbox(&id).await.expect("get").state,
        SandboxState::Killed
    );
}
