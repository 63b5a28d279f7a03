use super::*;
use axum::body::Body;
use http::Request;
use http_body_util::BodyExt;
use shoal_core::registry::Registration;
use shoal_registry::RegistryConfig;
use tower::ServiceExt;

async fn call(app: &Router, path: &str) -> (u16, http::HeaderMap, String) {
    let res = app
        .clone()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn registry() -> Registry {
    Registry::new(RegistryConfig {
        state_file: None,
        ..RegistryConfig::default()
    })
    .unwrap()
}

fn register(r: &Registry, id: &str, service: &str, pid: u32) {
    let reg: Registration = serde_json::from_value(json!({
        "id": id,
        "service": service,
        "version": "1.0.0",
        "addr": "127.0.0.1:9",
        "pid": pid,
    }))
    .unwrap();
    r.register(reg).unwrap();
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-dash-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn serves_the_page_with_its_assets_under_a_strict_policy_and_keeps_the_json_404() {
    let app = crate::router(
        registry(),
        crate::FaultTable::new(),
        shoal_telemetry::Metrics::new("cp"),
    );
    let (status, headers, _) = call(&app, "/").await;
    assert_eq!(status, 303);
    assert_eq!(headers["location"], "/dashboard");
    for (path, ty, has) in [
        (
            "/dashboard",
            "text/html; charset=utf-8",
            "/dashboard/app.js",
        ),
        (
            "/dashboard/app.js",
            "text/javascript; charset=utf-8",
            "/v1/dashboard/topology",
        ),
        ("/dashboard/app.css", "text/css; charset=utf-8", ".span-bar"),
    ] {
        let (status, headers, body) = call(&app, path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(headers["content-type"], ty, "{path}");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert!(body.contains(has), "{path}");
    }
    // Nothing from another origin.
    let (_, _, page) = call(&app, "/dashboard").await;
    assert!(!page.contains("http://") && !page.contains("https://"));
    // Unknown paths, under /dashboard too, are still the JSON 404.
    for path in ["/nope", "/dashboard/nope.js", "/v1/dashboard"] {
        let (status, headers, body) = call(&app, path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(headers["content-type"], "application/json", "{path}");
        assert!(body.contains("not_found"), "{body}");
    }
    // Without a log store the search says so.
    let (status, _, body) = call(&app, "/v1/logs").await;
    assert_eq!(status, 404);
    assert!(body.contains("no log store known"), "{body}");
}

#[tokio::test]
async fn topology_joins_the_registry_with_the_supervisor_and_the_routes() {
    let r = registry();
    register(&r, "catalog-1", "catalog", 100);
    register(&r, "catalog-2", "catalog", 200);
    register(&r, "catalog-v2-1", "catalog", 300);
    let dir = temp_dir("topology");
    let up = dir.join("up.json");
    let write_up = |supervisor: u32| {
        let p = |name: &str, service: Option<&str>, pid: Option<u32>, state: &str| json!({"name": name, "service": service, "pid": pid, "state": state, "restarts": 0, "last_exit": null});
        let v = json!({
            "pid": supervisor,
            "control_plane": "http://127.0.0.1:7070",
            "gateway": "http://127.0.0.1:8080",
            "processes": [
                p("control-plane", None, Some(1), "running"),
                // Running, registered with its own pid: up.
                p("catalog#1", Some("catalog"), Some(100), "running"),
                // Died: the registry's entry is stale.
                {"name": "catalog#2", "service": "catalog", "pid": null, "state": "restarting", "restarts": 1, "last_exit": "signal 9"},
                // Restarted, the old process's entry not replaced yet.
                p("catalog-v2#1", Some("catalog-v2"), Some(301), "running"),
                // Supervised, not registered at all.
                p("catalog#3", Some("catalog"), Some(400), "starting"),
            ],
        });
        std::fs::write(&up, v.to_string()).unwrap();
    };
    write_up(std::os::unix::process::parent_id());
    let view = SystemView {
        up_file: Some(up.clone()),
        entries: [("catalog", "catalog"), ("catalog-v2", "catalog")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        routes: Some(Arc::new(|| {
            Ok(vec![RouteView {
                name: "products".into(),
                matches: "/api/products".into(),
                services: vec!["catalog".into()],
                weights: [("1.0.0".to_string(), 90), ("2.0.0".to_string(), 10)].into(),
            }])
        })),
        ..SystemView::default()
    };
    let t = topology(&r, &view);
    assert_eq!(t["supervised"], true);
    let catalog = &t["services"][0];
    assert_eq!(catalog["name"], "catalog");
    let health: BTreeMap<String, String> = catalog["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_string(),
                i["health"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: BTreeMap<String, String> = [
        ("catalog-1", "up"),
        ("catalog-2", "down"),
        ("catalog-v2-1", "down"),
        ("catalog-3", "down"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(health, want);
    let reason = |id: &str| {
        catalog["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        reason("catalog-2").contains("signal 9"),
        "{}",
        reason("catalog-2")
    );
    assert!(reason("catalog-v2-1").contains("pid 301"));
    assert!(reason("catalog-3").contains("not registered"));
    assert_eq!(t["platform"][0]["name"], "control-plane");
    assert_eq!(t["routes"][0]["weights"]["2.0.0"], 10);

    // A file another supervisor left: ignored, the registry alone decides.
    write_up(std::process::id());
    let t = topology(&r, &view);
    assert_eq!(t["supervised"], false);
    let instances = t["services"][0]["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 3);
    assert!(instances.iter().all(|i| i["health"] == "up"));
    // Probes failing: down, whatever the supervisor says.
    r.record_probe("catalog-1", false);
    r.record_probe("catalog-1", false);
    r.record_probe("catalog-1", false);
    let t = topology(&r, &view);
    let c1 = &t["services"][0]["instances"][0];
    assert_eq!(
        (c1["id"].as_str(), c1["health"].as_str()),
        (Some("catalog-1"), Some("down"))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn log_search_reads_the_store_with_the_shared_reader() {
    let dir = temp_dir("logs");
    let line = |ts: u64, service: &str, instance: &str, level: &str, msg: &str| {
        format!(
            "{}\n",
            json!({"ts": shoal_telemetry::logging::rfc3339(ts), "level": level, "service": service, "instance": instance, "message": msg, "trace_id": "t1"})
        )
    };
    std::fs::write(
        dir.join("catalog-1.log"),
        [
            line(1_000, "catalog", "catalog-1", "INFO", "one"),
            "thread 'main' panicked\n".to_string(),
            line(3_000, "catalog", "catalog-1", "WARN", "three"),
        ]
        .concat(),
    )
    .unwrap();
    std::fs::write(
        dir.join("catalog-v2-1.log"),
        line(2_000, "catalog", "catalog-v2-1", "ERROR", "two"),
    )
    .unwrap();
    std::fs::write(
        dir.join("gateway.log"),
        line(1_500, "gateway", "gateway", "INFO", "gw"),
    )
    .unwrap();
    let view = SystemView {
        log_dir: Some(dir.clone()),
        entries: [("catalog", "catalog"), ("catalog-v2", "catalog")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        ..SystemView::default()
    };
    let app = crate::log_search::router(&view);
    let get = |path: &'static str| {
        let app = app.clone();
        async move {
            let (status, _, body) = call(&app, path).await;
            (status, serde_json::from_str::<Value>(&body).unwrap())
        }
    };
    let messages = |v: &Value| -> Vec<String> {
        v["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                l["line"]["message"]
                    .as_str()
                    .or(l["text"].as_str())
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let (status, v) = get("/v1/logs").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        messages(&v),
        ["one", "thread 'main' panicked", "gw", "two", "three"]
    );
    // The service takes its other version's replicas; the level hides INFO.
    let (_, v) = get("/v1/logs?service=catalog&level=warn&grep=&trace=t1").await;
    assert_eq!(messages(&v), ["two", "three"]);
    assert_eq!(v["hidden_text"], 1, "the panic has no trace id: counted");
    assert_eq!(v["lines"][0]["process"], "catalog-v2-1");
    let (_, v) = get("/v1/logs?limit=2").await;
    assert_eq!(messages(&v), ["two", "three"]);
    assert_eq!(v["earlier"], 3);
    let (status, v) = get("/v1/logs?limit=5000").await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("2000"));
    let (status, _) = get("/v1/logs?colour=red").await;
    assert_eq!(status, 400);
    std::fs::remove_dir_all(&dir).unwrap();
    let (status, v) = get("/v1/logs").await;
    assert_eq!(status, 404, "{v}");
}
