//! A real gRPC service for benchmarks/grpc.sh: tonic's health service (`grpc.health.v1.Health`, unary `Check` and
//! streaming `Watch`) on the address given as the first argument, with the service `bench` serving.
//!
//! `cargo run --release --example grpc_health -- 127.0.0.1:50051`

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:50051".into());
    let addr: std::net::SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("grpc_health: bad address {addr:?}: {e}");
            std::process::exit(2);
        }
    };
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("bench", tonic_health::ServingStatus::Serving).await;
    if let Err(e) = tonic::transport::Server::builder().add_service(service).serve(addr).await {
        eprintln!("grpc_health: {e}");
        std::process::exit(1);
    }
}
