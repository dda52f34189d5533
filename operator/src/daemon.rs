//! The controller's client of the daemon admin API (port 8081): read a pod's state and push its
//! desired skills and adapters. [`DaemonAdmin`] is a trait so reconcile tests can fake daemons;
//! [`HttpDaemonAdmin`] is the real client (plain HTTP/1 with the pool's bearer token).

use std::fmt::Debug;
use std::time::Duration;

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use skillkv_api::admin::{
    DESIRED_PATH, DaemonState, DesiredState, DesiredStateApplied, STATE_PATH,
};

/// Where and how to reach one daemon's admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonEndpoint {
    /// The pod, for logs and errors.
    pub pod: String,
    /// `http://<pod IP>:8081`.
    pub base_url: String,
    /// The bearer token.
    pub token: String,
}

/// Why a daemon admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonAdminError {
    /// No connection or no answer.
    #[error("daemon {pod} is unreachable: {message}")]
    Unreachable {
        /// The pod.
        pod: String,
        /// What the transport said.
        message: String,
    },
    /// The call took longer than the timeout.
    #[error("daemon {pod} did not answer within {timeout:?}")]
    Timeout {
        /// The pod.
        pod: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The daemon already applied a newer desired state (409).
    #[error("daemon {pod} rejected desired generation {generation} as stale")]
    StaleGeneration {
        /// The pod.
        pod: String,
        /// The generation sent.
        generation: u64,
    },
    /// Any other non-success answer.
    #[error("daemon {pod} answered {status}: {body}")]
    Status {
        /// The pod.
        pod: String,
        /// HTTP status.
        status: u16,
        /// The body, for the message.
        body: String,
    },
    /// The answer is not the expected JSON.
    #[error("daemon {pod} sent an unreadable answer: {source}")]
    Decode {
        /// The pod.
        pod: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// The daemon admin operations the controller uses.
pub trait DaemonAdmin: Debug + Send + Sync {
    /// `GET /admin/v1/state`.
    fn state<'a>(
        &'a self,
        endpoint: &'a DaemonEndpoint,
    ) -> BoxFuture<'a, Result<DaemonState, DaemonAdminError>>;
    /// `PUT /admin/v1/desired`.
    fn put_desired<'a>(
        &'a self,
        endpoint: &'a DaemonEndpoint,
        desired: &'a DesiredState,
    ) -> BoxFuture<'a, Result<DesiredStateApplied, DaemonAdminError>>;
}

/// The real admin client.
#[derive(Debug, Clone)]
pub struct HttpDaemonAdmin {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl HttpDaemonAdmin {
    /// A client whose calls time out after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    async fn call(
        &self,
        endpoint: &DaemonEndpoint,
        method: http::Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes), DaemonAdminError> {
        let unreachable = |message: String| DaemonAdminError::Unreachable {
            pod: endpoint.pod.clone(),
            message,
        };
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", endpoint.base_url))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", endpoint.token),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|error| unreachable(error.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| unreachable(error.to_string()))?;
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|error| unreachable(error.to_string()))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| DaemonAdminError::Timeout {
                pod: endpoint.pod.clone(),
                timeout: self.timeout,
            })?
    }
}

fn decode<T: serde::de::DeserializeOwned>(
    pod: &str,
    status: u16,
    bytes: &Bytes,
) -> Result<T, DaemonAdminError> {
    if !(200..300).contains(&status) {
        return Err(DaemonAdminError::Status {
            pod: pod.to_owned(),
            status,
            body: String::from_utf8_lossy(bytes).chars().take(512).collect(),
        });
    }
    serde_json::from_slice(bytes).map_err(|source| DaemonAdminError::Decode {
        pod: pod.to_owned(),
        source,
    })
}

impl DaemonAdmin for HttpDaemonAdmin {
    fn state<'a>(
        &'a self,
        endpoint: &'a DaemonEndpoint,
    ) -> BoxFuture<'a, Result<DaemonState, DaemonAdminError>> {
        Box::pin(async move {
            let (status, bytes) = self
                .call(endpoint, http::Method::GET, STATE_PATH, Vec::new())
                .await?;
            decode(&endpoint.pod, status, &bytes)
        })
    }

    fn put_desired<'a>(
        &'a self,
        endpoint: &'a DaemonEndpoint,
        desired: &'a DesiredState,
    ) -> BoxFuture<'a, Result<DesiredStateApplied, DaemonAdminError>> {
        Box::pin(async move {
            let body = serde_json::to_vec(desired).map_err(|source| DaemonAdminError::Decode {
                pod: endpoint.pod.clone(),
                source,
            })?;
            let (status, bytes) = self
                .call(endpoint, http::Method::PUT, DESIRED_PATH, body)
                .await?;
            if status == 409 {
                return Err(DaemonAdminError::StaleGeneration {
                    pod: endpoint.pod.clone(),
                    generation: desired.generation,
                });
            }
            decode(&endpoint.pod, status, &bytes)
        })
    }
}
