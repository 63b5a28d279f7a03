//! The identity service's process: see the `shop_identity` library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop_identity::service().main().await
}
