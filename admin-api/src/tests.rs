//! Router tests against a fake service (the daemon's real service is exercised by the
//! integration tests in the cairn package).

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use axum::{
    body::Body,
    http::{Request, StatusCode, header},
};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::{AdminService, ComponentHealth, Health, StoreMetrics, VersionInfo, router};

#[derive(Default)]
struct Fake {
    catalog_broken: AtomicBool,
    reads: AtomicU64,
}

#[async_trait::async_trait]
impl AdminService for Fake {
    async fn health(&self) -> Health {
        let catalog = if self.catalog_broken.load(Ordering::SeqCst) {
            ComponentHealth::failed("catalog", "database is locked")
        } else {
            ComponentHealth::ok("catalog")
        };
        Health {
            components: vec![ComponentHealth::ok("store"), catalog],
        }
    }
    fn version(&self) -> VersionInfo {
        VersionInfo {
            name: "cairn".into(),
            version: "9.9.9".into(),
            git_commit: None,
            store_format_version: 7,
            catalog_schema_version: 3,
        }
    }
    fn store_metrics(&self) -> StoreMetrics {
        StoreMetrics {
            objects: 2,
            free_bytes: u64::MAX,
            reads: self.reads.load(Ordering::SeqCst),
            ..StoreMetrics::default()
        }
    }
}

async fn call(app: &axum::Router, method: &str, uri: &str) -> (StatusCode, String, String) {
    let resp = app
        .clone()
        .oneshot(
            Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    let status = resp.status();
    let ctype = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        ctype,
        String::from_utf8(body.to_vec()).expect("utf8"),
    )
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[tokio::test]
async fn healthz_reflects_component_health() {
    let fake = Arc::new(Fake::default());
    let app = router(fake.clone());

    let (status, ctype, body) = call(&app, "GET", "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let v = json(&body);
    assert_eq!(v["status"], "ok");
    assert_eq!(v["checks"]["catalog"], "ok");

    fake.catalog_broken.store(true, Ordering::SeqCst);
    let (status, _, body) = call(&app, "GET", "/healthz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let v = json(&body);
    assert_eq!(v["status"], "unavailable");
    assert_eq!(v["checks"]["catalog"], "database is locked");
    assert_eq!(v["checks"]["store"], "ok");
}

#[tokio::test]
async fn version_is_the_service_answer() {
    let app = router(Arc::new(Fake::default()));
    let (status, _, body) = call(&app, "GET", "/version").await;
    assert_eq!(status, StatusCode::OK);
    let v = json(&body);
    assert_eq!(v["name"], "cairn");
    assert_eq!(v["version"], "9.9.9");
    assert_eq!(v["git_commit"], Value::Null);
    assert_eq!(v["store_format_version"], 7);
    assert_eq!(v["catalog_schema_version"], 3);
}

#[tokio::test]
async fn unknown_route_is_json_404_and_wrong_method_json_405() {
    let app = router(Arc::new(Fake::default()));
    let (status, ctype, body) = call(&app, "GET", "/no/such/thing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let v = json(&body);
    assert_eq!(v["error"]["code"], 404);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("/no/such/thing")
    );

    let (status, ctype, body) = call(&app, "POST", "/healthz").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(ctype.starts_with("application/json"), "{ctype}");
    assert_eq!(json(&body)["error"]["code"], 405);
}

#[tokio::test]
async fn metrics_export_store_values_and_count_requests_by_route() {
    let fake = Arc::new(Fake::default());
    fake.reads.store(41, Ordering::SeqCst);
    let app = router(fake.clone());
    call(&app, "GET", "/healthz").await;
    call(&app, "GET", "/nope-1").await;
    call(&app, "GET", "/nope-2").await;

    let (status, ctype, body) = call(&app, "GET", "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let lines: Vec<&str> = body.lines().collect();
    assert!(lines.contains(&"cairn_store_objects 2"), "{body}");
    assert!(lines.contains(&"cairn_store_reads_total 41"), "{body}");
    assert!(
        lines.contains(&"# TYPE cairn_store_reads counter"),
        "{body}"
    );
    // Saturates rather than wrapping negative.
    assert!(
        lines.contains(&format!("cairn_store_free_bytes {}", i64::MAX).as_str()),
        "{body}"
    );
    assert!(
        lines.contains(
            &r#"cairn_http_requests_total{method="GET",route="/healthz",status="200"} 1"#
        ),
        "{body}"
    );
    // Unknown paths share one series.
    assert!(
        lines.contains(
            &r#"cairn_http_requests_total{method="GET",route="<unmatched>",status="404"} 2"#
        ),
        "{body}"
    );
    assert_eq!(lines.last(), Some(&"# EOF"));

    // Values are read at scrape time.
    fake.reads.store(42, Ordering::SeqCst);
    let (_, _, body) = call(&app, "GET", "/metrics").await;
    assert!(
        body.lines().any(|l| l == "cairn_store_reads_total 42"),
        "{body}"
    );
}

/// The committed `docs/openapi.json` is what the router generates. Regenerate it with
/// `CAIRN_UPDATE_OPENAPI=1 cargo test -p admin-api openapi`.
#[test]
fn committed_openapi_matches_the_routes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let generated = serde_json::to_string_pretty(&crate::openapi()).expect("encode") + "\n";
    if std::env::var_os("CAIRN_UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &generated).expect("write docs/openapi.json");
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is stale: run CAIRN_UPDATE_OPENAPI=1 cargo test -p admin-api openapi"
    );
}

/// Every documented operation is routed: asking it never reaches the catch-all 404 or 405.
#[tokio::test]
async fn every_documented_operation_is_routed() {
    let app = router(Arc::new(Fake::default()));
    let (status, _, body) = call(&app, "GET", "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let doc = json(&body);
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.contains_key("/healthz"));
    let mut checked = 0;
    for (path, ops) in paths {
        // Path parameters get a well-formed UUID, which every family accepts as an id.
        let uri: String = path
            .split('/')
            .map(|seg| {
                if seg.starts_with('{') {
                    "6edbc2f4-1507-44f8-ac0d-eed1d2608d38"
                } else {
                    seg
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in ops.as_object().expect("operations").keys() {
            if !["get", "post", "put", "delete", "patch", "head"].contains(&method.as_str()) {
                continue;
            }
            let (status, _, body) = call(&app, &method.to_uppercase(), &uri).await;
            let fallback = serde_json::from_str::<Value>(&body).ok().filter(|v| {
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("no resource at") || m.starts_with("method "))
            });
            assert!(
                fallback.is_none() && status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path} is documented but not routed ({status}): {body}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} operations checked");
}
