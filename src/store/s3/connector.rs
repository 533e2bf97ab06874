//! The SDK's HTTP client is our `reqwest` client (rustls with ring, system roots, the
//! `[http]` timeouts and pool): one HTTP/TLS stack in the binary, and `--ca-bundle` /
//! `--insecure-skip-tls-verify` set in one place. The SDK signs and retries; this only moves
//! the signed request and hands back the response, streaming both bodies.

use aws_sdk_s3::config::http::HttpResponse;
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;

#[derive(Debug, Clone)]
pub struct ReqwestConnector {
    client: reqwest::Client,
}

impl ReqwestConnector {
    pub fn new(client: reqwest::Client) -> Self {
        ReqwestConnector { client }
    }
}

/// A transport failure as the SDK's retry policy understands it: timeouts and I/O errors are
/// retried, anything else is not. The message keeps the whole cause chain.
fn connector_error(e: reqwest::Error) -> ConnectorError {
    let msg = crate::store::http::error_chain("HTTP", &e);
    let boxed: Box<dyn std::error::Error + Send + Sync> = msg.into();
    if e.is_timeout() {
        ConnectorError::timeout(boxed)
    } else if e.is_builder() {
        ConnectorError::user(boxed)
    } else {
        ConnectorError::io(boxed)
    }
}

impl HttpConnector for ReqwestConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let client = self.client.clone();
        HttpConnectorFuture::new(async move {
            let request = request
                .try_into_http1x()
                .map_err(|e| ConnectorError::user(Box::new(e)))?;
            let (parts, body) = request.into_parts();
            let request = http::Request::from_parts(parts, reqwest::Body::wrap(body));
            let request = reqwest::Request::try_from(request).map_err(connector_error)?;
            let response = client.execute(request).await.map_err(connector_error)?;
            let (parts, body) = http::Response::<reqwest::Body>::from(response).into_parts();
            let response = http::Response::from_parts(parts, SdkBody::from_body_1_x(body));
            HttpResponse::try_from(response).map_err(|e| ConnectorError::other(Box::new(e), None))
        })
    }
}

impl HttpClient for ReqwestConnector {
    fn http_connector(&self, _: &HttpConnectorSettings, _: &RuntimeComponents) -> SharedHttpConnector {
        // Timeouts are the reqwest client's (`[http]`), the same for every request.
        SharedHttpConnector::new(self.clone())
    }
}
