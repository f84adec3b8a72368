//! The `filesystem.Filesystem` service against real files: every RPC's answers and error codes,
//! path handling, magic links, special files, and the caller's permissions.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::time::Duration;

use futures_util::StreamExt;
use moat_agent::filesystem::FsService;
use moat_agent::rpc::Code;
use moat_agent::users::User;
use moat_proto::filesystem::*;

const WAIT: Duration = Duration::from_secs(20);

fn service() -> FsService {
    FsService::new(common::state("root"))
}

async fn stat(fs: &FsService, u: &User, path: &str) -> Result<EntryInfo, Code> {
    fs.stat(u, StatRequest { path: path.into() })
        .await
        .map(|r| r.entry.expect("entry"))
        .map_err(|e| e.code)
}

async fn list(fs: &FsService, u: &User, path: &str, depth: u32) -> Result<Vec<EntryInfo>, Code> {
    fs.list_dir(
        u,
        ListDirRequest {
            path: path.into(),
            depth,
        },
    )
    .await
    .map(|r| r.entries)
    .map_err(|e| e.code)
}

fn p(dir: &tempfile::TempDir, rel: &str) -> String {
    format!("{}/{rel}", dir.path().display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_reports_entries_like_upstream() {
    require_root!();
    let dir = common::tempdir();
    let fs = service();
    let root = common::root_user(dir.path());
    std::fs::write(dir.path().join("a.txt"), "hello").expect("write");
    std::fs::set_permissions(
        dir.path().join("a.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .expect("chmod");
    std::fs::create_dir(dir.path().join("d")).expect("mkdir");
    symlink(dir.path().join("a.txt"), dir.path().join("link")).expect("symlink");
    symlink("missing", dir.path().join("dangling")).expect("symlink");

    let e = stat(&fs, &root, &p(&dir, "a.txt")).await.expect("stat");
    assert_eq!(e.name, "a.txt");
    assert_eq!(e.r#type, FileType::File as i32);
    assert_eq!(e.path, p(&dir, "a.txt"));
    assert_eq!(e.size, 5);
    assert_eq!(e.mode, 0o640);
    assert_eq!(e.permissions, "-rw-r-----");
    assert_eq!(e.owner, "root");
    assert!(e.modified_time.is_some());
    assert!(!e.is_symlink && e.symlink_target.is_none());

    let d = stat(&fs, &root, &p(&dir, "d")).await.expect("stat dir");
    assert_eq!(d.r#type, FileType::Directory as i32);
    assert!(d.permissions.starts_with('d'));

    let l = stat(&fs, &root, &p(&dir, "link")).await.expect("stat link");
    assert_eq!(
        l.r#type,
        FileType::File as i32,
        "a link reports its target's type"
    );
    // The link is marked by its target alone, as upstream's envd does.
    assert!(!l.is_symlink);
    assert_eq!(l.symlink_target.as_deref(), Some(p(&dir, "a.txt").as_str()));
    assert_eq!(l.mode, 0o640);
    assert!(l.permissions.starts_with('L'));

    let g = stat(&fs, &root, &p(&dir, "dangling"))
        .await
        .expect("stat dangling");
    assert_eq!(g.r#type, FileType::Unspecified as i32);
    assert!(!g.is_symlink);
    assert_eq!(
        g.symlink_target.as_deref(),
        Some(p(&dir, "missing").as_str())
    );

    // Paths: relative to the home, `~`, empty = workdir (the home here), cleaned.
    let rel = stat(&fs, &root, "a.txt").await.expect("relative");
    assert_eq!(rel.path, p(&dir, "a.txt"));
    assert_eq!(
        stat(&fs, &root, "~/d/../a.txt").await.expect("tilde").path,
        p(&dir, "a.txt")
    );
    assert_eq!(
        stat(&fs, &root, "").await.expect("empty").path,
        dir.path().to_str().expect("utf-8")
    );

    assert_eq!(
        stat(&fs, &root, &p(&dir, "nope")).await,
        Err(Code::NotFound)
    );
    assert_eq!(
        stat(&fs, &root, &p(&dir, "a.txt/below")).await,
        Err(Code::NotFound)
    );
    assert_eq!(
        stat(&fs, &root, "/tmp/a\0b").await,
        Err(Code::InvalidArgument)
    );
    let long = format!("/{}", "x/".repeat(2100));
    assert_eq!(stat(&fs, &root, &long).await, Err(Code::InvalidArgument));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_dir_creates_parents_owned_by_the_user() {
    require_root!();
    let dir = common::tempdir();
    let fs = service();
    let user = common::plain_user(&dir.path().join("home"));
    let made = fs
        .make_dir(
            &user,
            MakeDirRequest {
                path: "x/y/z".into(),
            },
        )
        .await
        .expect("make_dir")
        .entry
        .expect("entry");
    assert_eq!(made.path, p(&dir, "home/x/y/z"));
    assert_eq!(made.r#type, FileType::Directory as i32);
    for d in ["home/x", "home/x/y", "home/x/y/z"] {
        let md = std::fs::metadata(dir.path().join(d)).expect("exists");
        assert!(md.is_dir());
        assert_eq!((md.uid(), md.gid()), (1000, 1000), "{d} owned by the user");
    }
    let again = fs
        .make_dir(
            &user,
            MakeDirRequest {
                path: "x/y/z".into(),
            },
        )
        .await;
    assert_eq!(again.map_err(|e| e.code).err(), Some(Code::AlreadyExists));
    std::fs::write(dir.path().join("home/file"), "").expect("write");
    let on_file = fs
        .make_dir(
            &user,
            MakeDirRequest {
                path: "file".into(),
            },
        )
        .await;
    assert_eq!(
        on_file.map_err(|e| e.code).err(),
        Some(Code::InvalidArgument)
    );
    // A root-owned directory is not the user's to write in.
    let denied = fs
        .make_dir(
            &user,
            MakeDirRequest {
                path: p(&dir, "rootonly"),
            },
        )
        .await;
    assert_eq!(
        denied.map_err(|e| e.code).err(),
        Some(Code::PermissionDenied)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_renames_and_creates_destination_parents() {
    require_root!();
    let dir = common::tempdir();
    let fs = service();
    let root = common::root_user(dir.path());
    std::fs::write(dir.path().join("src.txt"), "data").expect("write");
    let moved = fs
        .move_entry(
            &root,
            MoveRequest {
                source: p(&dir, "src.txt"),
                destination: p(&dir, "new/parent/dst.txt"),
            },
        )
        .await
        .expect("move")
        .entry
        .expect("entry");
    assert_eq!(moved.path, p(&dir, "new/parent/dst.txt"));
    assert_eq!(moved.size, 4);
    assert!(!dir.path().join("src.txt").exists());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("new/parent/dst.txt")).expect("read"),
        "data"
    );
    let missing = fs
        .move_entry(
            &root,
            MoveRequest {
                source: p(&dir, "src.txt"),
                destination: p(&dir, "x"),
            },
        )
        .await;
    assert_eq!(missing.map_err(|e| e.code).err(), Some(Code::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_copies_files_across_filesystems() {
    require_root!();
    let dir = common::tempdir();
    let other = dir.path().join("other-fs");
    std::fs::create_dir(&other).expect("mkdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&other)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let fs = service();
    let root = common::root_user(dir.path());
    std::fs::write(dir.path().join("f.txt"), "across").expect("write");
    std::fs::create_dir(dir.path().join("d")).expect("mkdir");
    let moved = fs
        .move_entry(
            &root,
            MoveRequest {
                source: p(&dir, "f.txt"),
                destination: p(&dir, "other-fs/sub/f.txt"),
            },
        )
        .await
        .map_err(|e| e.code);
    let dir_move = fs
        .move_entry(
            &root,
            MoveRequest {
                source: p(&dir, "d"),
                destination: p(&dir, "other-fs/d"),
            },
        )
        .await
        .map_err(|e| e.code);
    let content = std::fs::read_to_string(other.join("sub/f.txt"));
    let _ = std::process::Command::new("umount").arg(&other).status();
    assert_eq!(moved.expect("moved").entry.expect("entry").size, 6);
    assert_eq!(content.expect("copied"), "across");
    assert!(!dir.path().join("f.txt").exists(), "source removed");
    assert_eq!(dir_move.err(), Some(Code::FailedPrecondition));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_dir_walks_to_depth_and_follows_a_symlinked_dir() {
    require_root!();
    let dir = common::tempdir();
    let fs = service();
    let root = common::root_user(dir.path());
    let base = dir.path().join("tree");
    std::fs::create_dir_all(base.join("a/b/c")).expect("mkdir");
    std::fs::write(base.join("f.txt"), "1").expect("write");
    std::fs::write(base.join("a/g.txt"), "22").expect("write");
    std::fs::write(base.join("a/b/c/deep.txt"), "333").expect("write");
    symlink(&base, dir.path().join("tree-link")).expect("symlink");
    // A symlink inside the tree to a directory outside is listed, not followed.
    symlink("/", base.join("to-root")).expect("symlink");

    let names = |entries: &[EntryInfo]| {
        entries
            .iter()
            .map(|e| {
                e.path
                    .strip_prefix(&format!("{}/", base.display()))
                    .unwrap_or(&e.path)
                    .to_string()
            })
            .collect::<Vec<_>>()
    };
    let one = list(&fs, &root, &p(&dir, "tree"), 0).await.expect("list");
    assert_eq!(names(&one), ["a", "f.txt", "to-root"]);
    let to_root = one.iter().find(|e| e.name == "to-root").expect("link");
    assert!(!to_root.is_symlink);
    assert_eq!(to_root.symlink_target.as_deref(), Some("/"));
    assert_eq!(to_root.r#type, FileType::Directory as i32);

    let two = list(&fs, &root, &p(&dir, "tree"), 2).await.expect("list");
    assert_eq!(
        names(&two),
        ["a", "a/b", "a/g.txt", "f.txt", "to-root"],
        "depth 2, depth-first"
    );
    let all = list(&fs, &root, &p(&dir, "tree"), 10).await.expect("list");
    assert!(names(&all).contains(&"a/b/c/deep.txt".to_string()));
    let g = all.iter().find(|e| e.name == "g.txt").expect("g");
    assert_eq!((g.size, g.r#type), (2, FileType::File as i32));

    let via_link = list(&fs, &root, &p(&dir, "tree-link"), 1)
        .await
        .expect("list link");
    assert_eq!(names(&via_link), ["a", "f.txt", "to-root"]);

    assert_eq!(
        list(&fs, &root, &p(&dir, "tree/f.txt"), 1).await,
        Err(Code::InvalidArgument)
    );
    assert_eq!(
        list(&fs, &root, &p(&dir, "missing"), 1).await,
        Err(Code::NotFound)
    );
    symlink(dir.path().join("loop2"), dir.path().join("loop1")).expect("symlink");
    symlink(dir.path().join("loop1"), dir.path().join("loop2")).expect("symlink");
    assert_eq!(
        list(&fs, &root, &p(&dir, "loop1"), 1).await,
        Err(Code::FailedPrecondition)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_is_recursive_never_follows_links_and_ignores_missing() {
    require_root!();
    let dir = common::tempdir();
    let fs = service();
    let root = common::root_user(dir.path());
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::write(outside.join("keep.txt"), "keep").expect("write");
    let victim = dir.path().join("victim");
    std::fs::create_dir_all(victim.join("x/y")).expect("mkdir");
    std::fs::write(victim.join("x/y/z.txt"), "z").expect("write");
    symlink(&outside, victim.join("x/link-out")).expect("symlink");
    mkfifo_in(&victim.join("fifo"));

    fs.remove(
        &root,
        RemoveRequest {
            path: p(&dir, "victim"),
        },
    )
    .await
    .expect("remove");
    assert!(!victim.exists());
    assert!(
        outside.join("keep.txt").exists(),
        "a symlink's target survives"
    );
    fs.remove(
        &root,
        RemoveRequest {
            path: p(&dir, "victim"),
        },
    )
    .await
    .expect("missing is fine");
    fs.remove(
        &root,
        RemoveRequest {
            path: p(&dir, "no/such/parent"),
        },
    )
    .await
    .expect("missing parent is fine");
    let root_dir = fs
        .remove(&root, RemoveRequest { path: "/".into() })
        .await
        .map_err(|e| e.code);
    assert_eq!(root_dir.err(), Some(Code::InvalidArgument));
}

fn mkfifo_in(path: &std::path::Path) {
    common::mkfifo(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn magic_links_are_refused() {
    require_root!();
    let dir = common::tempdir();
    let fs = service();
    let root = common::root_user(dir.path());
    for path in [
        "/proc/self/root/etc/passwd",
        "/proc/self/cwd",
        "/proc/1/root",
        "/proc/thread-self/root/etc",
    ] {
        assert_eq!(
            stat(&fs, &root, path).await,
            Err(Code::PermissionDenied),
            "{path}"
        );
    }
    assert_eq!(
        list(&fs, &root, "/proc/self/root", 1).await,
        Err(Code::PermissionDenied)
    );
    // An ordinary symlink to a system file is resolved as a normal path, with the caller's
    // permissions.
    symlink("/etc/passwd", dir.path().join("pw")).expect("symlink");
    let e = stat(&fs, &root, &p(&dir, "pw")).await.expect("stat");
    assert_eq!(e.symlink_target.as_deref(), Some("/etc/passwd"));
    assert_eq!(e.r#type, FileType::File as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_files_do_not_hang() {
    require_root!();
    let dir = common::tempdir();
    let fs = service();
    let root = common::root_user(dir.path());
    common::mkfifo(&dir.path().join("fifo"));
    let e = tokio::time::timeout(WAIT, stat(&fs, &root, &p(&dir, "fifo")))
        .await
        .expect("no hang")
        .expect("stat fifo");
    assert_eq!(e.r#type, FileType::Unspecified as i32);
    assert!(e.permissions.starts_with('p'));
    let entries = tokio::time::timeout(WAIT, list(&fs, &root, &p(&dir, ""), 1))
        .await
        .expect("no hang")
        .expect("list");
    assert!(entries.iter().any(|e| e.name == "fifo"));
    let dev = stat(&fs, &root, "/dev/null").await.expect("stat /dev/null");
    assert!(dev.permissions.starts_with("Dc"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_run_with_the_callers_permissions() {
    require_root!();
    let dir = common::tempdir();
    let fs = service();
    let root = common::root_user(dir.path());
    let user = common::plain_user(&dir.path().join("home"));
    let private = dir.path().join("private");
    std::fs::create_dir(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::fs::write(private.join("secret"), "s").expect("write");
    let secret = p(&dir, "private/secret");

    // The user cannot look into a root-only directory, remove root's files, or list it.
    assert_eq!(stat(&fs, &user, &secret).await, Err(Code::PermissionDenied));
    assert_eq!(
        list(&fs, &user, &p(&dir, "private"), 1).await,
        Err(Code::PermissionDenied)
    );
    std::fs::write(dir.path().join("rootfile"), "r").expect("write");
    let rm = fs
        .remove(
            &user,
            RemoveRequest {
                path: p(&dir, "rootfile"),
            },
        )
        .await;
    assert_eq!(rm.map_err(|e| e.code).err(), Some(Code::PermissionDenied));
    assert!(dir.path().join("rootfile").exists());

    // Many concurrent calls as both users: the blocking threads switch back and forth, and no
    // call sees the other user's credentials.
    let fs = std::sync::Arc::new(fs);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let fs = fs.clone();
        let (who, expect_ok) = if i % 2 == 0 {
            (root.clone(), true)
        } else {
            (user.clone(), false)
        };
        let secret = secret.clone();
        tasks.push(tokio::spawn(async move {
            let r = stat(&fs, &who, &secret).await;
            assert_eq!(r.is_ok(), expect_ok, "call {i} as {}: {r:?}", who.name);
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    // The user's own files work, and a file created through a symlink keeps the user's rights.
    symlink("/etc/shadow", dir.path().join("home/shadow-link")).expect("symlink");
    let e = stat(&fs, &user, "shadow-link")
        .await
        .expect("stat link as user");
    assert!(!e.is_symlink);
    assert_eq!(e.symlink_target.as_deref(), Some("/etc/shadow"));
    // Chains of relative links resolve fully, for the user as for root.
    let home = dir.path().join("home");
    std::fs::create_dir(home.join("real")).expect("mkdir");
    std::fs::write(home.join("real/in.txt"), "").expect("write");
    symlink("real", home.join("hop2")).expect("symlink");
    symlink("./x/../hop2", home.join("hop1")).expect("symlink");
    std::fs::create_dir(home.join("x")).expect("mkdir");
    let real = format!("{}/real", home.display());
    for who in [&user, &root] {
        let e = stat(&fs, who, &format!("{}/hop1", home.display()))
            .await
            .expect("stat chain");
        assert_eq!(
            e.symlink_target.as_deref(),
            Some(real.as_str()),
            "{}",
            who.name
        );
        let entries = list(&fs, who, &format!("{}/hop1", home.display()), 1)
            .await
            .expect("list chain");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].path, format!("{real}/in.txt"), "{}", who.name);
    }
}

async fn next_event(
    stream: &mut futures_util::stream::BoxStream<
        'static,
        Result<FilesystemEvent, moat_agent::rpc::RpcError>,
    >,
) -> FilesystemEvent {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("an event in time")
        .expect("stream open")
        .expect("event")
}

/// Reads events until one with `name` and `ty` arrives; returns it.
async fn wait_for(
    stream: &mut futures_util::stream::BoxStream<
        'static,
        Result<FilesystemEvent, moat_agent::rpc::RpcError>,
    >,
    name: &str,
    ty: EventType,
) -> FilesystemEvent {
    loop {
        let ev = next_event(stream).await;
        if ev.name == name && ev.r#type == ty as i32 {
            return ev;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_dir_streams_events() {
    require_root!();
    let dir = common::tempdir();
    let fs = service();
    let user = common::plain_user(&dir.path().join("home"));
    let mut stream = fs
        .watch_dir(
            &user,
            WatchDirRequest {
                path: "~".into(),
                recursive: false,
                include_entry: true,
                allow_network_mounts: false,
            },
        )
        .await
        .expect("watch");
    let home = dir.path().join("home");
    std::fs::write(home.join("f"), "x").expect("write");
    let created = wait_for(&mut stream, "f", EventType::Create).await;
    let entry = created.entry.expect("entry with includeEntry");
    assert_eq!(entry.path, format!("{}/f", home.display()));
    wait_for(&mut stream, "f", EventType::Write).await;
    std::fs::set_permissions(home.join("f"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    wait_for(&mut stream, "f", EventType::Chmod).await;
    std::fs::rename(home.join("f"), home.join("g")).expect("rename");
    let renamed = wait_for(&mut stream, "f", EventType::Rename).await;
    assert!(renamed.entry.is_none(), "no entry for RENAME");
    wait_for(&mut stream, "g", EventType::Create).await;
    std::fs::remove_file(home.join("g")).expect("remove");
    let removed = wait_for(&mut stream, "g", EventType::Remove).await;
    assert!(removed.entry.is_none(), "no entry for REMOVE");
    // Not recursive: a file in a new subdirectory is not reported, the directory is. Events
    // come in order, so every event before the later `after` is seen: none is the file's.
    std::fs::create_dir(home.join("sub")).expect("mkdir");
    wait_for(&mut stream, "sub", EventType::Create).await;
    std::fs::write(home.join("sub/inner"), "x").expect("write in sub");
    std::fs::write(home.join("after"), "x").expect("write after");
    loop {
        let ev = next_event(&mut stream).await;
        assert!(
            !ev.name.contains("inner"),
            "a non-recursive watch reported {ev:?}"
        );
        if ev.name == "after" && ev.r#type == EventType::Create as i32 {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recursive_watch_follows_new_subdirectories() {
    require_root!();
    let dir = common::tempdir();
    let fs = service();
    let root = common::root_user(dir.path());
    std::fs::create_dir_all(dir.path().join("w/existing")).expect("mkdir");
    let mut stream = fs
        .watch_dir(
            &root,
            WatchDirRequest {
                path: p(&dir, "w"),
                recursive: true,
                include_entry: false,
                allow_network_mounts: false,
            },
        )
        .await
        .expect("watch");
    std::fs::write(dir.path().join("w/existing/a"), "1").expect("write");
    let ev = wait_for(&mut stream, "existing/a", EventType::Create).await;
    assert!(ev.entry.is_none(), "no entry without includeEntry");
    std::fs::create_dir(dir.path().join("w/new")).expect("mkdir");
    // The watch on `new` is in place before its CREATE event is delivered.
    wait_for(&mut stream, "new", EventType::Create).await;
    std::fs::create_dir(dir.path().join("w/new/deeper")).expect("mkdir");
    wait_for(&mut stream, "new/deeper", EventType::Create).await;
    std::fs::write(dir.path().join("w/new/deeper/b"), "2").expect("write");
    wait_for(&mut stream, "new/deeper/b", EventType::Create).await;
    std::fs::remove_dir_all(dir.path().join("w/new")).expect("rm");
    wait_for(&mut stream, "new", EventType::Remove).await;
    // The watched directory going away ends the stream.
    std::fs::remove_dir_all(dir.path().join("w")).expect("rm");
    let end = tokio::time::timeout(WAIT, async {
        while let Some(ev) = stream.next().await {
            ev.expect("event");
        }
    })
    .await;
    assert!(end.is_ok(), "the stream ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_watchers_drain_and_are_removed() {
    require_root!();
    let dir = common::tempdir();
    let fs = service();
    let root = common::root_user(dir.path());
    let id = fs
        .create_watcher(
            &root,
            CreateWatcherRequest {
                path: p(&dir, ""),
                recursive: false,
                include_entry: false,
                allow_network_mounts: false,
            },
        )
        .await
        .expect("create")
        .watcher_id;
    assert!(!id.is_empty());
    std::fs::write(dir.path().join("one"), "1").expect("write");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen
        .iter()
        .any(|e: &FilesystemEvent| e.name == "one" && e.r#type == EventType::Write as i32)
    {
        assert!(tokio::time::Instant::now() < deadline, "events in time");
        let got = fs
            .get_watcher_events(
                &root,
                GetWatcherEventsRequest {
                    watcher_id: id.clone(),
                },
            )
            .await
            .expect("events")
            .events;
        seen.extend(got);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen.iter()
            .any(|e| e.name == "one" && e.r#type == EventType::Create as i32)
    );
    // Drained: nothing new happened since.
    let again = fs
        .get_watcher_events(
            &root,
            GetWatcherEventsRequest {
                watcher_id: id.clone(),
            },
        )
        .await
        .expect("events");
    assert!(again.events.is_empty(), "{:?}", again.events);
    fs.remove_watcher(
        &root,
        RemoveWatcherRequest {
            watcher_id: id.clone(),
        },
    )
    .await
    .expect("remove");
    let gone = fs
        .get_watcher_events(&root, GetWatcherEventsRequest { watcher_id: id })
        .await;
    assert_eq!(gone.map_err(|e| e.code).err(), Some(Code::NotFound));
    let unknown = fs
        .remove_watcher(
            &root,
            RemoveWatcherRequest {
                watcher_id: "nope".into(),
            },
        )
        .await;
    assert_eq!(unknown.map_err(|e| e.code).err(), Some(Code::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_rejects_missing_and_non_directories() {
    require_root!();
    let dir = common::tempdir();
    let fs = service();
    let root = common::root_user(dir.path());
    std::fs::write(dir.path().join("file"), "").expect("write");
    let req = |path: String| CreateWatcherRequest {
        path,
        recursive: true,
        include_entry: false,
        allow_network_mounts: false,
    };
    let missing = fs.create_watcher(&root, req(p(&dir, "missing"))).await;
    assert_eq!(missing.map_err(|e| e.code).err(), Some(Code::NotFound));
    let file = fs.create_watcher(&root, req(p(&dir, "file"))).await;
    assert_eq!(file.map_err(|e| e.code).err(), Some(Code::InvalidArgument));
    let stream = fs
        .watch_dir(
            &root,
            WatchDirRequest {
                path: p(&dir, "missing"),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(
        stream.map(drop).map_err(|e| e.code).err(),
        Some(Code::NotFound)
    );
    let magic = fs.create_watcher(&root, req("/proc/self/cwd".into())).await;
    assert_eq!(
        magic.map_err(|e| e.code).err(),
        Some(Code::PermissionDenied)
    );
}
