//! The inventory service's process: see the `shop_inventory` library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop_inventory::service().main().await
}
