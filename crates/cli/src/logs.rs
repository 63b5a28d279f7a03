//! `shoal logs`: the log store of `shoal up` (`<state_dir>/logs/`), merged, filtered
//! and printed. Reading, merging and filtering are `shoal_telemetry::logread`'s,
//! shared with the control plane's log search (`GET /v1/logs`); this file is the
//! command line around them and `--follow`.

use clap::{Arg, ArgAction, ArgMatches, Command};
use shoal_core::Error;
use shoal_supervisor::SystemFile;
use shoal_telemetry::logread::{self, level_rank, Filter, Record, Stream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often `--follow` looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Most bytes `--follow` reads from one stream per poll, so one chatty process
/// cannot hold the others' lines back for long.
const FOLLOW_BYTES_PER_POLL: usize = 4 * 1024 * 1024;
/// Largest `--limit`.
const MAX_LIMIT: u64 = 1_000_000;

/// The `logs` subcommand.
pub(crate) fn command(system: Arg) -> Command {
    Command::new("logs")
        .about("Show the logs of `shoal up`'s processes, merged in time order and filtered")
        .long_about(
            "Show the logs `shoal up` keeps in <state_dir>/logs/ (rotated files \
             included), merged in time order. Without SERVICE, every process's; with it, \
             the processes of that service (every replica and version; `gateway` and \
             `control-plane` for those). Lines print as `ts level service/instance \
             message key=value…`; a line that is not JSON (a panic) prints as it is, \
             after its process's name.",
        )
        .arg(system)
        .arg(
            Arg::new("service")
                .value_name("SERVICE")
                .help("Only this service's processes"),
        )
        .arg(
            Arg::new("level")
                .long("level")
                .value_name("LEVEL")
                .value_parser(|s: &str| {
                    level_rank(s)
                        .map(|_| s.to_string())
                        .ok_or_else(|| "one of trace, debug, info, warn, error".to_string())
                })
                .help("Only lines at this level or above (trace, debug, info, warn, error)"),
        )
        .arg(
            Arg::new("trace")
                .long("trace")
                .value_name("ID")
                .help("Only lines of this trace (their `trace_id`)"),
        )
        .arg(Arg::new("since").long("since").value_name("TIME").help(
            "Only lines since TIME: RFC 3339 (2026-11-23T14:29:18Z) or ago (90s, 10m, 2h, 1d)",
        ))
        .arg(
            Arg::new("grep")
                .long("grep")
                .value_name("TEXT")
                .help("Only lines whose message or any field contains TEXT"),
        )
        .arg(
            Arg::new("follow")
                .long("follow")
                .short('f')
                .action(ArgAction::SetTrue)
                .help("Keep printing new lines as they are written, until Ctrl-C"),
        )
        .arg(
            Arg::new("limit")
                .long("limit")
                .short('n')
                .value_name("N")
                .value_parser(clap::value_parser!(u64).range(1..=MAX_LIMIT))
                .help("Only the last N matching lines (before following)"),
        )
        .arg(
            Arg::new("json")
                .long("json")
                .action(ArgAction::SetTrue)
                .help("Print the lines as they are stored (JSON), not the compact form"),
        )
}

/// The folder of the log store, from the system file (`state_dir`), as `up` makes it.
pub(crate) fn log_dir(system: &Path, sys: Option<&SystemFile>) -> PathBuf {
    let root = system
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let state_dir = sys
        .map(|s| s.supervisor.state_dir.clone())
        .unwrap_or_else(|| ".shoal".into());
    root.join(state_dir).join("logs")
}

/// The system file's entries that register as `service` (its versions), whose
/// replicas' files `shoal logs SERVICE` reads too.
pub(crate) fn entries_of(sys: &SystemFile, service: &str) -> Vec<String> {
    sys.services
        .iter()
        .filter(|(k, spec)| spec.registers_as(k) == service)
        .map(|(k, _)| k.clone())
        .collect()
}

/// Prints records and counts the lines that were not JSON and hidden by a filter.
struct Printer {
    filter: Filter,
    json: bool,
    hidden_text: u64,
}

impl Printer {
    fn text(&self, r: &Record) -> String {
        if self.json {
            r.raw().to_string()
        } else {
            r.human()
        }
    }

    fn line(&mut self, r: &Record) -> Option<String> {
        if !self.filter.matches(r) {
            if r.json().is_none() {
                self.hidden_text += 1;
            }
            return None;
        }
        Some(self.text(r))
    }

    fn note(&self) {
        if self.hidden_text > 0 {
            eprintln!(
                "shoal: {} line(s) that are not JSON (panics, early errors) did not match the filters and were not shown",
                self.hidden_text
            );
        }
    }
}

/// Run `shoal logs`.
pub(crate) async fn run(m: &ArgMatches) -> Result<(), Error> {
    let system = PathBuf::from(
        m.get_one::<String>("system")
            .map(String::as_str)
            .unwrap_or("shoal.toml"),
    );
    let sys = SystemFile::load(&system).ok();
    let dir = log_dir(&system, sys.as_ref());
    let service = m.get_one::<String>("service").cloned();
    let entries: Vec<String> = match (&sys, &service) {
        (Some(sys), Some(s)) => entries_of(sys, s),
        _ => Vec::new(),
    };
    let filter = Filter {
        min_level: m.get_one::<String>("level").and_then(|l| level_rank(l)),
        trace: m.get_one::<String>("trace").cloned(),
        since_ms: m
            .get_one::<String>("since")
            .map(|s| logread::parse_since(s, shoal_core::unix_ms()))
            .transpose()
            .map_err(|e| Error::config(format!("--since {e}")))?,
        grep: m.get_one::<String>("grep").cloned(),
    };
    let follow = m.get_flag("follow");
    let limit = m.get_one::<u64>("limit").map(|n| *n as usize);
    let mut printer = Printer {
        filter,
        json: m.get_flag("json"),
        hidden_text: 0,
    };
    let wanted = |process: &str| {
        service
            .as_deref()
            .is_none_or(|s| logread::selected(process, s, &entries))
    };
    let list = || -> Result<Vec<Stream>, Error> {
        logread::streams(&dir, wanted).map_err(|e| {
            Error::config(format!(
                "no logs in {} (has `shoal up` run here?)",
                dir.display()
            ))
            .with_source(e)
        })
    };
    let mut streams = list()?;
    if streams.is_empty() && !follow {
        let what = service.as_deref().unwrap_or("any process");
        return Err(Error::config(format!(
            "no log files of {what} in {}",
            dir.display()
        )));
    }

    match limit {
        Some(n) => {
            let tail = logread::tail(&mut streams, &printer.filter, !follow, n);
            printer.hidden_text += tail.hidden_text;
            for r in &tail.records {
                println!("{}", printer.text(r));
            }
        }
        None => logread::merge(&mut streams, !follow, |r| {
            if let Some(line) = printer.line(&r) {
                println!("{line}");
            }
        }),
    }
    if !follow {
        printer.note();
        return Ok(());
    }

    let stop = shoal_core::shutdown::signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
        }
        // Processes started since (a new replica) join the merge.
        if let Ok(now) = list() {
            for s in now {
                if !streams.iter().any(|o| o.process() == s.process()) {
                    streams.push(s);
                }
            }
        }
        let mut batch = Vec::new();
        for s in &mut streams {
            s.check_rotation();
            let mut bytes = 0;
            while bytes < FOLLOW_BYTES_PER_POLL {
                let Some(r) = s.next_line(false) else { break };
                bytes += r.raw().len() + 1;
                batch.push(r);
            }
        }
        // Stable: lines of one stream with one time stay in their order.
        batch.sort_by_key(Record::ts_ms);
        for r in &batch {
            if let Some(line) = printer.line(r) {
                println!("{line}");
            }
        }
    }
    printer.note();
    Ok(())
}
