//! TLS: the API over HTTPS only (`--tls-cert`, `--tls-key`) and mutual TLS
//! between nodes (`--tls-ca`), with certificates made here by a test CA.

use std::path::{Path, PathBuf};

use cleave_tests::{free_ports, secs, wait_for, Cluster, ClusterOpts, ExtraNode, Http};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use serde_json::json;

/// A CA, and what it signs.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "CleaveDB test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A certificate for 127.0.0.1 and localhost, good as server and client.
    fn node_cert(&self) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "CleaveDB node");
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the CA certificate and a node certificate and key under
    /// `dir` with `prefix`; answers their paths (ca, cert, key).
    fn write(&self, dir: &Path, prefix: &str) -> (PathBuf, PathBuf, PathBuf) {
        let (cert, key) = self.node_cert();
        let paths = (
            dir.join(format!("{prefix}ca.pem")),
            dir.join(format!("{prefix}cert.pem")),
            dir.join(format!("{prefix}key.pem")),
        );
        std::fs::write(&paths.0, self.cert.pem()).unwrap();
        std::fs::write(&paths.1, cert).unwrap();
        std::fs::write(&paths.2, key).unwrap();
        paths
    }
}

fn tls_args(ca: &Path, cert: &Path, key: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
        "--tls-ca".into(),
        ca.display().to_string(),
    ]
}

async fn tls_cluster() -> (Cluster, tempfile::TempDir, Ca) {
    let files = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (ca_path, cert, key) = ca.write(files.path(), "");
    let opts = ClusterOpts {
        extra_args: tls_args(&ca_path, &cert, &key),
        https_ca: Some(std::fs::read(&ca_path).unwrap()),
        ..Default::default()
    };
    // Ready means elected leaders and linearizable reads on every node:
    // the Raft traffic between nodes went through mutual TLS.
    (Cluster::start(3, opts).await, files, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_speaks_https_only_and_the_nodes_mutual_tls() {
    let (c, files, _ca) = tls_cluster().await;
    for id in c.ids() {
        assert!(c.api(id).starts_with("https://"));
        let r = c.http.put(&c.api(id), &format!("tls/{id}"), &json!(id), None).await.unwrap();
        assert_eq!(r.status, 200, "write over HTTPS via node {id}: {r:?}");
    }
    let r = c.http.get(&c.api(3), "tls/1", None).await.unwrap();
    assert_eq!(r.item().value.get(), "1");

    // Plain HTTP to the TLS port gets no answer.
    let plain = format!("http://{}", c.node(1).api_addr());
    assert!(Http::new().health(&plain).await.is_err(), "plain HTTP must fail on an HTTPS port");
    // A client that does not trust the CA refuses the node.
    let other = Ca::new();
    let stranger_trust = Http::with_ca(other.cert.pem().as_bytes());
    assert!(stranger_trust.health(&c.api(1)).await.is_err(), "a certificate from an unknown CA must be refused");

    // The client library with --ca-cert.
    let ca_pem = std::fs::read(files.path().join("ca.pem")).unwrap();
    let endpoints: Vec<String> = c.ids().into_iter().map(|id| c.node(id).api_addr()).collect();
    let opts = cleave_client::ClientOptions::default().with_ca_cert(Some(ca_pem));
    let client = cleave_client::Client::with_options(&endpoints, opts).unwrap();
    client.put("tls/lib", &json!("ok"), None).await.expect("put over HTTPS");
    let item = client.get("tls/lib", cleave_client::Consistency::Linearizable).await.unwrap().expect("found");
    assert_eq!(item.value.get(), "\"ok\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_certificate_another_ca_signed_cannot_take_part() {
    let (c, files, _ca) = tls_cluster().await;
    // It trusts the cluster's CA (so its join over HTTPS goes through) but
    // presents a certificate of another CA on the RPC port.
    let other = Ca::new();
    let (_, cert, key) = other.write(files.path(), "other-");
    let ca_path = files.path().join("ca.pem");
    let ports = free_ports(2);
    let mut args: Vec<String> = vec![
        "--data-dir".into(),
        c.dir().join("stranger").display().to_string(),
        "--listen-api".into(),
        format!("127.0.0.1:{}", ports[0]),
        "--listen-raft".into(),
        format!("127.0.0.1:{}", ports[1]),
        "--join".into(),
        c.node(1).api_addr(),
    ];
    args.extend(tls_args(&ca_path, &cert, &key));
    let stranger = ExtraNode::start(&args, c.dir().join("stranger.log"));
    // Its RPC connections are refused by the cluster's nodes...
    wait_for(secs(30), "a node to refuse the stranger's RPC connection", || async {
        let mut refused = 0.0;
        for id in c.ids() {
            refused += c.metric(id, "cleave_rpc_handshakes_refused_total").await;
        }
        (refused > 0.0).then_some(())
    })
    .await;
    // ...and the cluster goes on serving.
    for id in c.ids() {
        let r = c.http.put(&c.api(id), &format!("after/{id}"), &json!(id), None).await.unwrap();
        assert_eq!(r.status, 200, "node {id}: {r:?}\nstranger:\n{}", stranger.log_tail(10));
    }
    c.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_on_sighup() {
    let (c, files, ca) = tls_cluster().await;
    // New certificates from the same CA: served after SIGHUP.
    let (cert, key) = ca.node_cert();
    std::fs::write(files.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(files.path().join("key.pem"), key).unwrap();
    for id in c.ids() {
        c.hangup(id);
    }
    wait_for(secs(10), "every node to log the reload", || async {
        c.ids().iter().all(|id| c.node(*id).log_tail(40).contains("TLS certificates reloaded")).then_some(())
    })
    .await;
    let r = c.http.put(&c.api(1), "reload/k", &json!(1), None).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    // A broken pair is not taken: the node keeps serving with the old one.
    std::fs::write(files.path().join("key.pem"), "not a key").unwrap();
    c.hangup(2);
    wait_for(secs(10), "node 2 to log the refused reload", || async {
        c.node(2).log_tail(40).contains("TLS certificates not reloaded").then_some(())
    })
    .await;
    let r = c.http.put(&c.api(2), "reload/k", &json!(2), None).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    c.assert_running();
}
