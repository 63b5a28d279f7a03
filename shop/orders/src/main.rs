//! The orders service's process: see the `shop_orders` library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop_orders::service().main().await
}
