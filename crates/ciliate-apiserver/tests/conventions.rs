//! The test API server answers as the Kubernetes API does (the API
//! conventions), checked through kube-rs, the client the agent uses, and
//! through Debian's kubectl.

use std::time::Duration;

use ciliate_apiserver::server::{Options, new_state, serve};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    core::{DynamicObject, GroupVersionKind},
    discovery::ApiResource,
};
use serde_json::{Value, json};

struct Server {
    url: String,
    client: Client,
    _task: tokio::task::JoinHandle<()>,
}

async fn start(opts: Options) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        serve(listener, new_state(opts)).await.unwrap();
    });
    let config = kube::Config::new(url.parse().unwrap());
    Server { client: Client::try_from(config).unwrap(), url, _task: task }
}

async fn raw(s: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    raw_with(s, method, path, "application/json", body).await
}

async fn raw_ct(s: &Server, method: &str, path: &str, ct: &str, body: Value) -> (u16, Value) {
    raw_with(s, method, path, ct, Some(body)).await
}

async fn raw_with(
    s: &Server,
    method: &str,
    path: &str,
    ct: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", ct)
        .body(body.map(|b| b.to_string().into_bytes()).unwrap_or_default())
        .unwrap();
    let resp = s.client.send(req.map(Into::into)).await.unwrap();
    let code = resp.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn api_code(e: kube::Error) -> (u16, String, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("not an API error: {other}"),
    }
}

async fn namespace(s: &Server, name: &str, labels: Value) -> Namespace {
    let ns: Namespace = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels}}))
    .unwrap();
    Api::<Namespace>::all(s.client.clone()).create(&PostParams::default(), &ns).await.unwrap()
}

fn pod(name: &str, node: &str, labels: Value) -> Pod {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running"}}))
    .unwrap()
}

fn rv(o: &impl kube::Resource) -> u64 {
    o.meta().resource_version.as_deref().unwrap().parse().unwrap()
}

#[tokio::test]
async fn create_sets_server_fields_and_refuses_duplicates() {
    let s = start(Options::default()).await;
    let pods = Api::<Pod>::namespaced(s.client.clone(), "a");
    // Namespace lifecycle: no namespace, no objects in it.
    let (code, reason, msg) = api_code(
        pods.create(&PostParams::default(), &pod("p", "n1", json!({}))).await.unwrap_err(),
    );
    assert_eq!(
        (code, reason.as_str(), msg.as_str()),
        (404, "NotFound", "namespaces \"a\" not found")
    );
    let ns = namespace(&s, "a", json!({"team": "x"})).await;
    let labels = ns.metadata.labels.unwrap();
    assert_eq!(
        labels.get("kubernetes.io/metadata.name").map(String::as_str),
        Some("a"),
        "the server labels namespaces"
    );
    assert_eq!(labels.get("team").map(String::as_str), Some("x"));
    let p =
        pods.create(&PostParams::default(), &pod("p", "n1", json!({"app": "web"}))).await.unwrap();
    let m = &p.metadata;
    assert!(m.uid.as_ref().is_some_and(|u| u.len() == 36), "uid {:?}", m.uid);
    assert!(m.creation_timestamp.is_some());
    assert_eq!(m.generation, Some(1));
    assert_eq!(m.namespace.as_deref(), Some("a"));
    // The status subresource's status is not taken on create.
    assert!(p.status.is_none(), "status kept on create: {:?}", p.status);
    let (code, reason, msg) = api_code(
        pods.create(&PostParams::default(), &pod("p", "n1", json!({}))).await.unwrap_err(),
    );
    assert_eq!(
        (code, reason.as_str(), msg.as_str()),
        (409, "AlreadyExists", "pods \"p\" already exists")
    );
    let (code, reason, _) = api_code(
        pods.create(&PostParams::default(), &pod("Bad_Name", "n1", json!({}))).await.unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    // generateName.
    let mut g = pod("", "n1", json!({}));
    g.metadata.name = None;
    g.metadata.generate_name = Some("gen-".into());
    let made = pods.create(&PostParams::default(), &g).await.unwrap();
    assert!(made.metadata.name.as_ref().is_some_and(|n| n.starts_with("gen-") && n.len() == 9));
    // A body of another kind is refused naming both.
    let (code, body) = raw(
        &s,
        "POST",
        "/api/v1/namespaces/a/pods",
        Some(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}})),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(
        body["message"],
        "the kind in the data (Service) does not match the expected kind (Pod)"
    );
    assert_eq!(body["kind"], "Status");
}

#[tokio::test]
async fn updates_are_optimistic_and_generation_follows_the_spec() {
    let s = start(Options::default()).await;
    namespace(&s, "a", json!({})).await;
    let pods = Api::<Pod>::namespaced(s.client.clone(), "a");
    let p =
        pods.create(&PostParams::default(), &pod("p", "n1", json!({"app": "web"}))).await.unwrap();
    // A label change: new version, same generation.
    let mut relabel = p.clone();
    relabel.metadata.labels = Some([("app".to_string(), "db".to_string())].into());
    let p2 = pods.replace("p", &PostParams::default(), &relabel).await.unwrap();
    assert!(rv(&p2) > rv(&p));
    assert_eq!(p2.metadata.generation, Some(1));
    // The stale version is refused, with the API's words.
    let (code, reason, msg) =
        api_code(pods.replace("p", &PostParams::default(), &relabel).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert!(msg.contains("the object has been modified"), "{msg}");
    // No version at all: 422.
    let mut none = p2.clone();
    none.metadata.resource_version = None;
    let (code, ..) = api_code(pods.replace("p", &PostParams::default(), &none).await.unwrap_err());
    assert_eq!(code, 422);
    // A no-op update keeps the version.
    let same = pods.replace("p", &PostParams::default(), &p2).await.unwrap();
    assert_eq!(rv(&same), rv(&p2));
    // A spec change moves the generation.
    let mut spec = same.clone();
    spec.spec.as_mut().unwrap().node_name = Some("n2".into());
    let p3 = pods.replace("p", &PostParams::default(), &spec).await.unwrap();
    assert_eq!(p3.metadata.generation, Some(2));
    assert_eq!(p3.metadata.uid, p.metadata.uid, "the server's fields stay the server's");
    // A merge patch carrying a stale resourceVersion is refused; without one it applies.
    let stale =
        json!({"metadata": {"resourceVersion": p.metadata.resource_version, "labels": {"x": "y"}}});
    let (code, ..) = api_code(
        pods.patch("p", &PatchParams::default(), &Patch::Merge(&stale)).await.unwrap_err(),
    );
    assert_eq!(code, 409);
    let p4 = pods
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(p4.metadata.labels.unwrap().get("x").map(String::as_str), Some("y"));
    // A JSON patch (RFC 6902), all or nothing.
    let path = "/api/v1/namespaces/a/pods/p";
    let failing = json!([{"op": "remove", "path": "/metadata/labels/x"}, {"op": "test", "path": "/metadata/name", "value": "q"}]);
    let (code, _) = raw_ct(&s, "PATCH", path, "application/json-patch+json", failing).await;
    assert_eq!(code, 422);
    assert!(
        pods.get("p").await.unwrap().metadata.labels.unwrap().contains_key("x"),
        "a failed JSON patch changed nothing"
    );
    let (code, p5) = raw_ct(
        &s,
        "PATCH",
        path,
        "application/json-patch+json",
        json!([{"op": "remove", "path": "/metadata/labels/x"}]),
    )
    .await;
    assert_eq!(code, 200);
    assert!(p5["metadata"]["labels"].get("x").is_none());
}

#[tokio::test]
async fn status_subresource_is_separate() {
    let s = start(Options::default()).await;
    namespace(&s, "a", json!({})).await;
    let pods = Api::<Pod>::namespaced(s.client.clone(), "a");
    pods.create(&PostParams::default(), &pod("p", "n1", json!({}))).await.unwrap();
    // The status endpoint takes the status and nothing else.
    let st = json!({"status": {"phase": "Running", "podIP": "10.0.0.5"}, "spec": {"nodeName": "elsewhere"}});
    let p = pods.patch_status("p", &PatchParams::default(), &Patch::Merge(&st)).await.unwrap();
    assert_eq!(p.status.as_ref().unwrap().pod_ip.as_deref(), Some("10.0.0.5"));
    assert_eq!(p.spec.as_ref().unwrap().node_name.as_deref(), Some("n1"));
    assert_eq!(p.metadata.generation, Some(1));
    // The main endpoint ignores a status change.
    let p2 = pods
        .patch("p", &PatchParams::default(), &Patch::Merge(&json!({"status": {"phase": "Failed"}})))
        .await
        .unwrap();
    assert_eq!(p2.status.unwrap().phase.as_deref(), Some("Running"));
    // Field selector on the status.
    let lp = ListParams::default().fields("status.podIP=10.0.0.5");
    assert_eq!(pods.list(&lp).await.unwrap().items.len(), 1);
}

#[tokio::test]
async fn lists_select_page_and_expire() {
    let s = start(Options { history: 50, ..Default::default() }).await;
    namespace(&s, "a", json!({})).await;
    namespace(&s, "b", json!({})).await;
    let pods_a = Api::<Pod>::namespaced(s.client.clone(), "a");
    for i in 0..5 {
        let node = if i % 2 == 0 { "n1" } else { "n2" };
        let tier = if i < 3 { "front" } else { "back" };
        pods_a
            .create(
                &PostParams::default(),
                &pod(&format!("p{i}"), node, json!({"tier": tier, "i": i.to_string()})),
            )
            .await
            .unwrap();
    }
    Api::<Pod>::namespaced(s.client.clone(), "b")
        .create(&PostParams::default(), &pod("q", "n1", json!({"tier": "front"})))
        .await
        .unwrap();
    let all = Api::<Pod>::all(s.client.clone());
    let names = |l: kube::core::ObjectList<Pod>| {
        l.items.into_iter().map(|p| p.metadata.name.unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(
        names(all.list(&ListParams::default()).await.unwrap()),
        ["p0", "p1", "p2", "p3", "p4", "q"]
    );
    assert_eq!(
        names(all.list(&ListParams::default().labels("tier=front,i notin (1)")).await.unwrap()),
        ["p0", "p2", "q"]
    );
    assert_eq!(
        names(
            pods_a
                .list(&ListParams::default().fields("spec.nodeName=n1").labels("!missing"))
                .await
                .unwrap()
        ),
        ["p0", "p2", "p4"]
    );
    let (code, reason, msg) =
        api_code(all.list(&ListParams::default().fields("spec.hostname=x")).await.unwrap_err());
    assert_eq!(
        (code, reason.as_str(), msg.as_str()),
        (400, "BadRequest", "field label not supported: spec.hostname")
    );
    let (code, ..) =
        api_code(all.list(&ListParams::default().labels("tier in front")).await.unwrap_err());
    assert_eq!(code, 400);
    // Pages: consistent at the first page's version though a write comes between.
    let page1 = all.list(&ListParams::default().limit(4)).await.unwrap();
    let token = page1.metadata.continue_.clone().expect("a continue token");
    pods_a.delete("p4", &DeleteParams::default()).await.unwrap();
    let page2 = all.list(&ListParams::default().limit(4).continue_token(&token)).await.unwrap();
    assert_eq!(names(page1), ["p0", "p1", "p2", "p3"]);
    assert_eq!(
        names(page2.clone()),
        ["p4", "q"],
        "the second page is read at the first one's version"
    );
    assert!(page2.metadata.continue_.is_none());
    // Exact: the list as it was.
    let lp = ListParams::default()
        .at(&page2.metadata.resource_version.clone().unwrap())
        .matching(kube::api::VersionMatch::Exact);
    assert_eq!(all.list(&lp).await.unwrap().items.len(), 6);
    // After compaction both answer 410 Expired.
    let (code, _) = raw(&s, "POST", "/ciliate-test/compact", None).await;
    assert_eq!(code, 200);
    let (code, reason, _) = api_code(all.list(&lp).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (410, "Expired"));
    let (code, reason, _) = api_code(
        all.list(&ListParams::default().limit(4).continue_token(&token)).await.unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (410, "Expired"));
}

async fn next_event(
    stream: &mut (impl futures::Stream<Item = kube::Result<WatchEvent<Pod>>> + Unpin),
) -> WatchEvent<Pod> {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("an event within 5 s")
        .expect("the stream is open")
        .unwrap()
}

fn name_of(e: &WatchEvent<Pod>) -> (&'static str, String) {
    match e {
        WatchEvent::Added(p) => ("ADDED", p.metadata.name.clone().unwrap()),
        WatchEvent::Modified(p) => ("MODIFIED", p.metadata.name.clone().unwrap()),
        WatchEvent::Deleted(p) => ("DELETED", p.metadata.name.clone().unwrap()),
        WatchEvent::Bookmark(b) => ("BOOKMARK", b.metadata.resource_version.clone()),
        WatchEvent::Error(e) => ("ERROR", format!("{} {}", e.code, e.reason)),
    }
}

#[tokio::test]
async fn watches_from_a_version_with_selectors_and_bookmarks() {
    let s = start(Options {
        history: 100,
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    namespace(&s, "a", json!({})).await;
    let pods = Api::<Pod>::namespaced(s.client.clone(), "a");
    let p =
        pods.create(&PostParams::default(), &pod("p", "n1", json!({"app": "web"}))).await.unwrap();
    let from = rv(&p).to_string();
    pods.create(&PostParams::default(), &pod("q", "n2", json!({"app": "web"}))).await.unwrap();
    // From p's version: q's creation (before the watch began) comes first.
    let wp = WatchParams::default().labels("app=web").fields("spec.nodeName=n2");
    let mut w = pods.watch(&wp, &from).await.unwrap().boxed();
    assert_eq!(name_of(&next_event(&mut w).await), ("ADDED", "q".into()));
    // Leaving the selector is a DELETED, entering it an ADDED.
    pods.patch(
        "q",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"labels": {"app": "db"}}})),
    )
    .await
    .unwrap();
    assert_eq!(name_of(&next_event(&mut w).await), ("DELETED", "q".into()));
    pods.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"labels": {"other": "x"}}})),
    )
    .await
    .unwrap();
    pods.patch(
        "q",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"labels": {"app": "web"}}})),
    )
    .await
    .unwrap();
    assert_eq!(name_of(&next_event(&mut w).await), ("ADDED", "q".into()), "p (on n1) is not seen");
    pods.patch(
        "q",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"labels": {"v": "2"}}})),
    )
    .await
    .unwrap();
    assert_eq!(name_of(&next_event(&mut w).await), ("MODIFIED", "q".into()));
    let last = pods.delete("q", &DeleteParams::default()).await.unwrap().left().unwrap();
    assert_eq!(name_of(&next_event(&mut w).await), ("DELETED", "q".into()));
    // Idle: bookmarks at the last version seen.
    let b = next_event(&mut w).await;
    assert_eq!(name_of(&b).0, "BOOKMARK");
    assert_eq!(name_of(&b).1, last.metadata.resource_version.unwrap());
    // A watch from a compacted version gets an ERROR 410 event.
    raw(&s, "POST", "/ciliate-test/compact", None).await;
    let mut old = pods.watch(&WatchParams::default(), &from).await.unwrap().boxed();
    assert_eq!(name_of(&next_event(&mut old).await), ("ERROR", "410 Expired".into()));
}

#[tokio::test]
async fn kube_runtime_watcher_relists_after_410() {
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let s = start(Options {
        history: 1000,
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    namespace(&s, "a", json!({})).await;
    let pods = Api::<Pod>::namespaced(s.client.clone(), "a");
    pods.create(&PostParams::default(), &pod("p", "n1", json!({}))).await.unwrap();
    let (reader, writer) = reflector::store::<Pod>();
    // As an agent runs it: errors (the 410) are passed over, the watcher
    // recovers by itself.
    let stream = reflector(writer, watcher(pods.clone(), watcher::Config::default()))
        .default_backoff()
        .applied_objects();
    let task = tokio::spawn(async move { stream.for_each(|_| async {}).await });
    let wait = |n: usize| {
        let reader = reader.clone();
        async move {
            for _ in 0..100 {
                if reader.state().len() == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!(
                "the store never held {n} pods: {:?}",
                reader.state().iter().map(|p| p.metadata.name.clone()).collect::<Vec<_>>()
            );
        }
    };
    wait(1).await;
    // The watch is cut, the history behind it forgotten, and things change
    // meanwhile: the watcher's next watch gets 410, it lists again, and its
    // store ends where the server is.
    for _ in 0..50 {
        let (_, w) = raw(&s, "GET", "/ciliate-test/stats", None).await;
        if w["watches"]["pods"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    raw(&s, "POST", "/ciliate-test/hold-watches?on=true", None).await;
    raw(&s, "POST", "/ciliate-test/compact?close-watches=true", None).await;
    pods.delete("p", &DeleteParams::default()).await.unwrap();
    pods.create(&PostParams::default(), &pod("r", "n1", json!({}))).await.unwrap();
    pods.create(&PostParams::default(), &pod("t", "n1", json!({}))).await.unwrap();
    raw(&s, "POST", "/ciliate-test/compact", None).await;
    raw(&s, "POST", "/ciliate-test/hold-watches?on=false", None).await;
    wait(2).await;
    let mut names: Vec<String> =
        reader.state().iter().map(|p| p.metadata.name.clone().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["r", "t"]);
    let (_, stats) = raw(&s, "GET", "/ciliate-test/stats", None).await;
    assert!(stats["expired"].as_u64().unwrap() >= 1, "the watcher never met a 410: {stats}");
    task.abort();
}

#[tokio::test]
async fn deletes_honour_preconditions_finalizers_and_namespaces() {
    let s = start(Options::default()).await;
    namespace(&s, "a", json!({})).await;
    let pods = Api::<Pod>::namespaced(s.client.clone(), "a");
    let p = pods.create(&PostParams::default(), &pod("p", "n1", json!({}))).await.unwrap();
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("not-it".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    let (code, reason, _) = api_code(pods.delete("p", &dp).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: p.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    pods.delete("p", &dp).await.unwrap();
    let (code, reason, msg) = api_code(pods.get("p").await.unwrap_err());
    assert_eq!((code, reason.as_str(), msg.as_str()), (404, "NotFound", "pods \"p\" not found"));
    // Finalizers: marked, then gone when the last one is.
    let mut f = pod("f", "n1", json!({}));
    f.metadata.finalizers = Some(vec!["ciliate.io/test".into()]);
    pods.create(&PostParams::default(), &f).await.unwrap();
    pods.delete("f", &DeleteParams::default()).await.unwrap();
    let marked = pods.get("f").await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    pods.patch(
        "f",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_eq!(api_code(pods.get("f").await.unwrap_err()).0, 404);
    // A namespace is Terminating (nothing new in it), then takes its
    // objects with it.
    pods.create(&PostParams::default(), &pod("x", "n1", json!({}))).await.unwrap();
    let nss = Api::<Namespace>::all(s.client.clone());
    nss.delete("a", &DeleteParams::default()).await.unwrap();
    assert_eq!(nss.get("a").await.unwrap().status.unwrap().phase.as_deref(), Some("Terminating"));
    let (code, reason, _) = api_code(
        pods.create(&PostParams::default(), &pod("y", "n1", json!({}))).await.unwrap_err(),
    );
    assert_eq!((code, reason.as_str()), (403, "Forbidden"));
    for _ in 0..50 {
        if nss.get("a").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(api_code(nss.get("a").await.unwrap_err()).0, 404);
    assert_eq!(
        Api::<Pod>::all(s.client.clone()).list(&ListParams::default()).await.unwrap().items.len(),
        0
    );
}

#[tokio::test]
async fn custom_resources_and_discovery() {
    let s = start(Options::default()).await;
    namespace(&s, "a", json!({})).await;
    let gvk = GroupVersionKind::gvk("cilium.io", "v2", "CiliumNetworkPolicy");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "ciliumnetworkpolicies");
    let cnps = Api::<DynamicObject>::namespaced_with(s.client.clone(), "a", &ar);
    let obj: DynamicObject =
        serde_json::from_value(json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "allow"}, "spec": {"endpointSelector": {}}}))
        .unwrap();
    let made = cnps.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(made.metadata.generation, Some(1));
    // kube-rs discovery finds the group and its resources.
    let d = kube::Discovery::new(s.client.clone()).run().await.unwrap();
    let (found, caps) = d.resolve_gvk(&gvk).expect("CiliumNetworkPolicy discovered");
    assert_eq!(found.plural, "ciliumnetworkpolicies");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    let (code, _) = raw(&s, "GET", "/apis/cilium.io/v2/ciliumwidgets", None).await;
    assert_eq!(code, 404);
    let _ = s.url;
}

#[tokio::test]
async fn a_restarted_server_keeps_its_objects_and_version_and_expires_older_ones() {
    let dir = std::env::temp_dir().join(format!("apiserver-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join(format!("state-{:?}.json", std::thread::current().id()));
    let _ = std::fs::remove_file(&state);
    let opts = Options { state: Some(state.clone()), ..Default::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let st = ciliate_apiserver::server::open_state(opts.clone()).unwrap();
    let task = tokio::spawn(async move { serve(listener, st).await.unwrap() });
    let client = Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    let before = pods.create(&PostParams::default(), &pod("a", "n1", json!({}))).await.unwrap();
    pods.create(&PostParams::default(), &pod("b", "n1", json!({}))).await.unwrap();
    let first = pods.list(&ListParams::default()).await.unwrap();
    let gone = pods.delete("b", &DeleteParams::default()).await.unwrap().left().unwrap();
    let version = gone.metadata.resource_version.clone().unwrap();
    // Stop it (its port closes) and start another on the same file.
    task.abort();
    let _ = task.await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let st = ciliate_apiserver::server::open_state(opts).unwrap();
    tokio::spawn(async move { serve(listener, st).await.unwrap() });
    let client = Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    let list = pods.list(&ListParams::default()).await.unwrap();
    let names: Vec<_> = list.items.iter().filter_map(|p| p.metadata.name.clone()).collect();
    assert_eq!(names, ["a"], "b's deletion was kept too");
    assert_eq!(list.items[0].metadata.uid, before.metadata.uid, "the same object");
    assert_eq!(list.items[0].metadata.resource_version, before.metadata.resource_version);
    assert_eq!(list.metadata.resource_version.as_deref(), Some(version.as_str()));
    // A watch from the last version goes on; one from before it (the
    // history did not survive) gets 410 and relists, as after etcd's
    // compaction.
    let mut w = pods.watch(&WatchParams::default(), &version).await.unwrap().boxed();
    pods.create(&PostParams::default(), &pod("c", "n1", json!({}))).await.unwrap();
    assert_eq!(name_of(&next_event(&mut w).await), ("ADDED", "c".into()));
    let old = first.metadata.resource_version.unwrap();
    let mut old = pods.watch(&WatchParams::default(), &old).await.unwrap().boxed();
    assert_eq!(name_of(&next_event(&mut old).await), ("ERROR", "410 Expired".into()));
    // A file that is not a saved server is refused, naming it.
    std::fs::write(&state, "{").unwrap();
    let e = ciliate_apiserver::server::open_state(Options {
        state: Some(state.clone()),
        ..Default::default()
    })
    .err()
    .unwrap();
    assert!(e.contains(&state.display().to_string()), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn requests_are_logged_as_rbac_sees_them() {
    let s = start(Options::default()).await;
    let mut cfg = kube::Config::new(s.url.parse().unwrap());
    cfg.auth_info.token = Some("agent-1".to_string().into());
    let agent = Client::try_from(cfg).unwrap();
    let pods = Api::<Pod>::namespaced(agent.clone(), "default");
    pods.create(&PostParams::default(), &pod("a", "n1", json!({}))).await.unwrap();
    pods.get("a").await.unwrap();
    Api::<Pod>::all(agent.clone()).list(&ListParams::default()).await.unwrap();
    pods.patch_status("a", &PatchParams::default(), &Patch::Merge(&json!({"status": {}})))
        .await
        .unwrap();
    let (_, log) = raw(&s, "GET", "/ciliate-test/requests", None).await;
    let seen: Vec<String> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["user"] == "agent-1")
        .map(|a| format!("{} {} {}", a["verb"], a["resource"], a["namespace"]))
        .collect();
    assert_eq!(
        seen,
        [
            r#""create" "pods" "default""#,
            r#""get" "pods" "default""#,
            r#""list" "pods" """#,
            r#""patch" "pods/status" "default""#
        ]
    );
}
