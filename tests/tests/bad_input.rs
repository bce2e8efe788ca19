//! Bad input gets an honest 4xx with a JSON error body, and never harms the
//! node; size limits are exact; odd keys and any JSON value round-trip.

use cleave_tests::{secs, value_of, Cluster, ClusterOpts, ErrorCode, Http, ScanResult};
use reqwest::Method;
use serde_json::json;

const MAX_KEY: usize = 4096;
const MAX_VALUE: usize = 1024 * 1024;

/// (what, method, url, body, expected status: `Some(exact)` or `None` = any 4xx).
type Case = (&'static str, Method, reqwest::Url, Option<String>, Option<u16>);

/// A JSON string value whose JSON text is exactly `len` bytes.
fn string_value_text(len: usize) -> String {
    format!("\"{}\"", "x".repeat(len - 2))
}

/// A normal write and read still work on the node.
async fn assert_still_serves(c: &Cluster, n: usize, after: &str) {
    let key = format!("ok/{n:03}");
    let value = json!({"after": after});
    let r = c.http.put(&c.api(1), &key, &value, None).await.unwrap_or_else(|e| panic!("PUT after {after}: {e:#}"));
    assert_eq!(r.status, 200, "normal PUT after {after}: {r:?}");
    assert_eq!(r.write_result().version, 1);
    let item = c.read_retry(1, &key, None, secs(5)).await.item();
    assert_eq!(value_of(&item), value, "normal GET after {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_4xx_and_the_node_keeps_serving() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    let api = c.api(1);
    let long_key = "k".repeat(MAX_KEY + 1);
    let value_too_big = format!("{{\"value\": {}}}", string_value_text(MAX_VALUE + 1));
    let body_too_big = format!("{{\"value\": {}}}", string_value_text(3 * MAX_VALUE));

    let cases: Vec<Case> = vec![
        ("PUT key of 4097 bytes", Method::PUT, Http::kv_url(&api, &long_key), Some(r#"{"value":1}"#.into()), Some(413)),
        ("GET key of 4097 bytes", Method::GET, Http::kv_url(&api, &long_key), None, None),
        ("DELETE key of 4097 bytes", Method::DELETE, Http::kv_url(&api, &long_key), None, None),
        ("PUT value of 1 MiB + 1", Method::PUT, Http::kv_url(&api, "big"), Some(value_too_big), Some(413)),
        ("PUT body of 3 MiB", Method::PUT, Http::kv_url(&api, "big"), Some(body_too_big), Some(413)),
        ("PUT truncated JSON", Method::PUT, Http::kv_url(&api, "k"), Some(r#"{"value": "#.into()), Some(400)),
        ("PUT non-JSON body", Method::PUT, Http::kv_url(&api, "k"), Some("hello world".into()), Some(400)),
        ("PUT empty body", Method::PUT, Http::kv_url(&api, "k"), Some(String::new()), Some(400)),
        ("PUT body without value", Method::PUT, Http::kv_url(&api, "k"), Some("{}".into()), Some(400)),
        ("PUT only if_version", Method::PUT, Http::kv_url(&api, "k"), Some(r#"{"if_version":1}"#.into()), Some(400)),
        (
            "PUT if_version a string",
            Method::PUT,
            Http::kv_url(&api, "k"),
            Some(r#"{"value":1,"if_version":"one"}"#.into()),
            Some(400),
        ),
        (
            "PUT negative if_version",
            Method::PUT,
            Http::kv_url(&api, "k"),
            Some(r#"{"value":1,"if_version":-1}"#.into()),
            Some(400),
        ),
        (
            "PUT unknown field",
            Method::PUT,
            Http::kv_url(&api, "k"),
            Some(r#"{"value":1,"iff_version":0}"#.into()),
            Some(400),
        ),
        ("PUT empty key", Method::PUT, Http::url(&api, "/v1/kv/"), Some(r#"{"value":1}"#.into()), Some(400)),
        ("GET unknown consistency", Method::GET, Http::url(&api, "/v1/kv/k?consistency=eventual"), None, Some(400)),
        ("GET empty consistency", Method::GET, Http::url(&api, "/v1/kv/k?consistency="), None, Some(400)),
        ("DELETE if_version=abc", Method::DELETE, Http::url(&api, "/v1/kv/k?if_version=abc"), None, Some(400)),
        ("scan limit=0", Method::GET, Http::url(&api, "/v1/kv?limit=0"), None, Some(400)),
        ("scan limit=abc", Method::GET, Http::url(&api, "/v1/kv?limit=abc"), None, Some(400)),
        ("scan limit=100000", Method::GET, Http::url(&api, "/v1/kv?limit=100000"), None, Some(400)),
        ("scan limit=-1", Method::GET, Http::url(&api, "/v1/kv?limit=-1"), None, Some(400)),
        ("PUT body an array", Method::PUT, Http::kv_url(&api, "k"), Some("[1,2]".into()), Some(400)),
    ];

    for (n, (what, method, url, body, expected)) in cases.into_iter().enumerate() {
        // Each case on a fresh connection: a node that refuses a body without
        // reading it closes the connection, which must not fail the next case.
        let mut attempt = 0;
        let r = loop {
            attempt += 1;
            match Http::new().send(method.clone(), url.clone(), body.clone()).await {
                Ok(r) => break r,
                // Refused before it was read, a large body may still be in
                // flight when the node closes the connection, and the 413 is
                // lost to the reset. Allowed a few times, not always.
                Err(e) if body.as_ref().is_some_and(|b| b.len() > 2 * MAX_VALUE) && attempt < 5 => {
                    eprintln!("{what}: attempt {attempt}: no answer ({e:#}); trying again");
                }
                Err(e) => panic!("{what}: no answer: {e:#}"),
            }
        };
        match expected {
            Some(status) => assert_eq!(r.status, status, "{what}: {r:?}"),
            None => assert!((400..500).contains(&r.status), "{what}: expected a 4xx, got {r:?}"),
        }
        let e = r.error(); // JSON, code matches status, message non-empty
        assert!(
            matches!(e.error.code, ErrorCode::BadRequest | ErrorCode::TooLarge | ErrorCode::NotFound),
            "{what}: code {:?}",
            e.error.code
        );
        assert_still_serves(&c, n, what).await;
    }

    // None of the refused writes left anything behind.
    for key in ["big", "k"] {
        c.read_retry(1, key, None, secs(5)).await.expect_error(404, ErrorCode::NotFound);
    }
    let scan: ScanResult = c.http.scan(&api, None, Some("ok/"), None).await.expect("scan").json();
    assert!(scan.items.is_empty(), "refused writes left keys behind: {:?}", scan.items);

    // Absent keys: 404 not_found for GET (both consistencies) and DELETE.
    c.read_retry(1, "missing", Some("linearizable"), secs(5)).await.expect_error(404, ErrorCode::NotFound);
    c.read_retry(1, "missing", Some("stale"), secs(5)).await.expect_error(404, ErrorCode::NotFound);
    c.http.delete(&api, "missing", None).await.expect("DELETE").expect_error(404, ErrorCode::NotFound);
    assert_still_serves(&c, 999, "the 404s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limits_are_exact_and_odd_keys_and_values_round_trip() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    let api = c.api(1);

    // Keys: 4096 bytes is fine, 4097 is not; bytes are counted, not chars.
    let ascii_max = "a".repeat(MAX_KEY);
    let utf8_max = "é".repeat(MAX_KEY / 2);
    let utf8_over = format!("{utf8_max}a");
    for key in [&ascii_max, &utf8_max] {
        let r = c.http.put(&api, key, &json!(key.len()), None).await.expect("PUT");
        assert_eq!(r.write_result().key, *key, "a key of exactly {MAX_KEY} bytes is accepted");
        let item = c.read_retry(1, key, None, secs(5)).await.item();
        assert_eq!((item.key.as_str(), value_of(&item)), (key.as_str(), json!(MAX_KEY)));
    }
    let r = c.http.put(&api, &utf8_over, &json!(1), None).await.expect("PUT");
    r.expect_error(413, ErrorCode::TooLarge);

    // Values: exactly 1 MiB of JSON text is accepted and comes back whole.
    let text = string_value_text(MAX_VALUE);
    let r = c.http.put_raw(&api, "max-value", format!("{{\"value\":{text}}}")).await.expect("PUT");
    assert_eq!(r.write_result().version, 1, "a value of exactly 1 MiB of JSON text is accepted");
    let item = c.read_retry(1, "max-value", None, secs(10)).await.item();
    assert_eq!(item.value.get(), text, "the 1 MiB value comes back whole");
    let r = c.http.put_raw(&api, "max-value", format!("{{\"value\":{}}}", string_value_text(MAX_VALUE + 1))).await;
    r.expect("PUT").expect_error(413, ErrorCode::TooLarge);
    assert_eq!(c.read_retry(1, "max-value", None, secs(5)).await.item().version, 1, "refused write changed the key");

    // Keys that need percent-encoding in the path round-trip exactly.
    let odd_keys = [
        "a/b/c",
        "with space",
        "percent%20literal",
        "question?x=1&y=2",
        "hash#fragment",
        "plus+sign",
        "back\\slash",
        "line\nbreak",
        "ünïcødé 😀 中文",
        "'quotes\"",
        "~tilde",
    ];
    for (i, key) in odd_keys.iter().enumerate() {
        let r = c.http.put(&api, key, &json!({"i": i}), None).await.expect("PUT");
        assert_eq!(r.write_result().key, *key, "write answer names the key as sent");
        let item = c.read_retry(1, key, None, secs(5)).await.item();
        assert_eq!((item.key.as_str(), value_of(&item), item.version), (*key, json!({"i": i}), 1));
    }
    let scanned: Vec<String> = c.http.scan_all(&api, None, None, 1000).await.into_iter().map(|i| i.key).collect();
    for key in odd_keys {
        assert_eq!(scanned.iter().filter(|k| k.as_str() == key).count(), 1, "{key:?} in a scan exactly once");
    }

    // Any JSON value round-trips, including numbers beyond 64 bits.
    let values = [
        "null",
        "true",
        "-0.5e-3",
        "\"\"",
        "\"esc \\\" \\\\ \\n \\u00e9\"",
        "[]",
        "[1,[2,[3,{}]]]",
        "{\"nested\":{\"a\":[null,false,\"x\"]}}",
        "123456789012345678901234567890",
    ];
    for (i, text) in values.iter().enumerate() {
        let key = format!("value/{i}");
        let r = c.http.put_raw(&api, &key, format!("{{\"value\":{text}}}")).await.expect("PUT");
        assert_eq!(r.status, 200, "value {text}: {r:?}");
        let item = c.read_retry(1, &key, None, secs(5)).await.item();
        let sent: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(value_of(&item), sent, "value {text} came back as {}", item.value.get());
        if i == values.len() - 1 {
            assert_eq!(item.value.get().trim(), *text, "a big integer must come back digit for digit");
        }
    }
}
