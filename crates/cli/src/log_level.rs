//! `shoal log-level SERVICE LEVEL` and `shoal log-level SERVICE --reset`.
//!
//! A thin front on the control plane's `/v1/log-levels` (docs/observability.md): the
//! control plane keeps the level and every process of the service applies it to its
//! own log filter within a moment, without a restart.

use clap::{Arg, ArgAction, ArgMatches, Command};
use shoal_core::Error;
use shoal_discovery::RegistryClient;

/// The `log-level` subcommand; `system` and `registry` find the control plane the
/// way `shoal status` does.
pub(crate) fn command(system: Arg, registry: Arg) -> Command {
    Command::new("log-level")
        .about("Change a service's log level at run time, in every one of its processes")
        .long_about(
            "Change a service's log level at run time, in every one of its processes, \
             without a restart. LEVEL is a filter directive: `debug`, `trace`, or per \
             target, `info,sqlx=warn,shop_orders=debug`. --reset goes back to the level \
             each process was configured with. Levels live in the control plane's memory: \
             a restarted control plane forgets them.",
        )
        .arg(system)
        .arg(registry)
        .arg(
            Arg::new("service")
                .required(true)
                .value_name("SERVICE")
                .help("The service (`gateway` for the gateway)"),
        )
        .arg(
            Arg::new("level")
                .value_name("LEVEL")
                .required_unless_present("reset")
                .conflicts_with("reset")
                .help("A filter directive: debug, trace, info,sqlx=warn"),
        )
        .arg(
            Arg::new("reset")
                .long("reset")
                .action(ArgAction::SetTrue)
                .help("Go back to the configured level"),
        )
}

/// Run `shoal log-level`.
pub(crate) async fn run(m: &ArgMatches) -> Result<(), Error> {
    let (url, _) = crate::status::registry_url(m);
    let client = RegistryClient::new(&url)?;
    let service = m
        .get_one::<String>("service")
        .ok_or_else(|| Error::config("missing SERVICE; see shoal log-level --help"))?;
    let result = if m.get_flag("reset") {
        client.reset_log_level(service).await.map(|had| {
            if had {
                println!("{service}: back to its configured log level");
            } else {
                println!("{service}: no log level was set; it runs its configured one");
            }
        })
    } else {
        let level = m
            .get_one::<String>("level")
            .ok_or_else(|| Error::config("missing LEVEL; see shoal log-level --help"))?;
        client
            .set_log_level(service, level)
            .await
            .map(|l| println!("{}: log level {}", l.service, l.level))
    };
    result.map_err(|e| crate::chaos::unreachable_hint(&url, e))
}
