//! The catalog service's process: see the `shop_catalog` library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shop_catalog::service().main().await
}
