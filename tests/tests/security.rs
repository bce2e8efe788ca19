//! Authentication: bearer tokens with roles on the API (`--tokens-file`,
//! rotated by SIGHUP) and the cluster secret on the RPC port and for joins
//! (`--cluster-secret-file`). Every node of these clusters checks both.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cleave_tests::{free_ports, secs, wait_for, Cluster, ClusterOpts, ErrorCode, ExtraNode, Http};
use serde_json::json;

const READ: &str = "read-0123456789abcdef";
const WRITE: &str = "write-0123456789abcdef";
const ADMIN: &str = "admin-0123456789abcdef";
const SECRET: &str = "cluster-secret-0123456789abcdef";

fn tokens_file(tokens: &[(&str, &str, &str)]) -> String {
    tokens
        .iter()
        .map(|(name, secret, role)| format!("[[token]]\nname = {name:?}\nsecret = {secret:?}\nrole = {role:?}\n\n"))
        .collect()
}

/// Writes `text` to `dir/name`, readable by this user only.
fn private_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A 3-node cluster with tokens (read, write, admin) and a cluster secret;
/// the harness uses the admin token. The files live in the returned dir.
async fn secured() -> (Cluster, tempfile::TempDir, PathBuf) {
    let files = tempfile::tempdir().unwrap();
    let tokens = private_file(
        files.path(),
        "tokens.toml",
        &tokens_file(&[("r", READ, "read"), ("w", WRITE, "write"), ("a", ADMIN, "admin")]),
    );
    let secret = private_file(files.path(), "secret", SECRET);
    let opts = ClusterOpts {
        extra_args: vec![
            "--tokens-file".into(),
            tokens.display().to_string(),
            "--cluster-secret-file".into(),
            secret.display().to_string(),
        ],
        token: Some(ADMIN.into()),
        ..Default::default()
    };
    (Cluster::start(3, opts).await, files, tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_needs_a_token_whose_role_covers_it() {
    let (c, _files, _) = secured().await;
    let base = c.api(1);
    let none = c.http.with_token(None);
    let (read, write, admin) =
        (c.http.with_token(Some(READ)), c.http.with_token(Some(WRITE)), c.http.with_token(Some(ADMIN)));

    // Health is open to all.
    assert_eq!(none.health(&base).await.unwrap().status, 200);

    // No token, a wrong one, a malformed header: 401, and nothing written.
    let unauthenticated = |r: cleave_tests::Resp, what: &str| {
        assert_eq!(r.status, 401, "{what}: {r:?}");
        r.expect_error(401, ErrorCode::Unauthenticated);
    };
    unauthenticated(none.put(&base, "sec/k", &json!(1), None).await.unwrap(), "put without a token");
    unauthenticated(none.get(&base, "sec/k", None).await.unwrap(), "get without a token");
    unauthenticated(none.get_path(&base, "/nowhere").await.unwrap(), "an unknown path");
    unauthenticated(none.get_path(&base, "/metrics").await.unwrap(), "metrics");
    for header in ["Bearer wrong-token", "Basic cmVhZA==", "Bearer", READ, &format!("Bearer {READ}x")] {
        let r = c.http.with_authorization(header).put(&base, "sec/k", &json!(1), None).await.unwrap();
        unauthenticated(r, header);
    }
    // A huge header is refused, and the node goes on serving.
    let huge = format!("Bearer {}", "x".repeat(200_000));
    match c.http.with_authorization(&huge).get(&base, "sec/k", None).await {
        Ok(r) => assert!((400..500).contains(&r.status), "a huge header: {r:?}"),
        Err(e) => eprintln!("a huge header: the connection was closed ({e:#})"),
    }
    assert_eq!(read.get(&base, "sec/k", None).await.unwrap().status, 404, "never written");
    // Other methods and spellings of the same paths get nothing either.
    let url = |p: &str| Http::url(&base, p);
    for (method, path) in [
        (reqwest::Method::HEAD, "/v1/kv/sec/k"),
        (reqwest::Method::OPTIONS, "/v1/kv/sec/k"),
        (reqwest::Method::POST, "//admin/split"),
        (reqwest::Method::POST, "/%61dmin/split"),
        (reqwest::Method::GET, "/admin/nodes/join"),
        (reqwest::Method::POST, "/admin/nodes/join"),
        (reqwest::Method::GET, "/admin//shards"),
    ] {
        let r = none.send(method.clone(), url(path), Some("{}".into())).await.unwrap();
        assert_eq!(r.status, 401, "{method} {path} without a token: {r:?}");
        let r = read.send(method.clone(), url(path), Some(r#"{"key":"sec/m"}"#.into())).await.unwrap();
        assert!((400..500).contains(&r.status), "{method} {path} with a read token: {r:?}");
    }
    assert_eq!(c.http.admin_operations(&base).await.unwrap().len(), 0, "no split was started by any of them");

    // read: reads and scans, on any node; no writes, not even through
    // another node (the request is checked where it enters).
    for id in c.ids() {
        let r = read.put(&c.api(id), "sec/k", &json!(1), None).await.unwrap();
        assert_eq!(r.status, 403, "read token writing via node {id}: {r:?}");
        r.expect_error(403, ErrorCode::Forbidden);
        let r = read.delete(&c.api(id), "sec/k", None).await.unwrap();
        assert_eq!(r.status, 403, "read token deleting via node {id}: {r:?}");
    }
    assert_eq!(read.get_path(&base, "/v1/kv?start=a&limit=5").await.unwrap().status, 200);
    assert_eq!(read.get_path(&base, "/nowhere").await.unwrap().status, 404, "known callers learn it is not there");

    // write: writes, no admin.
    let w = write.put(&c.api(2), "sec/k", &json!(7), None).await.unwrap();
    assert_eq!(w.status, 200, "{w:?}");
    assert_eq!(read.get(&c.api(3), "sec/k", None).await.unwrap().item().value.get(), "7");
    for path in ["/admin/shards", "/admin/operations", "/metrics"] {
        let r = write.get_path(&base, path).await.unwrap();
        assert_eq!(r.status, 403, "write token on {path}: {r:?}");
    }
    let r = write.admin_split(&base, json!({"key": "sec/m"}).to_string()).await.unwrap();
    assert_eq!(r.status, 403, "write token splitting: {r:?}");
    assert_eq!(write.delete(&base, "sec/k", None).await.unwrap().status, 200);

    // admin: everything.
    assert_eq!(admin.get_path(&base, "/metrics").await.unwrap().status, 200);
    assert!(!admin.admin_shards(&base).await.unwrap().is_empty());
    assert_eq!(admin.put(&base, "sec/k2", &json!(2), None).await.unwrap().status, 200);
    let refused = c.metric(1, "cleave_http_auth_refused_total").await;
    assert!(refused > 0.0, "refusals are counted: {refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rotate_on_sighup_and_a_broken_file_keeps_the_old_ones() {
    let (c, _files, tokens) = secured().await;
    let base = c.api(2);
    let old = c.http.with_token(Some(WRITE));
    assert_eq!(old.put(&base, "rot/k", &json!(1), None).await.unwrap().status, 200);

    // Rotate: the write token is replaced by another.
    const NEW: &str = "write2-0123456789abcdef";
    std::fs::write(&tokens, tokens_file(&[("w2", NEW, "write"), ("a", ADMIN, "admin")])).unwrap();
    for id in c.ids() {
        c.hangup(id);
    }
    let new = c.http.with_token(Some(NEW));
    for id in c.ids() {
        let api = c.api(id);
        wait_for(secs(10), format_args!("node {id} to take the new tokens"), || async {
            let gone = old.get(&api, "rot/k", None).await.ok()?.status == 401;
            let works = new.get(&api, "rot/k", None).await.ok()?.status == 200;
            (gone && works).then_some(())
        })
        .await;
    }
    assert_eq!(new.put(&base, "rot/k", &json!(2), None).await.unwrap().status, 200);

    // A file that no longer parses is ignored with an error in the log.
    std::fs::write(&tokens, "[[token]]\nname = \"x\"\nsecret = \"s\"\nrole = \"root\"\n").unwrap();
    c.hangup(2);
    wait_for(secs(10), "node 2 to log the refused reload", || async {
        c.node(2).log_tail(50).contains("tokens file not reloaded").then_some(())
    })
    .await;
    assert_eq!(new.put(&base, "rot/k", &json!(3), None).await.unwrap().status, 200, "the tokens in force stay");
    assert_eq!(old.get(&base, "rot/k", None).await.unwrap().status, 401);
    c.assert_running();
}

/// Sends `bytes` to `addr` and waits for the peer to close the connection.
fn closed_after(addr: &str, bytes: &[u8]) -> bool {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // the listener's half of the handshake
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false, // still open after the timeout
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_on_the_rpc_port_is_disconnected_and_the_node_keeps_serving() {
    let (c, _files, _) = secured().await;
    let rpc = c.node(1).raft_addr();
    // A frame as a node without the secret would send it, plain garbage, an
    // HTTP request, and a handshake answered with a made-up tag.
    let mut frame = 20u32.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0u8; 20]);
    let mut fake = b"CLV1".to_vec();
    fake.extend_from_slice(&[7u8; 32]);
    fake.extend_from_slice(&[9u8; 32]);
    for (what, bytes) in [
        ("a bare frame", frame),
        ("garbage", vec![0xff; 4096]),
        ("an HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("a forged handshake", fake),
    ] {
        let addr = rpc.clone();
        let closed = tokio::task::spawn_blocking(move || closed_after(&addr, &bytes)).await.unwrap();
        assert!(closed, "{what}: the connection must be closed");
    }
    let refused = c.metric(1, "cleave_rpc_handshakes_refused_total").await;
    assert!(refused >= 4.0, "refused handshakes are counted: {refused}");
    // The node still serves, through its own RPC to the others.
    for id in c.ids() {
        let r = c.http.put(&c.api(id), &format!("after/{id}"), &json!(id), None).await.unwrap();
        assert_eq!(r.status, 200, "node {id} after the strangers: {r:?}");
    }
    c.assert_running();
}

fn joiner_args(c: &Cluster, data: &Path, secret: &Path) -> (Vec<String>, String) {
    let ports = free_ports(2);
    let api = format!("127.0.0.1:{}", ports[0]);
    let args = vec![
        "--data-dir".into(),
        data.display().to_string(),
        "--listen-api".into(),
        api.clone(),
        "--listen-raft".into(),
        format!("127.0.0.1:{}", ports[1]),
        "--join".into(),
        c.node(1).api_addr(),
        "--cluster-secret-file".into(),
        secret.display().to_string(),
    ];
    (args, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_node_with_the_cluster_secret_can_join() {
    let (c, files, tokens) = secured().await;
    let nodes_before = c.http.admin_nodes(&c.api(1)).await.unwrap().len();

    // Another secret: the join is refused and the node stops.
    let wrong = private_file(files.path(), "wrong", "another-secret-0123456789");
    let (args, _) = joiner_args(&c, &c.dir().join("stranger"), &wrong);
    let mut stranger = ExtraNode::start(&args, c.dir().join("stranger.log"));
    let status = stranger.wait_exit(secs(30)).await;
    assert!(status.is_some_and(|s| !s.success()), "the stranger must give up: {}", stranger.log_tail(20));
    assert!(stranger.log_tail(500).contains("cluster secret"), "a clear reason: {}", stranger.log_tail(20));
    assert_eq!(c.http.admin_nodes(&c.api(1)).await.unwrap().len(), nodes_before, "not registered");

    // The right secret: it joins, talks RPC with the others, and serves.
    let secret = files.path().join("secret");
    let (mut args, api) = joiner_args(&c, &c.dir().join("joiner"), &secret);
    args.extend(["--tokens-file".into(), tokens.display().to_string()]);
    let joiner = ExtraNode::start(&args, c.dir().join("joiner.log"));
    let base = format!("http://{api}");
    let write = c.http.with_token(Some(WRITE));
    let r = wait_for(secs(30), "the joined node to serve a write", || async {
        let r = write.put(&base, "joined/k", &json!("ok"), None).await.ok()?;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(r.status, 200, "{}", joiner.log_tail(20));
    assert_eq!(c.http.admin_nodes(&c.api(1)).await.unwrap().len(), nodes_before + 1);
    // It checks tokens too.
    assert_eq!(c.http.with_token(None).get(&base, "joined/k", None).await.unwrap().status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_or_broken_security_files_stop_the_node_at_start() {
    let files = tempfile::tempdir().unwrap();
    let open_secret = files.path().join("open-secret");
    std::fs::write(&open_secret, SECRET).unwrap();
    std::fs::set_permissions(&open_secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dup = private_file(files.path(), "dup.toml", &tokens_file(&[("a", READ, "read"), ("b", READ, "admin")]));
    let role = private_file(files.path(), "role.toml", &tokens_file(&[("a", READ, "root")]));
    let garbage = private_file(files.path(), "garbage.toml", "\u{0}\u{1}not toml [[");
    let cases = [
        (vec!["--cluster-secret-file".to_string(), open_secret.display().to_string()], "chmod 600"),
        (vec!["--tokens-file".into(), dup.display().to_string()], "same secret"),
        (vec!["--tokens-file".into(), role.display().to_string()], "unknown variant"),
        (vec!["--tokens-file".into(), garbage.display().to_string()], "does not parse"),
        (vec!["--tokens-file".into(), files.path().join("missing").display().to_string()], "reading the tokens file"),
    ];
    for (i, (flags, why)) in cases.into_iter().enumerate() {
        let ports = free_ports(2);
        let mut args: Vec<String> = vec![
            "--id".into(),
            "1".into(),
            "--data-dir".into(),
            files.path().join(format!("d{i}")).display().to_string(),
            "--listen-api".into(),
            format!("127.0.0.1:{}", ports[0]),
            "--listen-raft".into(),
            format!("127.0.0.1:{}", ports[1]),
            "--initial-cluster".into(),
            format!("1=127.0.0.1:{}", ports[1]),
        ];
        args.extend(flags);
        let mut node = ExtraNode::start(&args, files.path().join(format!("n{i}.log")));
        let status = node.wait_exit(secs(20)).await;
        assert!(status.is_some_and(|s| !s.success()), "the node must refuse {why:?}: {}", node.log_tail(10));
        assert!(node.log_tail(500).contains(why), "expected {why:?} in:\n{}", node.log_tail(500));
        assert!(Http::new().health(&format!("http://127.0.0.1:{}", ports[0])).await.is_err(), "never served");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_library_sends_its_token() {
    let (c, _files, _) = secured().await;
    let opts = |t: Option<&str>| cleave_client::ClientOptions::default().with_token(t.map(str::to_string));
    let client = cleave_client::Client::with_options(c.apis(), opts(Some(WRITE))).unwrap();
    client.put("lib/k", &json!(1), None).await.expect("put with a write token");
    let anon = cleave_client::Client::with_options(c.apis(), opts(None)).unwrap();
    let err = anon.get("lib/k", cleave_client::Consistency::Linearizable).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(401), Some(ErrorCode::Unauthenticated)), "{err}");
    let reader = cleave_client::Client::with_options(c.apis(), opts(Some(READ))).unwrap();
    let err = reader.put("lib/k", &json!(2), None).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(403), Some(ErrorCode::Forbidden)), "{err}");
}
