//! TLS: the API over HTTPS only (`--tls-cert`, `--tls-key`) and mutual TLS
//! between nodes (`--tls-ca`), with certificates made here by a test CA.

use std::path::{Path, PathBuf};
use std::time::Duration;

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

    // A TLS peer without a client certificate is refused on the RPC port.
    let ca_pem = std::fs::read(files.path().join("ca.pem")).unwrap();
    let before = c.metric(1, "cleave_rpc_handshakes_refused_total").await;
    assert!(!peer_without_client_certificate_is_served(&c.node(1).raft_addr(), &ca_pem).await);
    wait_for(secs(10), "the refusal to be counted", || async {
        (c.metric(1, "cleave_rpc_handshakes_refused_total").await > before).then_some(())
    })
    .await;

    // The client library with --ca-cert.
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

/// The certificate the API at `addr` presents (DER), to a client that
/// trusts the CA of `ca_pem`.
async fn served_certificate(addr: &str, ca_pem: &[u8]) -> Vec<u8> {
    let config = client_config(ca_pem);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Whether a TLS client that trusts the CA but presents no certificate of
/// its own gets any bytes back from `addr` (it must not: the RPC port
/// requires one).
async fn peer_without_client_certificate_is_served(addr: &str, ca_pem: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = client_config(ca_pem);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await else {
        return false; // refused during the handshake (TLS 1.2)
    };
    // TLS 1.3 reports the refusal after the handshake, on the next read.
    let _ = tls.write_all(b"CLV1").await;
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await, Ok(Ok(n)) if n > 0)
}

fn client_config(ca_pem: &[u8]) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_on_sighup() {
    let (c, files, ca) = tls_cluster().await;
    // New certificates from the same CA: served after SIGHUP.
    let ca_pem = std::fs::read(files.path().join("ca.pem")).unwrap();
    let before = served_certificate(&c.node(1).api_addr(), &ca_pem).await;
    assert_eq!(before, der_of(&std::fs::read_to_string(files.path().join("cert.pem")).unwrap()));
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
    for id in c.ids() {
        let now = served_certificate(&c.node(id).api_addr(), &ca_pem).await;
        assert_eq!(now, der_of(&cert), "node {id} serves the new certificate");
    }
    // A broken pair is not taken: the node keeps serving with the old one.
    std::fs::write(files.path().join("key.pem"), "not a key").unwrap();
    c.hangup(2);
    wait_for(secs(10), "node 2 to log the refused reload", || async {
        c.node(2).log_tail(40).contains("TLS certificates not reloaded").then_some(())
    })
    .await;
    let r = c.http.put(&c.api(2), "reload/k", &json!(2), None).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(served_certificate(&c.node(2).api_addr(), &ca_pem).await, der_of(&cert), "the last good one stays");
    c.assert_running();
}
