//! `shoal deploy k8s`: Kubernetes manifests for a system file, one instance per pod.
//!
//! The same system file that `shoal up` runs on one host becomes a namespace with
//! the control plane, the gateway and a Deployment per `[services.*]` entry, all
//! from one image (see the Dockerfile). What a pod needs that `shoal up` would have
//! given it (registry URL, listen address, instance id, data folder, TLS mode,
//! backends) is in its environment; `[backends]` must name JetStream and
//! PostgreSQL, because the embedded broker and SQLite files cannot be shared between
//! pods. NetworkPolicies allow exactly the calls the consumer contracts (and a list
//! of the calls they do not cover) name. The output is multi-document YAML written
//! as JSON documents (JSON is YAML), so no YAML crate is needed; keys are sorted, so
//! the same inputs always give the same bytes. docs/deployment.md has the rest.

use clap::{Arg, ArgMatches, Command};
use serde_json::{json, Value};
use shoal_core::Error;
use shoal_supervisor::SystemFile;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where every service listens in its pod (mTLS under `[tls] mode = "mutual"`).
const SERVICE_PORT: u16 = 7000;
/// The plain-HTTP health port of every service (`SHOAL_HEALTH_LISTEN`): kubelet
/// probes carry no client certificate, so they cannot use the main port.
pub(crate) const HEALTH_PORT: u16 = 8081;
const CONTROL_PLANE_PORT: u16 = 7070;
/// A sidecar entry's app (`PORT`) and the sidecar's outbound address for the app's
/// calls, both on the pod's loopback.
const SIDECAR_APP_PORT: u16 = 7100;
const SIDECAR_OUT_PORT: u16 = 7101;
const GATEWAY_PORT: u16 = 8080;
/// Where the image keeps the system file and the files it names (docs/deployment.md).
const APP_DIR: &str = "/app";
/// Where the image keeps every binary.
const BIN_DIR: &str = "/usr/local/bin";
/// The distroless `nonroot` user the image runs as.
const NONROOT_UID: u32 = 65532;
/// The names of the platform's own pods, which callers may be besides services.
const GATEWAY: &str = "gateway";
const CONTROL_PLANE: &str = "control-plane";

/// `shoal deploy k8s …`.
pub(crate) fn command(system: Arg) -> Command {
    Command::new("deploy")
        .about("Generate deployment files from the system file")
        .subcommand_required(true)
        .subcommand(
            Command::new("k8s")
                .about("Kubernetes manifests (multi-document YAML) for the system file")
                .arg(system)
                .arg(
                    Arg::new("backends")
                        .long("backends")
                        .value_name("FILE")
                        .help("A TOML file with a [backends] table, added to the system file"),
                )
                .arg(
                    Arg::new("contracts")
                        .long("contracts")
                        .value_name("DIR")
                        .help("Consumer contracts <consumer>--<provider>.json: who calls whom"),
                )
                .arg(
                    Arg::new("calls")
                        .long("calls")
                        .value_name("FILE")
                        .help("More calls, JSON {\"calls\":[{\"from\",\"to\",\"why\"}]}"),
                )
                .arg(
                    Arg::new("image")
                        .long("image")
                        .value_name("IMAGE")
                        .default_value("shoal:latest")
                        .help("The image every container runs"),
                )
                .arg(
                    Arg::new("namespace")
                        .long("namespace")
                        .value_name("NAME")
                        .default_value("shoal")
                        .help("The namespace everything goes in"),
                )
                .arg(
                    Arg::new("out")
                        .long("out")
                        .value_name("FILE")
                        .default_value("-")
                        .help("Write here; - for stdout"),
                ),
        )
}

/// Run `shoal deploy …`.
pub(crate) async fn run(m: &ArgMatches) -> Result<(), Error> {
    let Some(("k8s", m)) = m.subcommand() else {
        return Err(Error::config(
            "unknown deploy target; see shoal deploy --help",
        ));
    };
    let get = |k: &str| m.get_one::<String>(k).cloned();
    let input = Input {
        system: PathBuf::from(get("system").unwrap_or_else(|| "shoal.toml".into())),
        backends: get("backends").map(PathBuf::from),
        contracts: get("contracts").map(PathBuf::from),
        calls: get("calls").map(PathBuf::from),
        image: get("image").unwrap_or_else(|| "shoal:latest".into()),
        namespace: get("namespace").unwrap_or_else(|| "shoal".into()),
    };
    let yaml = generate(&input)?;
    match get("out").as_deref() {
        None | Some("-") => {
            print!("{yaml}");
            Ok(())
        }
        Some(path) => std::fs::write(path, yaml)
            .map_err(|e| Error::config(format!("deploy k8s: cannot write {path}")).with_source(e)),
    }
}

/// What the manifests are made from.
pub(crate) struct Input {
    pub(crate) system: PathBuf,
    pub(crate) backends: Option<PathBuf>,
    pub(crate) contracts: Option<PathBuf>,
    pub(crate) calls: Option<PathBuf>,
    pub(crate) image: String,
    pub(crate) namespace: String,
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::config(format!("cannot read {}", path.display())).with_source(e))
}

/// The manifests, as the text `shoal deploy k8s` prints.
pub(crate) fn generate(input: &Input) -> Result<String, Error> {
    let mut text = read(&input.system)?;
    if let Some(b) = &input.backends {
        // Appended as text: a second [backends] table is the TOML error it should be.
        text.push('\n');
        text.push_str(&read(b)?);
    }
    let origin = match &input.backends {
        Some(b) => format!("{} + {}", input.system.display(), b.display()),
        None => input.system.display().to_string(),
    };
    let mut sys = SystemFile::parse(&text, &origin)?;
    sys.gateway.base_dir = Some(
        input
            .system
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf(),
    );
    sys.validate()
        .map_err(|e| Error::config(format!("{origin}: {}", e.message())))?;
    shoal_core::names::validate_service_name(&input.namespace)
        .map_err(|e| Error::config(format!("--namespace: {e}")))?;

    let mut calls = Vec::new();
    if let Some(dir) = &input.contracts {
        calls.extend(contract_calls(dir)?);
    }
    if let Some(file) = &input.calls {
        calls.extend(listed_calls(file)?);
    }
    // The pods' copy of the system file: the file itself, and of the overlay's
    // backends only what the control plane and the gateway read, so that the
    // database password lives in the Secret alone. (A system file with a
    // [backends] table of its own goes in as it is.)
    let mut pod_text = read(&input.system)?;
    if input.backends.is_some() {
        pod_text.push_str(&platform_backends(&sys.backends));
    }
    let docs = manifests(&sys, &pod_text, &calls, input)?;
    let name = input
        .system
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = format!(
        "# Generated by `shoal deploy k8s` from {name}; do not edit: regenerate \
         (docs/deployment.md).\n"
    );
    for d in docs {
        out.push_str("---\n");
        // Serialising a `Value` cannot fail: its map keys are strings.
        out.push_str(&serde_json::to_string_pretty(&d).unwrap_or_default());
        out.push('\n');
    }
    Ok(out)
}

/// `[backends]` without `postgres`, as TOML text (empty without backends). A JSON
/// string is a valid TOML basic string, so `serde_json` quotes the values.
fn platform_backends(b: &shoal_supervisor::Backends) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut out = String::new();
    if let Some(etcd) = &b.etcd {
        let endpoints: Vec<String> = etcd.endpoints.iter().map(|e| q(e)).collect();
        out.push_str(&format!(
            "etcd = {{ endpoints = [{}], prefix = {}, timeout_ms = {} }}\n",
            endpoints.join(", "),
            q(&etcd.prefix),
            etcd.timeout_ms
        ));
    }
    if let Some(js) = &b.jetstream {
        out.push_str(&format!("jetstream = {{ url = {} }}\n", q(&js.url)));
    }
    if let Some(otlp) = &b.otlp {
        out.push_str(&format!("otlp = {{ endpoint = {} }}\n", q(&otlp.endpoint)));
    }
    if out.is_empty() {
        return out;
    }
    format!(
        "\n# Added by `shoal deploy k8s`. [backends] postgres is left out: the services \
         get\n# their database from the Secret shoal-database.\n[backends]\n{out}"
    )
}

/// One service calling another over HTTP (`from` may be `gateway` or
/// `control-plane`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Call {
    pub(crate) from: String,
    pub(crate) to: String,
}

/// The HTTP calls the contracts in `dir` describe: a contract with `interactions`
/// is a call from its consumer to its provider; one with only `messages` goes
/// through the bus, no connection between the two.
fn contract_calls(dir: &Path) -> Result<Vec<Call>, Error> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::config(format!("cannot read {}", dir.display())).with_source(e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut calls = Vec::new();
    for f in files {
        let v: Value = serde_json::from_str(&read(&f)?)
            .map_err(|e| Error::config(format!("{}: {e}", f.display())))?;
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| Error::config(format!("{}: no \"{k}\"", f.display())))
        };
        let http = v
            .get("interactions")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        if http {
            calls.push(Call {
                from: field("consumer")?,
                to: field("provider")?,
            });
        }
    }
    Ok(calls)
}

/// The calls listed in `file`: `{"calls":[{"from","to","why"}]}`, `why` required
/// so that every opening in the policies says what it is for.
fn listed_calls(file: &Path) -> Result<Vec<Call>, Error> {
    let v: Value = serde_json::from_str(&read(file)?)
        .map_err(|e| Error::config(format!("{}: {e}", file.display())))?;
    let list = v
        .get("calls")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::config(format!("{}: needs a \"calls\" array", file.display())))?;
    list.iter()
        .enumerate()
        .map(|(i, c)| {
            let field = |k: &str| {
                c.get(k)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        Error::config(format!("{}: calls[{i}].{k}: required", file.display()))
                    })
            };
            field("why")?;
            Ok(Call {
                from: field("from")?,
                to: field("to")?,
            })
        })
        .collect()
}

fn labels(component: &str, service: &str, entry: &str) -> Value {
    json!({
        "app.kubernetes.io/part-of": "shoal",
        "app.kubernetes.io/component": component,
        "shoal.dev/service": service,
        "shoal.dev/entry": entry,
    })
}

fn meta(name: &str, ns: &str, labels: &Value) -> Value {
    json!({ "name": name, "namespace": ns, "labels": labels })
}

fn env(name: &str, value: &str) -> Value {
    json!({ "name": name, "value": value })
}

fn env_from_field(name: &str, path: &str) -> Value {
    json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": path } } })
}

fn probes(port: &str) -> (Value, Value) {
    (
        json!({
            "httpGet": { "path": "/health/live", "port": port },
            "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3,
        }),
        json!({
            "httpGet": { "path": "/health/ready", "port": port },
            "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 2,
        }),
    )
}

fn resources(cpu_req: &str, mem_req: &str, cpu_lim: &str, mem_lim: &str) -> Value {
    json!({
        "requests": { "cpu": cpu_req, "memory": mem_req },
        "limits": { "cpu": cpu_lim, "memory": mem_lim },
    })
}

/// Non-root, read-only root, no privileges: the image's `nonroot` user.
fn container_security() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "capabilities": { "drop": ["ALL"] },
    })
}

fn pod_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": NONROOT_UID,
        "runAsGroup": NONROOT_UID,
        // The control plane's volume is written by this group.
        "fsGroup": NONROOT_UID,
        "seccompProfile": { "type": "RuntimeDefault" },
    })
}

/// The system file from the ConfigMap over the image's copy: the files it names
/// (the OpenAPI document, schemas) stay where the image has them. (A subPath mount
/// is not updated in place: a changed ConfigMap takes a rollout restart.)
fn system_mount() -> Value {
    json!({ "name": "system", "mountPath": format!("{APP_DIR}/shoal.toml"), "subPath": "shoal.toml", "readOnly": true })
}

fn system_volume() -> Value {
    json!({ "name": "system", "configMap": { "name": "shoal-system" } })
}

fn pdb(name: &str, ns: &str, l: &Value, selector: &Value) -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(name, ns, l),
        "spec": { "minAvailable": 1, "selector": { "matchLabels": selector } },
    })
}

#[allow(clippy::too_many_lines)]
fn manifests(
    sys: &SystemFile,
    system_text: &str,
    calls: &[Call],
    input: &Input,
) -> Result<Vec<Value>, Error> {
    let ns = input.namespace.as_str();
    let image = input.image.as_str();
    let b = &sys.backends;
    let Some(postgres) = &b.postgres else {
        return Err(Error::config(
            "deploy k8s: [backends] postgres is required: a SQLite file in a pod is neither \
             shared by a service's replicas nor kept when the pod goes (docs/deployment.md)",
        ));
    };
    if b.jetstream.is_none() {
        return Err(Error::config(
            "deploy k8s: [backends] jetstream is required: the embedded broker serves on the \
             control plane's loopback only (docs/deployment.md)",
        ));
    }
    let mutual = sys.tls.is_mutual();
    let registry_url = format!("http://{CONTROL_PLANE}:{CONTROL_PLANE_PORT}");

    // Registered service -> its entries (a canary is a second entry of one service).
    let mut services: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (key, spec) in &sys.services {
        let svc = spec.registers_as(key);
        if svc == GATEWAY || svc == CONTROL_PLANE || key == GATEWAY || key == CONTROL_PLANE {
            return Err(Error::config(format!(
                "services.{key}: {GATEWAY:?} and {CONTROL_PLANE:?} are the platform's own pods"
            )));
        }
        if let Some(c) = &spec.config {
            if c.is_absolute() {
                return Err(Error::config(format!(
                    "services.{key}.config: must be relative to the system file, which the \
                     image keeps in {APP_DIR}"
                )));
            }
        }
        services.entry(svc).or_default().push(key);
    }

    // Who may call each service: the contracts and the listed calls, the gateway
    // for every service a route names, the control plane for every service (health
    // probes, metrics scrapes, the breaker overview).
    let mut callers: BTreeMap<&str, BTreeSet<String>> =
        services.keys().map(|s| (*s, BTreeSet::new())).collect();
    for c in calls {
        let known_caller =
            c.from == GATEWAY || c.from == CONTROL_PLANE || services.contains_key(c.from.as_str());
        let Some(set) = callers.get_mut(c.to.as_str()) else {
            return Err(Error::config(format!(
                "call {} -> {}: {} is not a service of the system file",
                c.from, c.to, c.to
            )));
        };
        if !known_caller {
            return Err(Error::config(format!(
                "call {} -> {}: {} is neither a service of the system file nor gateway or control-plane",
                c.from, c.to, c.from
            )));
        }
        set.insert(c.from.clone());
    }
    for r in sys.gateway.load_routes()? {
        for s in r.services() {
            if let Some(set) = callers.get_mut(s) {
                set.insert(GATEWAY.into());
            }
        }
    }
    for set in callers.values_mut() {
        set.insert(CONTROL_PLANE.into());
    }

    let part_of = json!({ "app.kubernetes.io/part-of": "shoal" });
    let mut docs = vec![json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": ns, "labels": part_of },
    })];

    // The system file every platform pod reads, weights of the gateway's routes
    // included (a canary is moved here durably, or live with PUT
    // /admin/routes/{route}/weights).
    docs.push(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta("shoal-system", ns, &part_of),
        "data": { "shoal.toml": system_text },
    }));
    docs.push(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta("shoal-database", ns, &part_of),
        "type": "Opaque",
        "stringData": { "url": postgres.url },
    }));

    // --- the control plane -----------------------------------------------------------
    // One replica: it holds the CA's key (on its volume), the trace collector and the
    // metrics history (in memory). With [backends] etcd the registry is in etcd and
    // survives it; a restart costs a few seconds of registrations and probes.
    let cp = labels(CONTROL_PLANE, CONTROL_PLANE, CONTROL_PLANE);
    let cp_sel = json!({ "shoal.dev/entry": CONTROL_PLANE });
    let (live, ready) = probes("http");
    docs.push(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": meta("control-plane-data", ns, &cp),
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": { "requests": { "storage": "1Gi" } },
        },
    }));
    docs.push(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(CONTROL_PLANE, ns, &cp),
        "spec": {
            "replicas": 1,
            // The volume is ReadWriteOnce: the old pod lets go before the new one starts.
            "strategy": { "type": "Recreate" },
            "selector": { "matchLabels": cp_sel },
            "template": {
                "metadata": { "labels": cp },
                "spec": {
                    "securityContext": pod_security(),
                    "containers": [{
                        "name": CONTROL_PLANE,
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": [format!("{BIN_DIR}/shoal")],
                        "args": ["control-plane", "--system", format!("{APP_DIR}/shoal.toml"),
                                 "--listen", format!("0.0.0.0:{CONTROL_PLANE_PORT}")],
                        "workingDir": APP_DIR,
                        "ports": [{ "name": "http", "containerPort": CONTROL_PLANE_PORT }],
                        "livenessProbe": live,
                        "readinessProbe": ready,
                        "resources": resources("100m", "128Mi", "1", "512Mi"),
                        "securityContext": container_security(),
                        "volumeMounts": [
                            system_mount(),
                            { "name": "data", "mountPath": format!("{APP_DIR}/.shoal") },
                        ],
                    }],
                    "volumes": [
                        system_volume(),
                        { "name": "data", "persistentVolumeClaim": { "claimName": "control-plane-data" } },
                    ],
                },
            },
        },
    }));
    docs.push(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(CONTROL_PLANE, ns, &cp),
        "spec": {
            "selector": cp_sel,
            "ports": [{ "name": "http", "port": CONTROL_PLANE_PORT, "targetPort": "http" }],
        },
    }));

    // --- the gateway -----------------------------------------------------------------
    // No `replicas`: the HorizontalPodAutoscaler owns it (a fixed value would be put
    // back at every apply).
    let gw = labels(GATEWAY, GATEWAY, GATEWAY);
    let gw_sel = json!({ "shoal.dev/entry": GATEWAY });
    let (live, ready) = probes("http");
    docs.push(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(GATEWAY, ns, &gw),
        "spec": {
            "selector": { "matchLabels": gw_sel },
            "template": {
                "metadata": { "labels": gw },
                "spec": {
                    "securityContext": pod_security(),
                    "containers": [{
                        "name": GATEWAY,
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": [format!("{BIN_DIR}/shoal")],
                        "args": ["gateway", "--system", format!("{APP_DIR}/shoal.toml"),
                                 "--listen", format!("0.0.0.0:{GATEWAY_PORT}"),
                                 "--registry", registry_url],
                        "workingDir": APP_DIR,
                        "ports": [{ "name": "http", "containerPort": GATEWAY_PORT }],
                        "livenessProbe": live,
                        "readinessProbe": ready,
                        "resources": resources("200m", "128Mi", "2", "512Mi"),
                        "securityContext": container_security(),
                        "volumeMounts": [system_mount()],
                    }],
                    "volumes": [system_volume()],
                },
            },
        },
    }));
    docs.push(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(GATEWAY, ns, &gw),
        "spec": {
            "type": "LoadBalancer",
            "selector": gw_sel,
            "ports": [{ "name": "http", "port": GATEWAY_PORT, "targetPort": "http" }],
        },
    }));
    docs.push(json!({
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta(GATEWAY, ns, &gw),
        "spec": {
            "scaleTargetRef": { "apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY },
            "minReplicas": 2,
            "maxReplicas": 6,
            "metrics": [{
                "type": "Resource",
                "resource": { "name": "cpu", "target": { "type": "Utilization", "averageUtilization": 70 } },
            }],
        },
    }));
    docs.push(pdb(GATEWAY, ns, &gw, &gw_sel));

    // --- the services ----------------------------------------------------------------
    let port_name = if mutual { "mtls" } else { "http" };
    for (key, spec) in &sys.services {
        let svc = spec.registers_as(key);
        let l = labels("service", svc, key);
        let sel = json!({ "shoal.dev/entry": key });
        let program = Path::new(&spec.command[0])
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut vars = vec![
            env("SHOAL_REGISTRY_URL", &registry_url),
            env("SHOAL_LISTEN", &format!("0.0.0.0:{SERVICE_PORT}")),
            env_from_field("SHOAL_ADVERTISE_IP", "status.podIP"),
            env("SHOAL_HEALTH_LISTEN", &format!("0.0.0.0:{HEALTH_PORT}")),
            // The pod's name: unique, and a restarted container keeps it.
            env_from_field("SHOAL_INSTANCE_ID", "metadata.name"),
            env("SHOAL_DATA_DIR", "/data"),
        ];
        if let Some(v) = &spec.version {
            vars.push(env("SHOAL_VERSION", v));
        }
        if mutual {
            vars.push(env("SHOAL_TLS__MODE", "mutual"));
            vars.push(env("SHOAL_TLS__TRUST_DOMAIN", &sys.tls.trust_domain));
        }
        for (k, v) in b.service_env(svc) {
            if k == "SHOAL_DATABASE__URL" {
                // The password stays in the Secret.
                vars.push(json!({ "name": k, "valueFrom": { "secretKeyRef": { "name": "shoal-database", "key": "url" } } }));
            } else {
                vars.push(env(&k, &v));
            }
        }
        // The entry's own env wins, as under `shoal up`, except the listen address:
        // a host's port plan means nothing in a pod, which has its own address.
        for (k, v) in &spec.env {
            if k == "SHOAL_LISTEN" {
                continue;
            }
            vars.retain(|e| e["name"] != k.as_str());
            vars.push(env(k, v));
        }
        if let Some(c) = &spec.config {
            // The image keeps the system file's folder in /app (see the Dockerfile).
            vars.retain(|e| e["name"] != "SHOAL_CONFIG");
            vars.push(env("SHOAL_CONFIG", &format!("{APP_DIR}/{}", c.display())));
        }
        let (live, ready) = probes("health");
        let mut main = json!({
            "name": svc,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "command": [format!("{BIN_DIR}/{program}")],
            "args": spec.command[1..],
            "workingDir": APP_DIR,
            "env": vars,
            "ports": [
                { "name": port_name, "containerPort": SERVICE_PORT },
                { "name": "health", "containerPort": HEALTH_PORT },
            ],
            "livenessProbe": live,
            "readinessProbe": ready,
            "resources": resources("50m", "64Mi", "500m", "256Mi"),
            "securityContext": container_security(),
            "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
        });
        let mut containers = Vec::new();
        if let Some(sc) = &spec.sidecar {
            // An app in any language behind `shoal sidecar` (docs/sidecar.md), as
            // `shoal up` runs it: the sidecar is the instance (registers, serves
            // mTLS, probes the app's health path for its readiness) and the app
            // listens on the pod's loopback, which the two containers share.
            let mut sidecar_env = vec![
                env(
                    "SHOAL_SETTINGS__APP_ADDR",
                    &format!("127.0.0.1:{SIDECAR_APP_PORT}"),
                ),
                env(
                    "SHOAL_SETTINGS__OUTBOUND_LISTEN",
                    &format!("127.0.0.1:{SIDECAR_OUT_PORT}"),
                ),
                env("SHOAL_SETTINGS__HEALTH_PATH", &sc.health_path),
            ];
            if let Some(v) = main["env"].as_array() {
                sidecar_env.extend(v.iter().cloned());
            }
            main["env"] = Value::Array(sidecar_env);
            main["command"] = json!([format!("{BIN_DIR}/shoal")]);
            main["args"] = json!(["sidecar", svc]);
            let mut app_env: Vec<Value> = spec
                .env
                .iter()
                .filter(|(k, _)| *k != "SHOAL_LISTEN")
                .map(|(k, v)| env(k, v))
                .collect();
            app_env.push(env("PORT", &SIDECAR_APP_PORT.to_string()));
            app_env.push(env(
                "SHOAL_SIDECAR_URL",
                &format!("http://127.0.0.1:{SIDECAR_OUT_PORT}"),
            ));
            // A program named by a path is in the image under /app; a bare name is
            // looked up on PATH, as under `shoal up`.
            let program = &spec.command[0];
            let program = if program.contains('/') && !program.starts_with('/') {
                format!("{APP_DIR}/{program}")
            } else {
                program.clone()
            };
            // No probes of its own: it listens on loopback, out of kubelet's reach;
            // the sidecar's readiness is the app's health.
            containers.push(json!({
                "name": "app",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": [program],
                "args": spec.command[1..],
                "workingDir": APP_DIR,
                "env": app_env,
                "resources": resources("50m", "64Mi", "500m", "256Mi"),
                "securityContext": container_security(),
            }));
        } else if spec.command.len() == 1 {
            if let Some(obj) = main.as_object_mut() {
                obj.remove("args");
            }
        }
        containers.insert(0, main);
        if let Some(app) = containers.get_mut(1) {
            if spec.command.len() == 1 {
                if let Some(obj) = app.as_object_mut() {
                    obj.remove("args");
                }
            }
        }
        let deployment = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(key, ns, &l),
            "spec": {
                "replicas": spec.replicas,
                "selector": { "matchLabels": sel },
                "template": {
                    "metadata": { "labels": l },
                    "spec": {
                        "securityContext": pod_security(),
                        // Deregister and drain (docs/service-config.md) before the kill.
                        "terminationGracePeriodSeconds": 30,
                        "containers": containers,
                        "volumes": [{ "name": "data", "emptyDir": {} }],
                    },
                },
            },
        });
        docs.push(deployment);
        if spec.replicas > 1 {
            docs.push(pdb(key, ns, &l, &sel));
        }
    }
    for svc in services.keys() {
        let l = json!({
            "app.kubernetes.io/part-of": "shoal",
            "app.kubernetes.io/component": "service",
            "shoal.dev/service": svc,
        });
        let sel = json!({ "app.kubernetes.io/component": "service", "shoal.dev/service": svc });
        // Every version behind one name; callers find instances through the
        // registry (pod addresses), so this Service names the service in the
        // cluster's DNS and for people more than it balances.
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(svc, ns, &l),
            "spec": {
                "selector": sel,
                "ports": [
                    { "name": port_name, "port": SERVICE_PORT, "targetPort": port_name },
                    { "name": "health", "port": HEALTH_PORT, "targetPort": "health" },
                ],
            },
        }));
    }

    // --- network policies --------------------------------------------------------------
    docs.push(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta("default-deny-ingress", ns, &part_of),
        "spec": { "podSelector": {}, "policyTypes": ["Ingress"] },
    }));
    docs.push(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta("allow-gateway", ns, &part_of),
        "spec": {
            "podSelector": { "matchLabels": gw_sel },
            "policyTypes": ["Ingress"],
            // Clients, from anywhere.
            "ingress": [{ "ports": [{ "protocol": "TCP", "port": GATEWAY_PORT }] }],
        },
    }));
    docs.push(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta("allow-control-plane", ns, &part_of),
        "spec": {
            "podSelector": { "matchLabels": cp_sel },
            "policyTypes": ["Ingress"],
            // Every pod of the system registers, renews its certificate and sends spans.
            "ingress": [{
                "from": [{ "podSelector": { "matchLabels": part_of } }],
                "ports": [{ "protocol": "TCP", "port": CONTROL_PLANE_PORT }],
            }],
        },
    }));
    for (svc, from) in &callers {
        let peers: Vec<Value> = from
            .iter()
            .map(|c| json!({ "podSelector": { "matchLabels": { "shoal.dev/service": c } } }))
            .collect();
        docs.push(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta(&format!("allow-{svc}"), ns, &part_of),
            "spec": {
                "podSelector": { "matchLabels": { "app.kubernetes.io/component": "service", "shoal.dev/service": svc } },
                "policyTypes": ["Ingress"],
                "ingress": [
                    { "from": peers, "ports": [{ "protocol": "TCP", "port": SERVICE_PORT }] },
                    // kubelet's probes come from the node: the health port answers
                    // only /health/live and /health/ready, to anyone.
                    { "ports": [{ "protocol": "TCP", "port": HEALTH_PORT }] },
                ],
            },
        }));
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn repo() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
    }

    fn shop_input() -> Input {
        let r = repo();
        Input {
            system: r.join("shoal.toml"),
            backends: Some(r.join("deploy/k8s/backends.toml")),
            contracts: Some(r.join("shop/contracts")),
            calls: Some(r.join("deploy/k8s/calls.json")),
            image: "shoal:latest".into(),
            namespace: "shoal".into(),
        }
    }

    fn docs(text: &str) -> Vec<Value> {
        text.split("\n---\n")
            .skip(1)
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    #[test]
    fn the_shop_becomes_deployments_with_probes_on_the_health_port_and_policies_from_its_calls() {
        let text = generate(&shop_input()).unwrap();
        assert_eq!(text, generate(&shop_input()).unwrap(), "deterministic");
        let docs = docs(&text);

        let catalog = find(&docs, "Deployment", "catalog");
        assert_eq!(catalog["spec"]["replicas"], 2);
        let c = &catalog["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], "health");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/health/ready");
        let envs = c["env"].as_array().unwrap();
        let var = |n: &str| envs.iter().find(|e| e["name"] == n).cloned();
        assert_eq!(var("SHOAL_HEALTH_LISTEN").unwrap()["value"], "0.0.0.0:8081");
        assert_eq!(var("SHOAL_TLS__MODE").unwrap()["value"], "mutual");
        assert_eq!(var("SHOAL_VERSION").unwrap()["value"], "1.0.0");
        assert_eq!(var("SHOAL_DATABASE__SCHEMA").unwrap()["value"], "catalog");
        assert!(var("SHOAL_DATABASE__URL").unwrap()["valueFrom"]["secretKeyRef"].is_object());
        find(&docs, "PodDisruptionBudget", "catalog");
        assert!(docs
            .iter()
            .all(|d| !(d["kind"] == "PodDisruptionBudget" && d["metadata"]["name"] == "orders")));

        // The canary registers as catalog, in its own version.
        let v2 = find(&docs, "Deployment", "catalog-v2");
        let labels = &v2["spec"]["template"]["metadata"]["labels"];
        assert_eq!(labels["shoal.dev/service"], "catalog");
        assert_eq!(labels["shoal.dev/entry"], "catalog-v2");

        // The fixed host port of inventory gives way to the pod's.
        let inv =
            &find(&docs, "Deployment", "inventory")["spec"]["template"]["spec"]["containers"][0];
        let listen: Vec<_> = inv["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == "SHOAL_LISTEN")
            .collect();
        assert_eq!(listen.len(), 1);
        assert_eq!(listen[0]["value"], "0.0.0.0:7000");

        let from = |svc: &str| -> Vec<String> {
            find(&docs, "NetworkPolicy", &format!("allow-{svc}"))["spec"]["ingress"][0]["from"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    p["podSelector"]["matchLabels"]["shoal.dev/service"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        assert_eq!(
            from("inventory"),
            ["control-plane", "depot", "gateway", "inventory", "orders"]
        );
        assert_eq!(from("depot"), ["control-plane", "inventory"]);
        assert_eq!(from("payment-provider"), ["control-plane", "payments"]);
        assert_eq!(
            from("catalog"),
            ["control-plane", "gateway", "orders", "recommendations"]
        );
        // An app in another language: its sidecar has the probes, the app beside it.
        let rec = &find(&docs, "Deployment", "recommendations")["spec"]["template"]["spec"];
        assert_eq!(
            rec["containers"][0]["args"],
            json!(["sidecar", "recommendations"])
        );
        assert_eq!(
            rec["containers"][0]["readinessProbe"]["httpGet"]["port"],
            "health"
        );
        assert_eq!(rec["containers"][1]["name"], "app");
        assert!(rec["containers"][1].get("readinessProbe").is_none());
        // Bus-only contracts open no connection.
        assert_eq!(from("notifications"), ["control-plane"]);
        find(&docs, "HorizontalPodAutoscaler", "gateway");
        let cm = find(&docs, "ConfigMap", "shoal-system");
        let pod_file = cm["data"]["shoal.toml"].as_str().unwrap();
        assert!(pod_file.contains("\"2.0.0\" = 10"));
        assert!(
            !pod_file.contains("postgres://"),
            "the password stays in the Secret"
        );
        // The pods' copy is a valid system file with the same backends for them.
        let parsed = SystemFile::parse(pod_file, "pod copy").unwrap();
        assert!(parsed.control_plane.registry.etcd.is_some());
        assert!(!parsed.control_plane.broker.enabled);
    }

    #[test]
    fn missing_backends_and_unknown_callers_are_named() {
        let mut input = shop_input();
        input.backends = None;
        let e = generate(&input).unwrap_err();
        assert!(e.message().contains("[backends] postgres"), "{e}");

        let dir = std::env::temp_dir().join(format!("shoal-deploy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let calls = dir.join("calls.json");
        std::fs::write(
            &calls,
            r#"{"calls":[{"from":"nobody","to":"orders","why":"x"}]}"#,
        )
        .unwrap();
        let mut input = shop_input();
        input.calls = Some(calls.clone());
        let e = generate(&input).unwrap_err();
        assert!(e.message().contains("nobody"), "{e}");
        std::fs::write(&calls, r#"{"calls":[{"from":"orders","to":"catalog"}]}"#).unwrap();
        let e = generate(&input).unwrap_err();
        assert!(e.message().contains("calls[0].why"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
