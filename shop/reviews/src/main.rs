//! The reviews service's process: see the `shop_reviews` library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop_reviews::service().main().await
}
