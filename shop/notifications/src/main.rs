//! The notifications service's process: see the `shop_notifications` library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop_notifications::service().main().await
}
