//! The depot service's process: see the `shop_depot` library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop_depot::service().main().await
}
