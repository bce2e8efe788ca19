//! A node added to a running cluster with `--join` gets an id, shows up in
//! the directory with its addresses, serves the API (forwarding to leaders),
//! and restarts from its data directory alone.

use cleave_tests::{free_ports, secs, wait_for, Cluster, ClusterOpts, ExtraNode, Liveness};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_with_join_and_restarts_from_its_data() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let ports = free_ports(2);
    let (api, raft) = (format!("127.0.0.1:{}", ports[0]), format!("127.0.0.1:{}", ports[1]));
    let data = c.dir().join("joiner");
    let args: Vec<String> = vec![
        "--data-dir".into(),
        data.display().to_string(),
        "--listen-api".into(),
        api.clone(),
        "--listen-raft".into(),
        raft.clone(),
        "--join".into(),
        c.node(2).api_addr(),
    ];
    let log = c.dir().join("joiner.log");
    let joiner = ExtraNode::start(&args, log.clone());
    let base = format!("http://{api}");

    // It is registered under a new id, with both addresses, and is live.
    let me = wait_for(secs(30), "the joined node to be listed as live with its API address", || async {
        let nodes = c.http.admin_nodes(&c.api(1)).await.ok()?;
        nodes
            .into_iter()
            .find(|n| n.raft_addr == raft && n.api_addr.as_deref() == Some(api.as_str()) && n.liveness == Liveness::Up)
    })
    .await;
    assert_eq!(me.id, 4, "the next free id is allocated: {me:?}\n{}", joiner.log_tail(20));
    assert_eq!(me.replicas, 0, "a joined node hosts nothing until replicas are moved to it");

    // It serves reads and writes by forwarding to the shard leader.
    let r = c.http.put(&base, "joined/k", &json!({"via": "joiner"}), None).await.expect("PUT");
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.write_result().version;
    let got = c.http.get(&c.api(3), "joined/k", None).await.expect("GET");
    assert_eq!(got.item().version, v);
    let back = c.http.get(&base, "joined/k", None).await.expect("GET via joiner");
    assert_eq!(back.item().version, v);

    // Restarted from its data directory alone (no --join), it keeps its id.
    drop(joiner);
    let args: Vec<String> = args[..6].to_vec();
    let again = ExtraNode::start(&args, log);
    let health = wait_for(secs(30), "the restarted node to answer /health", || async {
        let r = c.http.health(&base).await.ok()?;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(health.value()["node_id"], json!(4), "{}", again.log_tail(20));
    let read = c.http.get(&base, "joined/k", None).await.expect("GET after restart");
    assert_eq!(read.item().version, v);

    // A node cannot take an address another node already has.
    let clash = c
        .http
        .send(
            reqwest::Method::POST,
            cleave_tests::Http::url(&c.api(1), "/admin/nodes/join"),
            Some(json!({"raft_addr": c.node(1).raft_addr(), "api_addr": "127.0.0.1:1"}).to_string()),
        )
        .await
        .expect("POST join");
    assert!((400..500).contains(&clash.status), "{clash:?}");
    assert!(!clash.error().error.message.is_empty());
}
