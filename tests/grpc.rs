//! gRPC through the gateway: a real gRPC service (tonic's health service, with a unary and a server-streaming
//! method) behind an HTTP/2 upstream, a real gRPC client (tonic) in front, and the gateway's own refusals shaped as
//! gRPC statuses.

mod common;

use std::net::SocketAddr;

use common::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Starts tonic's health service on loopback with `portcullis.Test` serving.
async fn grpc_service() -> SocketAddr {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("portcullis.Test", tonic_health::ServingStatus::Serving).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        // The reporter lives as long as the server: dropping it would end the Watch streams.
        let _reporter = reporter;
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
    });
    addr
}

fn config(service: SocketAddr, issuer: &TestIssuer, dead: SocketAddr) -> String {
    format!(
        r#"
[listen]
http = "127.0.0.1:0"
admin = "127.0.0.1:0"

[upstreams.grpc]
url = "http://{service}"
protocol = "h2"

[upstreams.down]
url = "http://{dead}"
protocol = "h2"
connect_timeout = "300ms"

{issuer}

[[routes]]
name = "down"
path = "/down.Service/*"
upstream = "down"
auth = "public"

[[routes]]
name = "health"
path = "/grpc.health.v1.Health/*"
upstream = "grpc"
roles_any = ["reader"]
"#,
        issuer = issuer.config()
    )
}

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest { service: service.to_string() }
}

#[tokio::test]
async fn grpc_calls_pass_with_a_token_and_are_refused_as_grpc_statuses_without_one() {
    bounded(async {
        let service = grpc_service().await;
        let issuer = TestIssuer::new();
        let (_hold, dead) = refusing_addr();
        let gw = issuer.gateway(&config(service, &issuer, dead)).await;
        let channel = tonic::transport::Endpoint::from_shared(gw.http_url("")).unwrap().connect().await.unwrap();
        let mut client = HealthClient::new(channel);
        let reader = issuer.token("alice", &["reader"]);

        // Unary, with a valid token.
        let rsp = client.check(with_token(check("portcullis.Test"), Some(&reader))).await.unwrap();
        assert_eq!(rsp.into_inner().status, ServingStatus::Serving as i32);

        // Server streaming: the first message of the watch arrives through the gateway.
        let mut stream = client.watch(with_token(check("portcullis.Test"), Some(&reader))).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.status, ServingStatus::Serving as i32);

        // The service's own status and message (its trailers) arrive intact.
        let e = client.check(with_token(check("no.Such"), Some(&reader))).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("not registered") || e.message().contains("not found"), "{e:?}");

        // The gateway's refusals, as gRPC statuses (HTTP 200 with grpc-status), not HTTP errors.
        let e = client.check(with_token(check("portcullis.Test"), None)).await.unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::Unauthenticated, "unauthorized"), "{e:?}");
        let e = client.check(with_token(check("portcullis.Test"), Some("not-a-token"))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let writer = issuer.token("bob", &["writer"]);
        let e = client.check(with_token(check("portcullis.Test"), Some(&writer))).await.unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::PermissionDenied, "forbidden"), "{e:?}");

        // An upstream that cannot be reached: UNAVAILABLE.
        let down = tonic::transport::Endpoint::from_shared(gw.http_url("")).unwrap().connect().await.unwrap();
        let mut grpc = tonic::client::Grpc::new(down);
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static("/down.Service/Call");
        let e = grpc
            .unary::<HealthCheckRequest, tonic_health::pb::HealthCheckResponse, _>(
                tonic::Request::new(check("x")),
                path,
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");

        // Counted and logged as the refusals they stand for.
        let plain = plain_client();
        let m = metrics(&plain, &gw).await;
        assert!(
            metric(&m, "portcullis_requests_total", &[("route", "health"), ("method", "POST"), ("status", "401")]).unwrap_or(0.0) >= 2.0
        );
        assert_eq!(metric(&m, "portcullis_requests_total", &[("route", "health"), ("method", "POST"), ("status", "403")]), Some(1.0));
        // The clients' connections close first, or the drain waits for them.
        drop((client, grpc, stream));
        gw.stop().await;
    })
    .await;
}
