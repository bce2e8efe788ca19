//! Range scans: byte order, pagination with `next`, bounds, limits.

use std::collections::BTreeMap;
use std::sync::Arc;

use cleave_tests::{value_of, Cluster, ClusterOpts, ErrorCode, ScanResult};
use serde_json::{json, Value};

const KEYS: usize = 1200;

/// Key prefixes chosen so that byte order differs from naive orders (case,
/// multi-byte UTF-8, characters that need percent-encoding).
const PREFIXES: [&str; 8] = ["", "A", "a/", "a ", "é", "~%", "😀", "中"];

fn key(i: usize) -> String {
    format!("{}{:03x}", PREFIXES[i % PREFIXES.len()], i)
}

fn value(i: usize) -> Value {
    json!({"i": i, "pad": "x".repeat(i % 50)})
}

/// Writes KEYS keys concurrently through every node; returns key → value.
async fn write_keys(c: &Cluster) -> BTreeMap<String, Value> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for w in 0..16usize {
        let (http, next) = (c.http.clone(), next.clone());
        let api = c.api(c.ids()[w % c.ids().len()]);
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= KEYS {
                    break;
                }
                let r =
                    http.put(&api, &key(i), &value(i), None).await.unwrap_or_else(|e| panic!("PUT {}: {e:#}", key(i)));
                assert_eq!(r.write_result().version, 1, "{r:?}");
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("writer task panicked");
    }
    (0..KEYS).map(|i| (key(i), value(i))).collect()
}

/// Asserts `items` are exactly the `expected` entries, in byte order.
fn assert_exact(what: &str, items: &[cleave_tests::Item], expected: &[(&String, &Value)]) {
    for pair in items.windows(2) {
        assert!(
            pair[0].key.as_bytes() < pair[1].key.as_bytes(),
            "{what}: {:?} before {:?}: not in strict byte order",
            pair[0].key,
            pair[1].key
        );
    }
    let got: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
    let want: Vec<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    if got != want {
        let missing: Vec<_> = want.iter().filter(|k| !got.contains(k)).take(10).collect();
        let extra: Vec<_> = got.iter().filter(|k| !want.contains(k)).take(10).collect();
        panic!(
            "{what}: got {} keys, expected {}; missing (first 10) {missing:?}, unexpected {extra:?}",
            got.len(),
            want.len()
        );
    }
    for (item, (_, v)) in items.iter().zip(expected) {
        assert_eq!(&value_of(item), *v, "{what}: value of {:?}", item.key);
        assert_eq!(item.version, 1, "{what}: version of {:?}", item.key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paginated_scans_return_every_key_once_in_byte_order() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let expected = write_keys(&c).await;
    let all: Vec<(&String, &Value)> = expected.iter().collect();

    // Whole key space, small pages, through every node.
    for (id, limit) in [(1, 7), (2, 50), (3, 1000)] {
        let items = c.http.scan_all(&c.api(id), None, None, limit).await;
        assert_exact(&format!("full scan via node {id}, limit {limit}"), &items, &all);
    }

    // Bounds: [start, end) exactly, with start and end both existing keys,
    // keys that do not exist, and the edges of the key space.
    let keys: Vec<&String> = expected.keys().collect();
    let bounds: Vec<(Option<String>, Option<String>)> = vec![
        (Some(keys[100].clone()), Some(keys[350].clone())),
        (Some(format!("{}\u{0}", keys[100])), Some(format!("{}\u{0}", keys[350]))),
        (Some("a".into()), Some("b".into())),
        (Some("é".into()), None),
        (None, Some("a/".into())),
        (Some(keys[500].clone()), Some(keys[500].clone())),
        (Some(keys[501].clone()), Some(keys[500].clone())),
        (Some("\u{10FFFF}".into()), None),
    ];
    for (start, end) in &bounds {
        let want: Vec<(&String, &Value)> = expected
            .iter()
            .filter(|(k, _)| start.as_ref().is_none_or(|s| *k >= s) && end.as_ref().is_none_or(|e| *k < e))
            .collect();
        let what = format!("scan [{start:?}, {end:?})");
        let r = c.http.scan(&c.api(2), start.as_deref(), end.as_deref(), Some("9")).await.expect("scan");
        if r.status != 200 {
            // An inverted range may be refused, but only as bad input.
            assert!(start > end && end.is_some(), "{what}: {r:?}");
            r.expect_error(400, ErrorCode::BadRequest);
            continue;
        }
        let items = c.http.scan_all(&c.api(2), start.as_deref(), end.as_deref(), 9).await;
        assert_exact(&what, &items, &want);
    }

    // Default limit is 100, and the maximum (1000) is allowed; a full page
    // with more to come carries `next`.
    let r = c.http.scan(&c.api(1), None, None, None).await.expect("scan");
    let page: ScanResult = r.json();
    assert_eq!(page.items.len(), 100, "default page size");
    assert!(page.next.is_some(), "more keys follow the first default page");
    assert_exact("first default page", &page.items, &all[..100]);
    let r = c.http.scan(&c.api(1), None, None, Some("1000")).await.expect("scan");
    let page: ScanResult = r.json();
    assert_eq!(page.items.len(), 1000, "limit=1000");
    assert_exact("first page of 1000", &page.items, &all[..1000]);
    let rest = c.http.scan_all(&c.api(1), page.next.as_deref(), None, 1000).await;
    assert_exact("rest after a page of 1000", &rest, &all[1000..]);

    // Deleted keys disappear from scans; overwritten ones show the new value.
    let api = c.api(3);
    c.http.delete(&api, keys[10], None).await.expect("DELETE").write_result();
    let r = c.http.put(&api, keys[11], &json!("new"), None).await.expect("PUT");
    assert_eq!(r.write_result().version, 2);
    let items = c.http.scan_all(&c.api(1), Some(keys[9].as_str()), Some(keys[12].as_str()), 2).await;
    let got: Vec<(&str, Value, u64)> = items.iter().map(|i| (i.key.as_str(), value_of(i), i.version)).collect();
    assert_eq!(got, vec![(keys[9].as_str(), value(idx(keys[9])), 1), (keys[11].as_str(), json!("new"), 2)]);
}

/// The index `i` with `key(i) == k`.
fn idx(k: &str) -> usize {
    (0..KEYS).find(|&i| key(i) == k).expect("a written key")
}

/// The longest key the API accepts.
const MAX_KEY: usize = 4096;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_continues_past_a_key_of_the_maximum_length() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    let api = c.api(c.ids()[0]);
    let longest = "m".repeat(MAX_KEY);
    let keys = ["a".to_string(), longest.clone(), "n".to_string(), "z".to_string()];
    for (i, k) in keys.iter().enumerate() {
        let r = c.http.put(&api, k, &json!(i), None).await.expect("PUT");
        assert_eq!(r.write_result().version, 1, "{r:?}");
    }

    // A page that ends on the 4 KiB key: its `next` is that key + "\0",
    // one byte longer than any key, and following it must work.
    let r = c.http.scan(&api, None, None, Some("2")).await.expect("scan");
    let page: ScanResult = r.json();
    let got: Vec<&str> = page.items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(got, [keys[0].as_str(), keys[1].as_str()]);
    let next = page.next.expect("more keys follow");
    assert_eq!(next.len(), MAX_KEY + 1);
    let r = c.http.scan(&api, Some(&next), None, Some("2")).await.expect("scan");
    assert_eq!(r.status, 200, "following `next` after a {MAX_KEY}-byte key: {r:?}");
    let rest: ScanResult = r.json();
    let got: Vec<&str> = rest.items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(got, ["n", "z"]);

    // The whole scan, page by page, raw and through the Rust client.
    let all: Vec<String> = c.http.scan_all(&api, None, None, 2).await.into_iter().map(|i| i.key).collect();
    assert_eq!(all, keys);
    let client = cleave_client::Client::new([&api]).expect("client");
    let mut cursor = String::new();
    let mut seen = Vec::new();
    loop {
        let page = client.scan(&cursor, None, Some(2)).await.expect("client scan page");
        seen.extend(page.items.into_iter().map(|i| i.key));
        match page.next {
            Some(n) => cursor = n,
            None => break,
        }
    }
    assert_eq!(seen, keys);
    let all: Vec<String> = client.scan_all("", None).await.expect("scan_all").into_iter().map(|i| i.key).collect();
    assert_eq!(all, keys);

    // Longer than that is still refused.
    let too_long = "m".repeat(MAX_KEY + 2);
    let r = c.http.scan(&api, Some(&too_long), None, None).await.expect("scan");
    r.expect_error(413, ErrorCode::TooLarge);
}
