//! `shoal chaos`: add, list and remove run-time faults.
//!
//! A thin front on the control plane's `/v1/faults` (see `docs/resilience.md`): the
//! control plane keeps the rules and every process applies them, so this command
//! only talks to the control plane, found the same way as by `shoal status`.

use clap::{Arg, ArgAction, ArgGroup, ArgMatches, Command};
use shoal_core::resilience::{FaultKind, FaultList, FaultRule};
use shoal_core::{Error, ErrorKind, Origin};
use shoal_discovery::RegistryClient;
use std::time::Duration;

/// The `chaos` subcommand and its own subcommands. `system` and `registry` are the
/// flags `shoal status` takes, to find the control plane the same way.
pub(crate) fn command(system: Arg, registry: Arg) -> Command {
    Command::new("chaos")
        .about("Inject faults into a service's requests at run time: delays, errors, aborts")
        .subcommand_required(true)
        .arg_required_else_help(true)
        .arg(system.global(true))
        .arg(registry.global(true))
        .subcommand(
            Command::new("add")
                .about("Add a fault rule to a service")
                .arg(
                    Arg::new("service")
                        .required(true)
                        .value_name("SERVICE")
                        .help("The service whose incoming requests are hit (`gateway` for the gateway)"),
                )
                .arg(
                    Arg::new("delay-ms")
                        .long("delay-ms")
                        .value_name("N")
                        .value_parser(clap::value_parser!(u64))
                        .help("Hold each hit request N milliseconds, then serve it"),
                )
                .arg(
                    Arg::new("error")
                        .long("error")
                        .value_name("STATUS")
                        .value_parser(clap::value_parser!(u16))
                        .help("Answer each hit request with this 4xx or 5xx status"),
                )
                .arg(
                    Arg::new("abort")
                        .long("abort")
                        .action(ArgAction::SetTrue)
                        .help("Close each hit request's connection without an answer"),
                )
                .group(
                    ArgGroup::new("fault")
                        .args(["delay-ms", "error", "abort"])
                        .required(true),
                )
                .arg(
                    Arg::new("route")
                        .long("route")
                        .value_name("PREFIX")
                        .help("Only requests whose path starts with PREFIX (whole segments)"),
                )
                .arg(
                    Arg::new("percent")
                        .long("percent")
                        .value_name("P")
                        .value_parser(clap::value_parser!(f64))
                        .help("Share of matching requests hit, 0 to 100 [default: 100]"),
                )
                .arg(
                    Arg::new("for")
                        .long("for")
                        .value_name("DURATION")
                        .value_parser(parse_duration_ms)
                        .help("Remove the rule after this long (500ms, 30s, 2m, 1h) [default: until removed]"),
                ),
        )
        .subcommand(
            Command::new("list")
                .about("List the fault rules in force")
                .arg(
                    Arg::new("json")
                        .long("json")
                        .action(ArgAction::SetTrue)
                        .help("Machine-readable output"),
                ),
        )
        .subcommand(
            Command::new("remove")
                .about("Remove one fault rule")
                .arg(
                    Arg::new("id")
                        .required(true)
                        .value_name("ID")
                        .help("The rule's id, as `shoal chaos list` shows it"),
                ),
        )
        .subcommand(
            Command::new("clear")
                .about("Remove every fault rule, or every rule of one service")
                .arg(
                    Arg::new("service")
                        .value_name("SERVICE")
                        .help("Only this service's rules"),
                ),
        )
}

/// Run `shoal chaos <subcommand>`.
pub(crate) async fn run(m: &ArgMatches) -> Result<(), Error> {
    let Some((name, sub)) = m.subcommand() else {
        return Err(Error::config("missing subcommand; see shoal chaos --help"));
    };
    let (url, _) = crate::status::registry_url(sub);
    let client = RegistryClient::new(&url)?;
    let result = match name {
        "add" => add(&client, sub).await,
        "list" => list(&client, sub).await,
        "remove" => remove(&client, sub).await,
        "clear" => clear(&client, sub).await,
        _ => Err(Error::config(format!(
            "unknown command chaos {name}; see shoal chaos --help"
        ))),
    };
    result.map_err(|e| unreachable_hint(&url, e))
}

/// A control plane that did not answer gets a hint; an answer it gave (a refused
/// rule, an unknown id) is shown as it is.
pub(crate) fn unreachable_hint(url: &str, e: Error) -> Error {
    let no_answer = e.kind() == ErrorKind::Timeout
        || (e.kind() == ErrorKind::Unavailable && std::error::Error::source(&e).is_some());
    if no_answer {
        Error::unavailable(format!(
            "control plane at {url} did not answer; is `shoal up` running?"
        ))
        .with_source(e)
    } else {
        e
    }
}

/// `500ms`, `30s`, `2m`, `1h` as milliseconds.
fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} needs a unit: 500ms, 30s, 2m or 1h"))?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s, 2m or 1h"))?;
    let factor = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use ms, s, m or h (500ms, 30s, 2m, 1h)"
            ))
        }
    };
    let ms = n
        .checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too long"))?;
    if ms == 0 {
        return Err("a duration must be more than 0".into());
    }
    Ok(ms)
}

/// A length of time for people: `750ms`, `45s`, `2m05s`, `1h30m`.
fn human_ms(ms: u64) -> String {
    let s = ms / 1_000;
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{s}s"),
        60_000..=3_599_999 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3_600, (s % 3_600) / 60),
    }
}

fn kind_name(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::Delay => "delay",
        FaultKind::Error => "error",
        FaultKind::Abort => "abort",
    }
}

/// What the rule does to a request, in a few words.
fn detail(rule: &FaultRule) -> String {
    match rule.kind {
        FaultKind::Delay => format!("+{}", human_ms(rule.delay_ms.unwrap_or(0))),
        FaultKind::Error => format!("status {}", rule.status.unwrap_or(500)),
        FaultKind::Abort => "close connection".into(),
    }
}

fn expires_in(rule: &FaultRule, now_ms: u64) -> String {
    match rule.expires_at_ms {
        None => "never".into(),
        Some(at) if at <= now_ms => "expired".into(),
        Some(at) => human_ms(at - now_ms),
    }
}

/// One line: `f-3: payment /api/pay: delay +200ms on 50% of requests, for 30s`.
fn summary(rule: &FaultRule) -> String {
    let what = match rule.kind {
        FaultKind::Delay => format!("delay {}", detail(rule)),
        FaultKind::Error => format!("answer {}", detail(rule)),
        FaultKind::Abort => "abort (close connection)".into(),
    };
    let lasts = match rule.duration_ms {
        Some(d) => format!("for {}", human_ms(d)),
        None => "until removed".into(),
    };
    format!(
        "{}: {} {}: {what} on {}% of requests, {lasts}",
        rule.id,
        rule.service,
        rule.route.as_deref().unwrap_or("(all routes)"),
        rule.percent
    )
}

async fn add(client: &RegistryClient, m: &ArgMatches) -> Result<(), Error> {
    let service = m
        .get_one::<String>("service")
        .cloned()
        .ok_or_else(|| Error::config("missing SERVICE; see shoal chaos add --help"))?;
    let delay_ms = m.get_one::<u64>("delay-ms").copied();
    let status = m.get_one::<u16>("error").copied();
    let kind = match (delay_ms, status, m.get_flag("abort")) {
        (Some(_), None, false) => FaultKind::Delay,
        (None, Some(_), false) => FaultKind::Error,
        (None, None, true) => FaultKind::Abort,
        _ => {
            return Err(Error::config(
                "give exactly one of --delay-ms, --error and --abort",
            ))
        }
    };
    let rule = FaultRule {
        id: String::new(),
        service,
        route: m.get_one::<String>("route").cloned(),
        kind,
        delay_ms,
        status,
        percent: m.get_one::<f64>("percent").copied().unwrap_or(100.0),
        duration_ms: m.get_one::<u64>("for").copied(),
        expires_at_ms: None,
    };
    // Checked here too, so a mistake is named before anything is sent.
    rule.validate().map_err(|e| {
        Error::new(
            ErrorKind::InvalidInput,
            Origin::Downstream,
            format!("invalid fault rule: {e}"),
        )
    })?;
    let added = client.add_fault(&rule).await?;
    println!("added {}", summary(&added));
    Ok(())
}

async fn list(client: &RegistryClient, m: &ArgMatches) -> Result<(), Error> {
    let FaultList { index, faults } = client.faults(None, None, Duration::ZERO).await?;
    if m.get_flag("json") {
        let out = FaultList { index, faults };
        let text = serde_json::to_string_pretty(&out)
            .map_err(|e| Error::internal("encoding fault list").with_source(e))?;
        println!("{text}");
        return Ok(());
    }
    if faults.is_empty() {
        println!("no faults in force");
        return Ok(());
    }
    let now_ms = shoal_core::unix_ms();
    println!(
        "{:<8} {:<14} {:<20} {:<6} {:<18} {:>7}  EXPIRES IN",
        "ID", "SERVICE", "ROUTE", "KIND", "DETAIL", "PERCENT"
    );
    for f in &faults {
        println!(
            "{:<8} {:<14} {:<20} {:<6} {:<18} {:>7}  {}",
            f.id,
            f.service,
            f.route.as_deref().unwrap_or("*"),
            kind_name(f.kind),
            detail(f),
            format!("{}%", f.percent),
            expires_in(f, now_ms)
        );
    }
    Ok(())
}

async fn remove(client: &RegistryClient, m: &ArgMatches) -> Result<(), Error> {
    let id = m
        .get_one::<String>("id")
        .ok_or_else(|| Error::config("missing ID; see shoal chaos remove --help"))?;
    if client.remove_fault(id).await? {
        println!("removed {id}");
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::NotFound,
            Origin::Downstream,
            format!("no fault with id {id:?} (removed or expired already); see `shoal chaos list`"),
        ))
    }
}

async fn clear(client: &RegistryClient, m: &ArgMatches) -> Result<(), Error> {
    let service = m.get_one::<String>("service").map(String::as_str);
    let removed = client.clear_faults(service).await?;
    let rules = if removed == 1 { "rule" } else { "rules" };
    match service {
        Some(s) => println!("removed {removed} fault {rules} of {s}"),
        None => println!("removed {removed} fault {rules}"),
    }
    Ok(())
}
