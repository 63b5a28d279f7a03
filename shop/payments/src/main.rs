//! The payments service's process: see the `shop_payments` library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop_payments::service().main().await
}
