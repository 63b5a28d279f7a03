//! The legacy service's process: see the `shop_legacy` library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop_legacy::service().main().await
}
