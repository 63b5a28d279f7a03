//! `shoal sidecar SERVICE`: run the sidecar of an app written in any language
//! (docs/sidecar.md). Its config is a service's (`SHOAL_*`, `SHOAL_CONFIG`), its
//! own keys in `[settings]`.

use clap::{Arg, ArgMatches, Command};
use shoal_core::Error;

/// The `sidecar` subcommand.
pub(crate) fn command() -> Command {
    Command::new("sidecar")
        .about("Run the sidecar of an app in any language: registration, health, mTLS, resilience, traces, metrics")
        .long_about(
            "Run beside an app listening on 127.0.0.1 (settings.app_addr): the sidecar \
             registers as SERVICE, serves its callers over the service's [tls], forwards \
             their requests to the app, reports the app's health path as its readiness, \
             and listens on settings.outbound_listen for the app's own calls \
             (http://127.0.0.1:PORT/<service>/<path>), which go out balanced, under the \
             [resilience] policy and over mTLS. Config as for any service: SHOAL_CONFIG, \
             SHOAL_* variables. See docs/sidecar.md.",
        )
        .arg(
            Arg::new("service")
                .required(true)
                .value_name("SERVICE")
                .help("The service name the app registers under"),
        )
        .arg(
            Arg::new("version")
                .long("version")
                .value_name("VERSION")
                .help("The version it registers (SHOAL_VERSION overrides)"),
        )
}

/// Run until SIGTERM or SIGINT.
pub(crate) async fn run(m: &ArgMatches) -> Result<(), Error> {
    let name = m
        .get_one::<String>("service")
        .map(String::as_str)
        .unwrap_or_default();
    let mut service = shoal_sidecar::service(name);
    if let Some(v) = m.get_one::<String>("version") {
        service = service.version(v);
    }
    service.run().await
}
