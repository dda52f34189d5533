//! The kube-runtime side of discovery: one reflector (a watcher feeding a [`Store`]) per watched
//! kind, each telling the sync loops that depend on it when its objects changed. Watch errors
//! are logged and counted; the watcher retries with kube-runtime's default backoff.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use futures::{Future, StreamExt};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_objects};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::metrics::RouterMetrics;

/// Tells one sync loop that something it reads changed.
#[derive(Debug, Clone)]
pub struct Trigger(Arc<watch::Sender<()>>);

impl Trigger {
    /// A trigger and the receiver its loop waits on.
    pub fn new() -> (Self, watch::Receiver<()>) {
        let (sender, receiver) = watch::channel(());
        (Self(Arc::new(sender)), receiver)
    }

    fn fire(&self) {
        self.0.send_replace(());
    }
}

/// The API of `K` in `namespace`, or in every namespace.
pub fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// A store of `K` kept current from `api` (objects matching `labels`, if any), and the task that
/// keeps it: it fires `triggers` after the first full list and after every change.
pub fn reflect<K>(
    api: Api<K>,
    labels: Option<&str>,
    resource: &'static str,
    triggers: Vec<Trigger>,
    metrics: Arc<RouterMetrics>,
) -> (Store<K>, impl Future<Output = ()> + Send + 'static)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let config = match labels {
        Some(labels) => watcher::Config::default().labels(labels),
        None => watcher::Config::default(),
    };
    let (reader, writer) = reflector::store();
    let stream = watch_objects(api, config).default_backoff().reflect(writer);
    let task = async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Apply(_) | Event::Delete(_) | Event::InitDone) => {
                    for trigger in &triggers {
                        trigger.fire();
                    }
                }
                Ok(Event::Init | Event::InitApply(_)) => {}
                Err(error) => {
                    metrics
                        .discovery_errors
                        .with_label_values(&[resource])
                        .inc();
                    tracing::warn!(resource, %error, "watch failed; retrying with backoff");
                }
            }
        }
    };
    (reader, task)
}

/// The objects of a store of guarded (leniently decoded) objects that decoded; each one that
/// did not is counted and logged.
pub fn decoded<K: Clone>(
    store: &Store<DeserializeGuard<K>>,
    resource: &'static str,
    metrics: &RouterMetrics,
) -> Vec<K>
where
    DeserializeGuard<K>: Resource,
    <DeserializeGuard<K> as Resource>::DynamicType: Eq + Hash + Clone,
{
    store
        .state()
        .iter()
        .filter_map(|guarded| match &guarded.0 {
            Ok(object) => Some(object.clone()),
            Err(invalid) => {
                metrics
                    .discovery_errors
                    .with_label_values(&[resource])
                    .inc();
                tracing::warn!(resource, name = ?invalid.metadata.name, namespace = ?invalid.metadata.namespace, error = %invalid.error, "ignoring an object that does not decode");
                None
            }
        })
        .collect()
}

/// The objects of a store.
pub fn objects<K>(store: &Store<K>) -> Vec<K>
where
    K: Resource + Clone,
    K::DynamicType: Eq + Hash + Clone,
{
    store.state().iter().map(|o| (**o).clone()).collect()
}
