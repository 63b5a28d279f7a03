//! The payment provider's process: see the `shop_payment_provider` library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop_payment_provider::service().main().await
}
