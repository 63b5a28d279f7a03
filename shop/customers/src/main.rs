//! The customers service's process: see the `shop_customers` library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop_customers::service().main().await
}
