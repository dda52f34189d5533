//! One task per daemon following its admin API: open `GET /admin/v1/events`, read the
//! `GET /admin/v1/state` snapshot, then apply events as they come. While the stream is down
//! the pod is unhealthy; the task reconnects with exponential backoff (reset after a session
//! that lasted) and rebuilds from a fresh snapshot after `eventsMissed`. [`Followers`] owns
//! those tasks: one per member of the fleet, started when a pod joins, aborted when it leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use skillkv_api::admin::{AdminEvent, DaemonState, EVENTS_PATH, STATE_PATH};

use super::Pod;
use super::membership::MembershipChange;
use super::sse::SseParser;
use crate::client::{Upstream, get_request};

/// First wait before reconnecting.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// Why following a daemon's admin API stopped.
#[derive(Debug, thiserror::Error)]
pub enum FollowDaemonError {
    /// The URL could not be formed.
    #[error("invalid admin URL")]
    Url(#[source] axum::http::Error),
    /// The connection or request failed.
    #[error("request to the admin API failed")]
    Request(#[source] hyper_util::client::legacy::Error),
    /// The daemon answered with an error status.
    #[error("the admin API answered {status}")]
    Status {
        /// The status.
        status: StatusCode,
    },
    /// Reading the body failed.
    #[error("reading the admin API's answer failed")]
    Body(#[source] hyper::Error),
    /// The snapshot is not a `DaemonState`.
    #[error("the admin API's answer is not valid JSON of the expected shape")]
    Decode(#[source] serde_json::Error),
    /// The event stream ended.
    #[error("the event stream ended")]
    Ended,
}

/// The follow tasks of the fleet's pods, by pod index; aborted when dropped.
#[derive(Debug)]
pub struct Followers {
    client: Upstream,
    max_backoff: Duration,
    tasks: Mutex<HashMap<usize, tokio::task::JoinHandle<()>>>,
}

impl Followers {
    /// No tasks yet; each will reconnect with at most `max_backoff` between tries.
    pub fn new(client: Upstream, max_backoff: Duration) -> Self {
        Self {
            client,
            max_backoff,
            tasks: Mutex::default(),
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<usize, tokio::task::JoinHandle<()>>> {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts following `pods` (pods already followed are left alone).
    pub fn start(&self, pods: &[Arc<Pod>]) {
        let mut tasks = self.tasks();
        for pod in pods {
            tasks.entry(pod.index).or_insert_with(|| {
                tokio::spawn(follow(pod.clone(), self.client.clone(), self.max_backoff))
            });
        }
    }

    /// Stops following the pods that left and starts following those that joined.
    pub fn apply(&self, change: &MembershipChange) {
        {
            let mut tasks = self.tasks();
            for pod in &change.removed {
                if let Some(task) = tasks.remove(&pod.index) {
                    task.abort();
                }
            }
        }
        self.start(&change.added);
    }

    /// Pods followed now.
    pub fn len(&self) -> usize {
        self.tasks().len()
    }

    /// Whether no pod is followed.
    pub fn is_empty(&self) -> bool {
        self.tasks().is_empty()
    }

    /// Stops every task.
    pub fn stop_all(&self) {
        for (_, task) in self.tasks().drain() {
            task.abort();
        }
    }
}

impl Drop for Followers {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Follows `pod`'s admin API until the task is aborted.
pub async fn follow(pod: Arc<Pod>, client: Upstream, max_backoff: Duration) {
    let Some(admin_url) = pod.backend.admin_url.clone() else {
        return;
    };
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let started = Instant::now();
        let error = session(&pod, &client, &admin_url).await;
        let was_up = pod.state().stream_up;
        pod.stream_down();
        if started.elapsed() >= STABLE_SESSION {
            backoff = INITIAL_BACKOFF;
        }
        if was_up {
            tracing::warn!(pod = %pod.backend.name, error = %error, "admin event stream lost; pod unhealthy");
        } else {
            tracing::debug!(pod = %pod.backend.name, error = %error, retry_ms = backoff.as_millis() as u64, "admin API unreachable");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(max_backoff);
    }
}

async fn get_json<T: DeserializeOwned>(
    client: &Upstream,
    url: &str,
    token: Option<&str>,
) -> Result<T, FollowDaemonError> {
    let request = get_request(url, token).map_err(FollowDaemonError::Url)?;
    let response = client
        .request(request)
        .await
        .map_err(FollowDaemonError::Request)?;
    if response.status() != StatusCode::OK {
        return Err(FollowDaemonError::Status {
            status: response.status(),
        });
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(FollowDaemonError::Body)?
        .to_bytes();
    serde_json::from_slice(&body).map_err(FollowDaemonError::Decode)
}

/// One connection: returns why it ended.
async fn session(pod: &Pod, client: &Upstream, admin_url: &str) -> FollowDaemonError {
    match run_session(pod, client, admin_url).await {
        Ok(()) => FollowDaemonError::Ended,
        Err(error) => error,
    }
}

async fn run_session(
    pod: &Pod,
    client: &Upstream,
    admin_url: &str,
) -> Result<(), FollowDaemonError> {
    let token = pod.backend.admin_token.as_deref();
    let state_url = format!("{admin_url}{STATE_PATH}");
    // Subscribe first, then read the snapshot: nothing between the two is lost.
    let request =
        get_request(&format!("{admin_url}{EVENTS_PATH}"), token).map_err(FollowDaemonError::Url)?;
    let response = client
        .request(request)
        .await
        .map_err(FollowDaemonError::Request)?;
    if response.status() != StatusCode::OK {
        return Err(FollowDaemonError::Status {
            status: response.status(),
        });
    }
    let snapshot: DaemonState = get_json(client, &state_url, token).await?;
    tracing::info!(pod = %pod.backend.name, model = %snapshot.model.id, skills = snapshot.skills.len(), "following daemon");
    pod.apply_snapshot(snapshot);
    let mut body = response.into_body();
    let mut parser = SseParser::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(FollowDaemonError::Body)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for record in parser.feed(&data) {
            let event: AdminEvent = match serde_json::from_str(&record.data) {
                Ok(event) => event,
                Err(error) => {
                    tracing::debug!(pod = %pod.backend.name, event = ?record.event, %error, "ignoring an admin event of unknown shape");
                    continue;
                }
            };
            let missed = matches!(event, AdminEvent::EventsMissed { .. });
            pod.apply_event(event);
            if missed {
                tracing::warn!(pod = %pod.backend.name, "missed admin events; rebuilding from a snapshot");
                pod.apply_snapshot(get_json(client, &state_url, token).await?);
            }
        }
    }
    Ok(())
}
