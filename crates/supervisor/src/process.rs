//! Starting, watching, restarting and stopping one process.

use crate::logstore::{pump, LogSink};
use crate::state::{ProcessState, UpState};
use crate::SupervisorConfig;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// What to run.
#[derive(Clone, Debug)]
pub(crate) struct ProcSpec {
    pub(crate) name: String,
    pub(crate) service: Option<String>,
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) cwd: PathBuf,
    pub(crate) log: PathBuf,
}

/// The shared view of every process, mirrored into `up.json`.
#[derive(Clone)]
pub(crate) struct Board {
    pub(crate) state: Arc<Mutex<UpState>>,
    pub(crate) path: PathBuf,
}

impl Board {
    pub(crate) fn update(&self, name: &str, f: impl FnOnce(&mut ProcessState)) {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = st.processes.iter_mut().find(|p| p.name == name) {
            f(p);
        }
        if let Err(e) = st.write(&self.path) {
            eprintln!("shoal: cannot write {}: {e}", self.path.display());
        }
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".into(),
    }
}

/// The process's output pumps: its stdout and stderr read into its log sink.
struct Pumps(Vec<tokio::task::JoinHandle<()>>);

impl Pumps {
    /// Wait for the pumps to reach the end of the pipes (the child has exited), at
    /// most `limit`: a grandchild that inherited the pipes could keep them open
    /// forever, and then the rest of its output is not this process's anyway.
    async fn finish(self, limit: Duration) {
        for mut p in self.0 {
            if tokio::time::timeout(limit, &mut p).await.is_err() {
                p.abort();
            }
        }
    }
}

fn spawn(spec: &ProcSpec, sink: &Arc<LogSink>) -> std::io::Result<(Child, Pumps)> {
    let mut cmd = Command::new(&spec.argv[0]);
    // Pipes, not the log file itself: the supervisor owns the file, so it can rotate
    // it between whole lines (see logstore.rs).
    cmd.args(&spec.argv[1..])
        .current_dir(&spec.cwd)
        .envs(spec.env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a Ctrl-C in the terminal reaches the supervisor
        // only, which then stops everything in order.
        .process_group(0);
    set_parent_death_signal(&mut cmd);
    let mut child = cmd.spawn()?;
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(tokio::spawn(pump(out, sink.clone())));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(tokio::spawn(pump(err, sink.clone())));
    }
    Ok((child, Pumps(pumps)))
}

/// Open the process's log sink; labels for the supervisor's own lines come from the
/// file name (`catalog-1`) and the service (`catalog`).
fn open_sink(spec: &ProcSpec, cfg: &SupervisorConfig) -> std::io::Result<Arc<LogSink>> {
    let instance = spec
        .log
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.name.clone());
    let service = spec.service.clone().unwrap_or_else(|| spec.name.clone());
    LogSink::start(&spec.log, cfg.logs.clone(), &service, &instance).map(Arc::new)
}

/// Write out the sink's queue and stop its writer, off the runtime's threads.
async fn close_sink(sink: Option<Arc<LogSink>>) {
    if let Some(sink) = sink.and_then(Arc::into_inner) {
        let _ = tokio::task::spawn_blocking(move || sink.close()).await;
    }
}

/// Ask the kernel to SIGKILL the child if the supervisor dies, even by SIGKILL, so a
/// killed `shoal up` leaves no orphans.
#[allow(unsafe_code)]
fn set_parent_death_signal(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it is
    // the only call made between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// SIGTERM, then SIGKILL after `limit`.
async fn stop(child: &mut Child, name: &str, limit: Duration) {
    if let Some(pid) = child.id() {
        // SIGTERM asks for the graceful path (deregister, drain).
        send_signal(pid, libc::SIGTERM);
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(_) => return,
            Err(_) => eprintln!(
                "shoal: {name} did not stop within {} ms; killing it",
                limit.as_millis()
            ),
        }
    }
    let _ = child.kill().await;
}

/// Send a signal to one process.
#[allow(unsafe_code)]
pub(crate) fn send_signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// How long the output pumps get to read what an exited process left in its pipes.
const PUMP_DRAIN: Duration = Duration::from_secs(2);

/// Resolves once `rx` says stop (the guard `wait_for` returns is dropped here, so
/// callers stay `Send`).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Run `spec` until `stop_rx` says stop, restarting it whenever it dies.
pub(crate) async fn supervise(
    spec: ProcSpec,
    cfg: SupervisorConfig,
    board: Board,
    mut stop_rx: watch::Receiver<bool>,
) {
    let initial = Duration::from_millis(cfg.restart_backoff_initial_ms);
    let max = Duration::from_millis(cfg.restart_backoff_max_ms);
    let window = Duration::from_millis(cfg.crash_loop_window_ms);
    let mut backoff = initial;
    let mut recent: VecDeque<Instant> = VecDeque::new();
    let mut restarts = 0u32;
    // One sink for the life of this supervision, restarts included: the rotation
    // state and the queue carry over. Opened again at the next start if it failed.
    let mut sink: Option<Arc<LogSink>> = None;
    loop {
        if *stop_rx.borrow() {
            board.update(&spec.name, |p| {
                p.state = "stopped".into();
                p.pid = None;
            });
            close_sink(sink).await;
            return;
        }
        let started = Instant::now();
        let spawned = match &sink {
            Some(s) => Ok(s.clone()),
            None => open_sink(&spec, &cfg).inspect(|s| sink = Some(s.clone())),
        }
        .map_err(|e| format!("cannot open its log {}: {e}", spec.log.display()))
        .and_then(|s| {
            spawn(&spec, &s).map_err(|e| format!("could not start {:?}: {e}", spec.argv[0]))
        });
        let exit = match spawned {
            Ok((mut child, pumps)) => {
                let pid = child.id();
                board.update(&spec.name, |p| {
                    p.pid = pid;
                    p.state = "running".into();
                });
                tokio::select! {
                    status = child.wait() => {
                        pumps.finish(PUMP_DRAIN).await;
                        match status {
                            Ok(s) => describe(s),
                            Err(e) => format!("wait failed: {e}"),
                        }
                    },
                    _ = stopped(&mut stop_rx) => {
                        stop(&mut child, &spec.name, Duration::from_millis(cfg.stop_timeout_ms)).await;
                        pumps.finish(PUMP_DRAIN).await;
                        board.update(&spec.name, |p| {
                            p.state = "stopped".into();
                            p.pid = None;
                        });
                        close_sink(sink).await;
                        return;
                    }
                }
            }
            Err(e) => e,
        };
        if *stop_rx.borrow() {
            continue;
        }
        if started.elapsed() >= Duration::from_millis(cfg.stable_after_ms) {
            backoff = initial;
        }
        let now = Instant::now();
        recent.push_back(now);
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            recent.pop_front();
        }
        let crash_loop = recent.len() >= cfg.crash_loop_restarts;
        restarts += 1;
        let state = if crash_loop {
            "crash-loop"
        } else {
            "restarting"
        };
        eprintln!(
            "shoal: {} exited ({exit}); restart {restarts} in {} ms{}",
            spec.name,
            backoff.as_millis(),
            if crash_loop {
                format!(
                    " — CRASH LOOP: {} restarts within {} s, see {}",
                    recent.len(),
                    window.as_secs(),
                    spec.log.display()
                )
            } else {
                String::new()
            }
        );
        board.update(&spec.name, |p| {
            p.pid = None;
            p.state = state.into();
            p.restarts = restarts;
            p.last_exit = Some(exit.clone());
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop_rx) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}
