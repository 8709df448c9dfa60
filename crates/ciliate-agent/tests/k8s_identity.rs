//! CRD-mode identity allocation against the test API server: agents
//! racing for one new label set all get one identity; different label sets
//! never share one; an ID some label set holds is never handed to another.

use ciliate_agent::k8s::crd::{allocate, allocate_in};
use ciliate_apiserver::server::{Options, new_state, serve};
use futures::StreamExt as _;
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
    core::{DynamicObject, GroupVersionKind},
    discovery::ApiResource,
};

async fn server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { serve(listener, new_state(Options::default())).await.unwrap() });
    url
}

/// A client of its own (an agent of its own).
fn agent(url: &str) -> Client {
    Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
}

fn ids(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("cilium.io", "v2", "CiliumIdentity");
    Api::all_with(client.clone(), &ApiResource::from_gvk_with_plural(&gvk, "ciliumidentities"))
}

fn set(app: &str) -> Vec<String> {
    vec![format!("k8s:app={app}"), "k8s:io.kubernetes.pod.namespace=shop".into()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_agents_get_one_identity_per_label_set() {
    race(64).await;
}

/// Every agent picks the same ID: racers of one label set share the
/// identity one of them created, and it is never deleted under them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_agents_that_pick_one_id_share_it() {
    race(1).await;
}

async fn race(window: usize) {
    let url = server().await;
    // Every CiliumIdentity deleted while they race.
    let watcher = ids(&agent(&url));
    let mut events = watcher.watch(&kube::api::WatchParams::default(), "0").await.unwrap().boxed();
    let deleted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = deleted.clone();
    let watch = tokio::spawn(async move {
        while let Some(Ok(ev)) = events.next().await {
            if let kube::api::WatchEvent::Deleted(o) = ev {
                seen.lock().unwrap().push(o.metadata.name.unwrap_or_default());
            }
        }
    });
    let mut tasks = Vec::new();
    // All start at once, so several find no claim yet and race.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(16));
    for i in 0..16 {
        let client = agent(&url);
        let labels = set(if i % 2 == 0 { "web" } else { "db" });
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            (labels.clone(), allocate_in(&client, &labels, 256, window).await.unwrap())
        }));
    }
    let mut got: std::collections::BTreeMap<Vec<String>, std::collections::BTreeSet<u32>> =
        Default::default();
    for t in tasks {
        let (labels, id) = t.await.unwrap();
        got.entry(labels).or_default().insert(id);
    }
    let web = &got[&set("web")];
    let db = &got[&set("db")];
    assert_eq!((web.len(), db.len()), (1, 1), "one identity per label set: {got:?}");
    assert_ne!(web, db, "two label sets, two identities");
    // What stays in the API: exactly those two CiliumIdentities (the
    // losers' removed), each with its labels.
    let client = agent(&url);
    let all = ids(&client).list(&ListParams::default()).await.unwrap();
    let mut names: Vec<String> =
        all.items.iter().map(|o| o.metadata.name.clone().unwrap()).collect();
    names.sort();
    let mut want: Vec<String> = web.iter().chain(db.iter()).map(u32::to_string).collect();
    want.sort();
    assert_eq!(names, want);
    // An identity an agent was handed was never deleted under it (two
    // agents that picked one ID share it; only a loser's own goes).
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    watch.abort();
    let gone = deleted.lock().unwrap().clone();
    for id in web.iter().chain(db.iter()) {
        assert!(
            !gone.contains(&id.to_string()),
            "identity {id} was deleted while in use: {gone:?}"
        );
    }
    // Allocating again (another agent, later) finds the same.
    assert_eq!(
        allocate(&agent(&url), &set("web"), 256).await.unwrap(),
        *web.iter().next().unwrap()
    );
}

#[tokio::test]
async fn an_id_another_label_set_holds_is_skipped() {
    let url = server().await;
    let client = agent(&url);
    // ID 256 is held (by an identity another tool made, no claim).
    let held: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "cilium.io/v2", "kind": "CiliumIdentity", "metadata": {"name": "256"},
        "security-labels": {"k8s:app": "other"}
    }))
    .unwrap();
    ids(&client).create(&PostParams::default(), &held).await.unwrap();
    let id = allocate(&client, &set("web"), 256).await.unwrap();
    assert!(id > 256, "{id}");
    let again = allocate(&client, &set("api"), 256).await.unwrap();
    assert!(again > 256 && again != id, "{again}");
    // The held one is untouched.
    let still = ids(&client).get("256").await.unwrap();
    assert_eq!(still.data["security-labels"]["k8s:app"], "other");
}
