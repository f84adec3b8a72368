//! The sandbox manager over real sandboxes: create, exec (output, exit codes, stdin, env, cwd,
//! user, timeouts, output cap, OOM), delete, tenancy, quotas, invalid requests, TTL expiry and
//! shutdown, with the store checked after each. Needs root; skips with a printed reason
//! otherwise. Each test has its own store file under /tmp.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use moat_backend_native::{NativeBackend, NativeOptions};
use moat_engine::auth::Caller;
use moat_engine::manager::{
    EXEC_OUTPUT_LIMIT, ManagerError, ManagerOptions, SandboxManager, ShutdownMode,
};
use moat_engine::store::{Quotas, Role, SandboxFilter, SandboxState, Store};
use moat_proto::v1;

struct Setup {
    _dir: tempfile::TempDir,
    mgr: SandboxManager,
    store: Arc<Store>,
    /// Tenant `a`, calling with its key.
    a: Caller,
    /// Tenant `b`, calling without a key.
    b: Caller,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A manager over a fresh store with tenants `a` and `b`; `a` calls with a key of `quotas`.
fn setup(quotas: Quotas) -> Option<Setup> {
    if !is_root() {
        eprintln!("SKIP: the native backend needs root");
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("moat-manager-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let store = Arc::new(Store::open(dir.path().join("moat.db")).expect("store"));
    store.create_tenant("a", "A").expect("tenant a");
    store.create_tenant("b", "B").expect("tenant b");
    let (key, _secret) = store
        .create_key("a", "test", Role::User, quotas)
        .expect("key");
    let backend = NativeBackend::new(&NativeOptions {
        agent_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_moat"))),
        ..NativeOptions::default()
    })
    .expect("backend");
    let opts = ManagerOptions {
        default_ttl: Duration::from_secs(300),
        max_ttl: Duration::from_secs(3600),
        ..ManagerOptions::default()
    };
    let mgr = SandboxManager::new(store.clone(), Arc::new(backend), opts).expect("manager");
    Some(Setup {
        _dir: dir,
        mgr,
        store,
        a: Caller {
            tenant: "a".into(),
            key_id: Some(key.id),
            role: Role::User,
            requests_per_minute: None,
        },
        b: Caller {
            tenant: "b".into(),
            key_id: None,
            role: Role::User,
            requests_per_minute: None,
        },
    })
}

fn shell(script: &str) -> v1::ExecRequest {
    v1::ExecRequest {
        shell: Some(script.into()),
        ..Default::default()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_exec_delete() {
    let Some(s) = setup(Quotas::default()) else {
        return;
    };
    let req = v1::CreateSandbox {
        metadata: [("job".to_owned(), "one".to_owned())].into(),
        env: [("FROM_CREATE".to_owned(), "yes".to_owned())].into(),
        resources: Some(v1::ResourceRequest {
            memory: Some("64M".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let sb = s.mgr.create(&s.a, req).await.expect("create");
    assert_eq!(sb.state, v1::SandboxState::Running);
    assert_eq!(sb.template, "host");
    assert_eq!(sb.resources.memory_bytes, 64 << 20);
    assert!(sb.expires_at.is_some());
    let id = sb.id.clone();

    let r = s.mgr.exec(&s.a, &id, shell("echo hi")).await.expect("exec");
    assert_eq!((r.stdout.as_str(), r.exit_code), ("hi\n", Some(0)));
    assert!(!r.timed_out && !r.truncated && !r.oom_killed);

    let r = s
        .mgr
        .exec(&s.a, &id, shell("echo out; echo err >&2; exit 3"))
        .await
        .expect("exec");
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("out\n", "err\n"));
    assert_eq!(r.exit_code, Some(3));

    let r = s
        .mgr
        .exec(
            &s.a,
            &id,
            v1::ExecRequest {
                cmd: Some(vec!["cat".into()]),
                stdin: Some("from stdin".into()),
                ..Default::default()
            },
        )
        .await
        .expect("exec with stdin");
    assert_eq!(r.stdout, "from stdin");

    let r = s
        .mgr
        .exec(
            &s.a,
            &id,
            v1::ExecRequest {
                shell: Some("echo $FOO $FROM_CREATE; pwd; id -u".into()),
                env: [("FOO".to_owned(), "bar".to_owned())].into(),
                cwd: Some("/tmp".into()),
                user: Some("root".into()),
                ..Default::default()
            },
        )
        .await
        .expect("exec with env, cwd, user");
    assert_eq!(r.stdout, "bar yes\n/tmp\n0\n");
    let r = s.mgr.exec(&s.a, &id, shell("id -u")).await.expect("exec");
    assert_eq!(r.stdout, "1000\n", "the default user");

    let r = s
        .mgr
        .exec(
            &s.a,
            &id,
            v1::ExecRequest {
                cmd: Some(vec!["no-such-program".into()]),
                ..Default::default()
            },
        )
        .await
        .expect("a missing program is a result");
    assert_eq!(r.exit_code, Some(127));

    // The timeout kills the whole process group, the background child included.
    let r = s
        .mgr
        .exec(
            &s.a,
            &id,
            v1::ExecRequest {
                shell: Some("sleep 1000 >/dev/null 2>&1 & echo $! > /tmp/bg; sleep 1000".into()),
                timeout_secs: Some(1),
                ..Default::default()
            },
        )
        .await
        .expect("exec with timeout");
    assert!(r.timed_out);
    assert_eq!(r.exit_code, None);
    let r = s
        .mgr
        .exec(
            &s.a,
            &id,
            shell(
                "p=$(cat /tmp/bg); for i in $(seq 100); do \
                 grep -q '^State:.*Z' /proc/$p/status 2>/dev/null || \
                 { kill -0 $p 2>/dev/null || exit 0; }; sleep 0.1; done; exit 1",
            ),
        )
        .await
        .expect("exec");
    assert_eq!(
        r.exit_code,
        Some(0),
        "the background child survived the timeout"
    );

    let r = s
        .mgr
        .exec(&s.a, &id, shell("head -c 3000000 /dev/zero; echo tail >&2"))
        .await
        .expect("exec with big output");
    assert!(r.truncated);
    assert_eq!(r.stdout.len(), EXEC_OUTPUT_LIMIT);
    assert_eq!(r.stderr, "tail\n");
    assert_eq!(r.exit_code, Some(0));

    let r = s
        .mgr
        .exec(
            &s.a,
            &id,
            shell("exec /usr/bin/python3 -c \"b = b'x' * (512 << 20)\""),
        )
        .await
        .expect("exec python");
    assert!(r.oom_killed, "{r:?}");
    assert_eq!(r.exit_code, None);
    assert_eq!(r.signal.as_deref(), Some("signal: killed"));
    // The sandbox survives its command's OOM.
    let r = s
        .mgr
        .exec(&s.a, &id, shell("echo alive"))
        .await
        .expect("exec");
    assert_eq!(r.stdout, "alive\n");
    assert!(!r.oom_killed);

    let list = s
        .mgr
        .list(
            &s.a,
            v1::ListSandboxes {
                metadata: [("job".to_owned(), "one".to_owned())].into(),
                ..Default::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(list.sandboxes.len(), 1);
    assert_eq!(list.sandboxes[0].id, id);

    let gone = s.mgr.delete(&s.a, &id).await.expect("delete");
    assert_eq!(gone.state, v1::SandboxState::Killed);
    assert_eq!(gone.end_reason.as_deref(), Some("deleted"));
    let again = s.mgr.delete(&s.a, &id).await.expect("delete is idempotent");
    assert_eq!(again.state, v1::SandboxState::Killed);
    let got = s.mgr.get(&s.a, &id).await.expect("get");
    assert_eq!(got.state, v1::SandboxState::Killed);
    assert!(matches!(
        s.mgr.exec(&s.a, &id, shell("true")).await,
        Err(ManagerError::Conflict(_))
    ));
    assert_eq!(s.mgr.live_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_sees_nothing() {
    let Some(s) = setup(Quotas::default()) else {
        return;
    };
    let sb = s
        .mgr
        .create(&s.a, v1::CreateSandbox::default())
        .await
        .expect("create");
    let e = s
        .mgr
        .get(&s.b, &sb.id)
        .await
        .expect_err("b must not see it");
    assert!(matches!(e, ManagerError::NotFound(_)), "{e}");
    let e = s
        .mgr
        .exec(&s.b, &sb.id, shell("true"))
        .await
        .expect_err("b must not run in it");
    assert!(matches!(e, ManagerError::NotFound(_)), "{e}");
    let e = s
        .mgr
        .delete(&s.b, &sb.id)
        .await
        .expect_err("b must not delete it");
    assert!(matches!(e, ManagerError::NotFound(_)), "{e}");
    let e = s
        .mgr
        .set_timeout(&s.b, &sb.id, v1::SetTimeout { timeout_secs: 10 })
        .await
        .expect_err("b must not extend it");
    assert!(matches!(e, ManagerError::NotFound(_)), "{e}");
    let list = s
        .mgr
        .list(&s.b, v1::ListSandboxes::default())
        .await
        .expect("list");
    assert!(list.sandboxes.is_empty());
    let r = s
        .mgr
        .exec(&s.a, &sb.id, shell("echo still here"))
        .await
        .expect("a's sandbox still runs");
    assert_eq!(r.stdout, "still here\n");
    assert_eq!(s.mgr.shutdown(ShutdownMode::Destroy).await, (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_refuses_without_leaving_anything() {
    let Some(s) = setup(Quotas {
        max_sandboxes: Some(1),
        ..Quotas::default()
    }) else {
        return;
    };
    let first = s
        .mgr
        .create(&s.a, v1::CreateSandbox::default())
        .await
        .expect("first create");
    let e = s
        .mgr
        .create(&s.a, v1::CreateSandbox::default())
        .await
        .expect_err("second create is over the quota");
    assert!(matches!(e, ManagerError::QuotaExceeded(_)), "{e}");
    assert_eq!(moat_server::status_of(&e).as_u16(), 429);
    assert_eq!(
        s.mgr.live_count(),
        1,
        "a process was left for the refused sandbox"
    );
    let page = s
        .store
        .list_sandboxes("a", &SandboxFilter::default())
        .expect("list");
    assert_eq!(page.items.len(), 1, "the refused sandbox left a record");
    assert_eq!(page.items[0].id, first.id);
    // Once the first ends, the quota has room again.
    s.mgr.delete(&s.a, &first.id).await.expect("delete");
    let second = s
        .mgr
        .create(&s.a, v1::CreateSandbox::default())
        .await
        .expect("create after delete");
    s.mgr.delete(&s.a, &second.id).await.expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_typed_errors() {
    let Some(s) = setup(Quotas::default()) else {
        return;
    };
    let small = serde_json::json!({
        "rootfs": "host",
        "max_resources": {"memory": "128M"},
    });
    s.store
        .create_template(Some("a"), "small", &small)
        .expect("template");
    let cases = [
        v1::CreateSandbox {
            template: "no-such-template".into(),
            ..Default::default()
        },
        v1::CreateSandbox {
            template: "small".into(),
            resources: Some(v1::ResourceRequest {
                memory: Some("256M".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        v1::CreateSandbox {
            resources: Some(v1::ResourceRequest {
                memory: Some("1K".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        v1::CreateSandbox {
            timeout_secs: Some(7200),
            ..Default::default()
        },
        v1::CreateSandbox {
            template: "../etc".into(),
            ..Default::default()
        },
    ];
    for req in cases {
        let e = s
            .mgr
            .create(&s.a, req.clone())
            .await
            .expect_err("invalid create");
        assert!(matches!(e, ManagerError::Invalid(_)), "{req:?}: {e}");
        assert_eq!(moat_server::status_of(&e).as_u16(), 400);
    }
    // Within the small template's limit it works.
    let sb = s
        .mgr
        .create(
            &s.a,
            v1::CreateSandbox {
                template: "small".into(),
                resources: Some(v1::ResourceRequest {
                    memory: Some("96M".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .expect("create within the template's limit");
    // The other tenant does not see tenant a's template.
    let e = s
        .mgr
        .create(
            &s.b,
            v1::CreateSandbox {
                template: "small".into(),
                ..Default::default()
            },
        )
        .await
        .expect_err("b cannot use a's template");
    assert!(matches!(e, ManagerError::Invalid(_)), "{e}");
    let e = s
        .mgr
        .set_timeout(&s.a, &sb.id, v1::SetTimeout { timeout_secs: 7200 })
        .await
        .expect_err("over the maximum TTL");
    assert!(matches!(e, ManagerError::Invalid(_)), "{e}");
    let e = s
        .mgr
        .exec(&s.a, &sb.id, v1::ExecRequest::default())
        .await
        .expect_err("neither cmd nor shell");
    assert!(matches!(e, ManagerError::Invalid(_)), "{e}");
    let e = s
        .mgr
        .exec(
            &s.a,
            &sb.id,
            v1::ExecRequest {
                shell: Some("true".into()),
                user: Some("nobody-here".into()),
                ..Default::default()
            },
        )
        .await
        .expect_err("unknown user");
    assert!(matches!(e, ManagerError::Invalid(_)), "{e}");
    // Unknown fields are refused at parsing.
    assert!(serde_json::from_str::<v1::CreateSandbox>(r#"{"template":"host","ttl":5}"#).is_err());
    assert!(serde_json::from_str::<v1::ExecRequest>(r#"{"shell":"true","sudo":true}"#).is_err());
    // Nothing invalid left a record.
    let page = s
        .store
        .list_sandboxes("a", &SandboxFilter::default())
        .expect("list");
    assert_eq!(page.items.len(), 1);
    let e = s.mgr.get(&s.a, "nosuchsandbox0000").await.expect_err("get");
    assert!(matches!(e, ManagerError::NotFound(_)), "{e}");
    s.mgr.delete(&s.a, &sb.id).await.expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_and_shutdown() {
    let Some(s) = setup(Quotas::default()) else {
        return;
    };
    let short = s
        .mgr
        .create(
            &s.a,
            v1::CreateSandbox {
                timeout_secs: Some(1),
                ..Default::default()
            },
        )
        .await
        .expect("create short");
    let long = s
        .mgr
        .create(&s.a, v1::CreateSandbox::default())
        .await
        .expect("create long");
    let extended = s
        .mgr
        .set_timeout(&s.a, &long.id, v1::SetTimeout { timeout_secs: 600 })
        .await
        .expect("set timeout");
    assert!(extended.expires_at > long.expires_at);

    // Before its TTL nothing is reaped; after it, only the short one.
    assert!(
        s.mgr
            .reap_expired(short.created_at)
            .await
            .expect("reap")
            .is_empty()
    );
    let reaped = s.mgr.reap_expired(now_ms() + 1_500).await.expect("reap");
    assert_eq!(reaped, vec![short.id.clone()]);
    let got = s.mgr.get(&s.a, &short.id).await.expect("get");
    assert_eq!(got.state, v1::SandboxState::Killed);
    assert_eq!(got.end_reason.as_deref(), Some("ttl"));
    assert!(matches!(
        s.mgr.exec(&s.a, &short.id, shell("true")).await,
        Err(ManagerError::Conflict(_))
    ));
    let r = s
        .mgr
        .exec(&s.a, &long.id, shell("echo up"))
        .await
        .expect("exec");
    assert_eq!(r.stdout, "up\n");

    let third = s
        .mgr
        .create(&s.a, v1::CreateSandbox::default())
        .await
        .expect("create third");
    assert_eq!(s.mgr.shutdown(ShutdownMode::Destroy).await, (2, 0));
    assert_eq!(s.mgr.live_count(), 0);
    for id in [&long.id, &third.id] {
        let got = s.mgr.get(&s.a, id).await.expect("get");
        assert_eq!(got.state, v1::SandboxState::Killed, "{id}");
    }
    let active = s
        .store
        .list_sandboxes(
            "a",
            &SandboxFilter {
                states: vec![
                    SandboxState::Starting,
                    SandboxState::Running,
                    SandboxState::Paused,
                ],
                ..SandboxFilter::default()
            },
        )
        .expect("list");
    assert!(active.items.is_empty(), "{:?}", active.items);
}

/// The engine's front-end services: a key secret becomes its caller (a revoked or unknown one
/// is unauthenticated), a start name resolves to a template or is not found, and the file
/// service works on the caller's sandbox only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_services() {
    use moat_engine::files::{Download, FileError, Format};
    use moat_engine::manager::StartFrom;

    let Some(s) = setup(Quotas::default()) else {
        return;
    };
    let (key, secret) = s
        .store
        .create_key(
            "a",
            "svc",
            Role::Admin,
            Quotas {
                requests_per_minute: Some(7),
                ..Quotas::default()
            },
        )
        .expect("key");
    let caller = s
        .mgr
        .authenticate(secret.expose().to_owned())
        .await
        .expect("a valid key authenticates");
    assert_eq!(
        caller,
        Caller {
            tenant: "a".into(),
            key_id: Some(key.id.clone()),
            role: Role::Admin,
            requests_per_minute: Some(7),
        }
    );
    let e = s
        .mgr
        .authenticate("moat_nosuchkey".into())
        .await
        .expect_err("an unknown secret");
    assert!(matches!(e, ManagerError::Unauthenticated(_)), "{e}");
    s.store.revoke_key("a", &key.id).expect("revoke");
    let e = s
        .mgr
        .authenticate(secret.expose().to_owned())
        .await
        .expect_err("a revoked key");
    assert!(matches!(e, ManagerError::Unauthenticated(_)), "{e}");

    assert_eq!(
        s.mgr.resolve_start(&s.a, "base").await.expect("base"),
        StartFrom::Template("base".into())
    );
    let e = s
        .mgr
        .resolve_start(&s.a, "no-such-template")
        .await
        .expect_err("unknown");
    assert!(matches!(e, ManagerError::NotFound(_)), "{e}");
    assert_eq!(e.to_string(), "template \"no-such-template\" not found");

    let sb = s
        .mgr
        .create(&s.a, v1::CreateSandbox::default())
        .await
        .expect("create");
    let files = s.mgr.files();
    let (made, dir) = files
        .make_dir(&caller, &sb.id, "/tmp/d", None)
        .await
        .expect("mkdir");
    assert!(made);
    assert_eq!(dir.kind, v1::FileType::Dir);
    let (made, _) = files
        .make_dir(&caller, &sb.id, "/tmp/d", None)
        .await
        .expect("mkdir again");
    assert!(!made, "an existing directory is not made again");
    let e = files
        .download(&caller, &sb.id, "/tmp/d", Format::Raw, None)
        .await
        .expect_err("a directory is no file");
    assert!(matches!(e, FileError::IsADirectory(_)), "{e}");
    assert!(matches!(
        files
            .download(&caller, &sb.id, "/tmp/d", Format::Tar, None)
            .await,
        Ok(Download::Archive { .. })
    ));
    let e = files
        .stat(&caller, &sb.id, "/tmp/none", None)
        .await
        .expect_err("missing");
    assert_eq!(e.code(), "not_found");
    let other = Caller {
        tenant: "b".into(),
        ..caller.clone()
    };
    let e = files
        .stat(&other, &sb.id, "/tmp/d", None)
        .await
        .expect_err("b must not see a's files");
    assert!(
        matches!(e, FileError::Sandbox(ManagerError::NotFound(_))),
        "{e}"
    );
    assert_eq!(s.mgr.shutdown(ShutdownMode::Destroy).await, (1, 0));
}
