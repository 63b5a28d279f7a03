//! The shipping service's process: see the `shop_shipping` library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop_shipping::service().main().await
}
