//! etcd as the registry's shared store: control planes on several hosts, each
//! serving the instances of its own host, share one catalog through etcd.
//!
//! Each control plane stays the registry its services talk to (registration,
//! heartbeats, watches, probes: the same HTTP API), like a Consul agent in front of
//! its servers. What it adds in etcd mode:
//! - **out**: every instance registered here is written to
//!   `<prefix>/instances/<id>` under an etcd lease of the instance's TTL. The lease
//!   is kept alive while the instance keeps heartbeating here; when the instance
//!   expires, deregisters or changes health, the key is deleted or rewritten. If this
//!   control plane dies, its leases run out in etcd and its instances vanish from
//!   every other host's catalog after one TTL: the same promise as a lapsed lease.
//! - **in**: a watch on the prefix (after reading it whole) brings the instances
//!   other control planes wrote into this one's catalog. Health is decided by the
//!   control plane that owns an instance (it probes it) and travels in the value.
//!
//! While etcd is unreachable each control plane keeps serving what it knows (its own
//! instances, the last remote ones) and catches up when etcd answers again: a full
//! read, then the watch. The client speaks etcd's JSON gateway (`/v3/...`, served
//! on the client port since etcd 3.3), so no gRPC stack is compiled into the
//! control plane for it.

use crate::config::EtcdConfig;
use crate::Registry;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal_core::registry::Instance;
use shoal_core::{Error, ErrorKind, Origin};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// Largest answer read from etcd (a range of the whole prefix).
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;
/// Largest single watch message.
const MAX_WATCH_MESSAGE: usize = 8 * 1024 * 1024;
/// Longest pause between attempts while etcd is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often the writer looks for leases due a keepalive (and retries failures).
const WRITER_TICK: Duration = Duration::from_millis(250);

/// What is stored under an instance's key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) instance: Instance,
    pub(crate) ttl_ms: u64,
    /// The control plane that owns (registered and probes) the instance.
    pub(crate) owner: String,
}

/// A small client of etcd's JSON gateway.
#[derive(Clone)]
pub(crate) struct EtcdClient {
    endpoints: Vec<String>,
    http: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

fn unavailable(what: String) -> Error {
    Error::new(ErrorKind::Unavailable, Origin::Upstream, what)
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

/// The key just past every key starting with `prefix` (etcd's `range_end`).
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.as_bytes().to_vec();
    // Prefixes here end in '/', never 0xff, so incrementing the last byte is enough.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    B64.encode(end)
}

/// etcd writes 64-bit integers as JSON strings.
fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

impl EtcdClient {
    pub(crate) fn new(cfg: &EtcdConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(cfg.timeout_ms)));
        connector.set_nodelay(true);
        Self {
            endpoints: cfg
                .endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            http: Client::builder(TokioExecutor::new()).build(connector),
            timeout: Duration::from_millis(cfg.timeout_ms),
        }
    }

    async fn send(
        &self,
        base: &str,
        path: &str,
        body: &Value,
    ) -> Result<hyper::Response<hyper::body::Incoming>, Error> {
        let req = http::Request::post(format!("{base}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| Error::internal(format!("building etcd request {path}")).with_source(e))?;
        self.http
            .request(req)
            .await
            .map_err(|e| unavailable(format!("etcd at {base} unreachable")).with_source(e))
    }

    /// One unary call, trying each endpoint in turn.
    async fn call(&self, path: &str, body: Value) -> Result<Value, Error> {
        let mut last = None;
        for base in &self.endpoints {
            let attempt = async {
                let res = self.send(base, path, &body).await?;
                let status = res.status();
                let bytes = http_body_util::Limited::new(res.into_body(), MAX_ANSWER_BYTES)
                    .collect()
                    .await
                    .map_err(|e| {
                        unavailable(format!("reading etcd answer to {path}"))
                            .with_source(std::io::Error::other(e.to_string()))
                    })?
                    .to_bytes();
                let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
                    unavailable(format!("etcd answer to {path} is not JSON")).with_source(e)
                })?;
                if !status.is_success() {
                    return Err(unavailable(format!(
                        "etcd refused {path} ({status}): {}",
                        v.get("message").or(v.get("error")).unwrap_or(&v)
                    )));
                }
                Ok(v)
            };
            match tokio::time::timeout(self.timeout, attempt).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(Error::new(
                        ErrorKind::Timeout,
                        Origin::Upstream,
                        format!("etcd call {path} at {base} timed out"),
                    ))
                }
            }
        }
        Err(last.unwrap_or_else(|| unavailable("no etcd endpoint".into())))
    }

    /// A new lease of `ttl` (whole seconds, rounded up); its id.
    pub(crate) async fn grant(&self, ttl: Duration) -> Result<i64, Error> {
        let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let v = self.call("/v3/lease/grant", json!({ "TTL": secs })).await?;
        match int(&v["ID"]) {
            0 => Err(unavailable(format!("etcd granted no lease: {v}"))),
            id => Ok(id),
        }
    }

    /// Renew a lease; `false` when etcd no longer has it.
    pub(crate) async fn keepalive(&self, lease: i64) -> Result<bool, Error> {
        let v = self
            .call("/v3/lease/keepalive", json!({ "ID": lease.to_string() }))
            .await?;
        // An unknown lease answers with no TTL (0).
        Ok(int(&v["result"]["TTL"]) > 0)
    }

    pub(crate) async fn revoke(&self, lease: i64) -> Result<(), Error> {
        match self
            .call("/v3/lease/revoke", json!({ "ID": lease.to_string() }))
            .await
        {
            // Already gone is what revoking wants.
            Err(e) if e.message().contains("not found") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    pub(crate) async fn put(&self, key: &str, value: &str, lease: i64) -> Result<(), Error> {
        self.call(
            "/v3/kv/put",
            json!({ "key": b64(key), "value": b64(value), "lease": lease.to_string() }),
        )
        .await
        .map(|_| ())
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), Error> {
        self.call("/v3/kv/deleterange", json!({ "key": b64(key) }))
            .await
            .map(|_| ())
    }

    /// Every key and value under `prefix`, and the store's revision they are of.
    pub(crate) async fn range_prefix(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Vec<u8>)>, i64), Error> {
        let v = self
            .call(
                "/v3/kv/range",
                json!({ "key": b64(prefix), "range_end": prefix_end(prefix) }),
            )
            .await?;
        let revision = int(&v["header"]["revision"]);
        let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
        let mut out = Vec::with_capacity(kvs.len());
        for kv in kvs {
            out.push(decode_kv(&kv)?);
        }
        Ok((out, revision))
    }

    /// Watch `prefix` from `revision` on; `on_event(put, key, value)` for each
    /// change. Returns only with an error (etcd went away, or the revision was
    /// compacted): the caller reads the prefix again and watches anew.
    pub(crate) async fn watch_prefix(
        &self,
        prefix: &str,
        revision: i64,
        mut on_event: impl FnMut(bool, String, Vec<u8>),
    ) -> Result<(), Error> {
        let body = json!({ "create_request": {
            "key": b64(prefix),
            "range_end": prefix_end(prefix),
            "start_revision": revision.to_string(),
        }});
        let mut last = None;
        let mut res = None;
        for base in &self.endpoints {
            match tokio::time::timeout(self.timeout, self.send(base, "/v3/watch", &body)).await {
                Ok(Ok(r)) if r.status().is_success() => {
                    res = Some(r);
                    break;
                }
                Ok(Ok(r)) => {
                    last = Some(unavailable(format!(
                        "etcd refused the watch ({})",
                        r.status()
                    )))
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(unavailable(format!("etcd watch at {base} timed out"))),
            }
        }
        let Some(res) = res else {
            return Err(last.unwrap_or_else(|| unavailable("no etcd endpoint".into())));
        };
        let mut body = res.into_body();
        let mut buf = BytesMut::new();
        loop {
            let frame = match body.frame().await {
                None => return Err(unavailable("etcd ended the watch".into())),
                Some(Err(e)) => return Err(unavailable("etcd watch broke".into()).with_source(e)),
                Some(Ok(f)) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            // The gateway sends one JSON message per line.
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line = buf.split_to(nl + 1);
                let line = &line[..nl];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let msg: Value = serde_json::from_slice(line).map_err(|e| {
                    unavailable("etcd watch message is not JSON".into()).with_source(e)
                })?;
                let result = msg.get("result").unwrap_or(&msg);
                if let Some(err) = msg.get("error") {
                    return Err(unavailable(format!("etcd watch failed: {err}")));
                }
                if result["canceled"].as_bool() == Some(true) {
                    return Err(unavailable(format!(
                        "etcd canceled the watch (compacted to {}): {}",
                        int(&result["compact_revision"]),
                        result["cancel_reason"]
                    )));
                }
                for ev in result["events"].as_array().into_iter().flatten() {
                    let put = ev["type"].as_str() != Some("DELETE");
                    let (key, value) = decode_kv(&ev["kv"])?;
                    on_event(put, key, value);
                }
            }
            if buf.len() > MAX_WATCH_MESSAGE {
                return Err(unavailable(format!(
                    "etcd watch message over {MAX_WATCH_MESSAGE} bytes"
                )));
            }
        }
    }
}

fn decode_kv(kv: &Value) -> Result<(String, Vec<u8>), Error> {
    let field = |name: &str| -> Result<Vec<u8>, Error> {
        match kv[name].as_str() {
            None => Ok(Vec::new()),
            Some(s) => B64
                .decode(s)
                .map_err(|e| unavailable(format!("etcd {name} is not base64")).with_source(e)),
        }
    };
    let key = String::from_utf8(field("key")?)
        .map_err(|e| unavailable("etcd key is not UTF-8".into()).with_source(e))?;
    Ok((key, field("value")?))
}

/// Keep `registry` and etcd in step, forever: this control plane's instances out,
/// the others' in.
pub(crate) async fn run(registry: Registry, cfg: EtcdConfig) {
    let client = EtcdClient::new(&cfg);
    let owner = format!("cp-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let dir = format!("{}/instances/", cfg.prefix);
    tracing::info!(endpoints = ?cfg.endpoints, prefix = %cfg.prefix, owner = %owner, "registry kept in etcd");
    tokio::join!(
        write_out(registry.clone(), client.clone(), owner.clone(), dir.clone()),
        read_in(registry, client, owner, dir),
    );
}

struct Written {
    lease: i64,
    value: String,
    ttl: Duration,
    renewed: Instant,
}

/// Write this control plane's instances to etcd, keep their leases alive, delete
/// those gone.
async fn write_out(registry: Registry, client: EtcdClient, owner: String, dir: String) {
    let mut changes = registry.subscribe_changes();
    let mut written: HashMap<String, Written> = HashMap::new();
    let mut failing = false;
    let mut tick = tokio::time::interval(WRITER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = changes.changed() => {}
            _ = tick.tick() => {}
        }
        match sync_out(&registry, &client, &owner, &dir, &mut written).await {
            Ok(()) if failing => {
                tracing::info!("etcd reachable again; registry written");
                failing = false;
            }
            Ok(()) => {}
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "writing the registry to etcd failed; retrying");
                    failing = true;
                }
            }
        }
    }
}

async fn sync_out(
    registry: &Registry,
    client: &EtcdClient,
    owner: &str,
    dir: &str,
    written: &mut HashMap<String, Written>,
) -> Result<(), Error> {
    let local = registry.local_instances();
    let mut want: BTreeMap<String, (String, Duration)> = BTreeMap::new();
    for (instance, ttl) in local {
        let record = Record {
            ttl_ms: ttl.as_millis() as u64,
            instance,
            owner: owner.to_string(),
        };
        let value = serde_json::to_string(&record)
            .map_err(|e| Error::internal("encoding an instance for etcd").with_source(e))?;
        want.insert(record.instance.id.clone(), (value, ttl));
    }
    // Gone here: delete its key, drop its lease.
    let gone: Vec<String> = written
        .keys()
        .filter(|id| !want.contains_key(*id))
        .cloned()
        .collect();
    for id in gone {
        client.delete(&format!("{dir}{id}")).await?;
        if let Some(w) = written.remove(&id) {
            // The key is already gone; a lease left over would only expire.
            let _ = client.revoke(w.lease).await;
        }
    }
    let now = Instant::now();
    for (id, (value, ttl)) in want {
        let key = format!("{dir}{id}");
        match written.get_mut(&id) {
            Some(w) if w.ttl == ttl => {
                if now.duration_since(w.renewed) >= ttl / 3 {
                    if client.keepalive(w.lease).await? {
                        w.renewed = now;
                    } else {
                        // etcd lost the lease (it was unreachable for longer than
                        // the TTL, or restarted without its data): write anew.
                        tracing::warn!(id = %id, "etcd lease lapsed; writing the instance again");
                        written.remove(&id);
                        put_new(client, &key, &id, value, ttl, written).await?;
                        continue;
                    }
                }
                if w.value != value {
                    client.put(&key, &value, w.lease).await?;
                    w.value = value;
                }
            }
            _ => {
                if let Some(old) = written.remove(&id) {
                    let _ = client.revoke(old.lease).await;
                }
                put_new(client, &key, &id, value, ttl, written).await?;
            }
        }
    }
    Ok(())
}

async fn put_new(
    client: &EtcdClient,
    key: &str,
    id: &str,
    value: String,
    ttl: Duration,
    written: &mut HashMap<String, Written>,
) -> Result<(), Error> {
    let lease = client.grant(ttl).await?;
    client.put(key, &value, lease).await?;
    written.insert(
        id.to_string(),
        Written {
            lease,
            value,
            ttl,
            renewed: Instant::now(),
        },
    );
    Ok(())
}

/// Bring the other control planes' instances into the catalog: read all, then
/// watch; again from the start after any failure.
async fn read_in(registry: Registry, client: EtcdClient, owner: String, dir: String) {
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    loop {
        let outcome = async {
            let (kvs, revision) = client.range_prefix(&dir).await?;
            let mut remote = BTreeMap::new();
            for (key, value) in kvs {
                if let Some(r) = parse_record(&dir, &key, &value, &owner) {
                    remote.insert(r.instance.id.clone(), r.instance);
                }
            }
            registry.replace_remote(remote);
            if failing {
                tracing::info!("etcd reachable again; catalog read");
            }
            failing = false;
            backoff = Duration::from_millis(100);
            client
                .watch_prefix(&dir, revision + 1, |put, key, value| {
                    let Some(id) = key.strip_prefix(&dir) else {
                        return;
                    };
                    if put {
                        match parse_record(&dir, &key, &value, &owner) {
                            Some(r) => registry.upsert_remote(r.instance),
                            // Ours, or unreadable: not a remote instance (any more).
                            None => registry.remove_remote(id),
                        }
                    } else {
                        registry.remove_remote(id);
                    }
                })
                .await
        }
        .await;
        if let Err(e) = outcome {
            if !failing {
                tracing::warn!(error = %e, "reading the registry from etcd failed; keeping the last catalog");
                failing = true;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A remote instance's record, or `None` for one of ours or one that cannot be
/// read (reported, never silently used).
fn parse_record(dir: &str, key: &str, value: &[u8], owner: &str) -> Option<Record> {
    let id = key.strip_prefix(dir)?;
    match serde_json::from_slice::<Record>(value) {
        Ok(r) if r.owner == owner => None,
        Ok(r) if r.instance.id != id => {
            tracing::warn!(key = %key, id = %r.instance.id, "etcd record's id does not match its key; ignored");
            None
        }
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(key = %key, error = %e, "unreadable instance record in etcd; ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against a real etcd (`scripts/etcd`), each test under its own prefix.

    use super::*;
    use crate::config::{HealthCheckConfig, RegistryConfig};
    use shoal_core::registry::Registration;

    fn config(prefix: &str, endpoints: Vec<String>) -> RegistryConfig {
        RegistryConfig {
            // Probes would fail against the made-up addresses below; health is
            // driven by hand with `record_probe`.
            health: HealthCheckConfig {
                enabled: false,
                ..Default::default()
            },
            etcd: Some(EtcdConfig {
                endpoints,
                prefix: prefix.into(),
                timeout_ms: 2_000,
            }),
            ..Default::default()
        }
    }

    /// A control plane's registry with its background tasks; dropping the handle
    /// stops them, as the death of its process would.
    struct ControlPlane {
        registry: Registry,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for ControlPlane {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn control_plane(cfg: RegistryConfig) -> ControlPlane {
        let registry = Registry::new(cfg).unwrap();
        let task = {
            let r = registry.clone();
            tokio::spawn(async move { r.run_background(std::future::pending()).await })
        };
        ControlPlane { registry, task }
    }

    fn reg(id: &str, port: u16, ttl_ms: u64) -> Registration {
        Registration {
            service: "catalog".into(),
            version: "1.0.0".into(),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            id: Some(id.into()),
            pid: None,
            metadata: Default::default(),
            ttl_ms: Some(ttl_ms),
        }
    }

    /// Wait (at most 15 s) until `f` holds.
    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !f() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn two_control_planes_share_one_catalog_through_etcd() {
        let prefix = shoal_testkit::etcd::unique_prefix();
        let url = shoal_testkit::etcd::url().to_string();
        let a = control_plane(config(&prefix, vec![url.clone()]));
        let b = control_plane(config(&prefix, vec![url.clone()]));

        a.registry.register(reg("catalog-a", 1001, 30_000)).unwrap();
        b.registry.register(reg("catalog-b", 1002, 30_000)).unwrap();
        // Each sees both, its own once.
        for cp in [&a, &b] {
            eventually("both instances in each catalog", || {
                cp.registry.catalog().instances("catalog").len() == 2
            })
            .await;
        }
        assert_eq!(b.registry.instance("catalog-a").unwrap().addr.port(), 1001);

        // Health is the owner's to decide, and travels.
        a.registry.record_probe("catalog-a", false);
        a.registry.record_probe("catalog-a", false);
        eventually("unhealthy on the other host", || {
            b.registry.instance("catalog-a").is_some_and(|i| !i.healthy)
        })
        .await;

        // A graceful deregistration is seen at once, not after the TTL.
        a.registry.deregister("catalog-a").unwrap();
        eventually("deregistered on the other host", || {
            b.registry.instance("catalog-a").is_none()
        })
        .await;

        // A control plane that dies takes its instances with it after one lease.
        a.registry.register(reg("catalog-c", 1003, 2_000)).unwrap();
        eventually("new instance seen", || {
            b.registry.instance("catalog-c").is_some()
        })
        .await;
        drop(a);
        eventually("dead host's instance expired", || {
            b.registry.instance("catalog-c").is_none()
        })
        .await;
        // While the survivor's own stays.
        assert!(b.registry.instance("catalog-b").is_some());
    }

    #[tokio::test]
    async fn a_new_control_plane_reads_what_is_there_and_bad_records_are_skipped() {
        let prefix = shoal_testkit::etcd::unique_prefix();
        let url = shoal_testkit::etcd::url().to_string();
        let client = EtcdClient::new(config(&prefix, vec![url.clone()]).etcd.as_ref().unwrap());
        let lease = client.grant(Duration::from_secs(30)).await.unwrap();
        client
            .put(&format!("{prefix}/instances/broken"), "{not json", lease)
            .await
            .unwrap();
        let a = control_plane(config(&prefix, vec![url.clone()]));
        a.registry.register(reg("catalog-a", 1001, 30_000)).unwrap();
        let b = control_plane(config(&prefix, vec![url]));
        eventually("existing instance read at start", || {
            b.registry.instance("catalog-a").is_some()
        })
        .await;
        assert!(b.registry.instance("broken").is_none());
        assert_eq!(b.registry.catalog().instances("catalog").len(), 1);
        client.revoke(lease).await.unwrap();
    }

    #[tokio::test]
    async fn without_etcd_a_control_plane_still_serves_its_own_host() {
        // Nothing listens on port 9 of loopback.
        let a = control_plane(config("/nowhere", vec!["http://127.0.0.1:9".into()]));
        a.registry.register(reg("catalog-a", 1001, 30_000)).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(a.registry.catalog().instances("catalog").len(), 1);
        let e = EtcdClient::new(a.registry.config().etcd.as_ref().unwrap())
            .grant(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            e.message()
                .contains("etcd at http://127.0.0.1:9 unreachable"),
            "{e}"
        );
    }

    #[test]
    fn bad_etcd_settings_are_named() {
        let mut cfg = config("/shoal", vec!["127.0.0.1:2379".into()]);
        let e = cfg.validate().unwrap_err();
        assert!(e.message().contains("registry.etcd.endpoints"), "{e}");
        cfg.etcd.as_mut().unwrap().endpoints = vec!["http://127.0.0.1:2379".into()];
        cfg.etcd.as_mut().unwrap().prefix = "shoal/".into();
        let e = cfg.validate().unwrap_err();
        assert!(e.message().contains("registry.etcd.prefix"), "{e}");
        assert_eq!(prefix_end("/a/"), B64.encode("/a0"));
    }
}
