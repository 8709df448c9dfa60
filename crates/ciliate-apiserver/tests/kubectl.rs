//! Debian's kubectl (a real client of the Kubernetes API) against the test
//! API server: discovery, apply from YAML, get, label, delete of Pods,
//! Services and CiliumNetworkPolicies.

use std::{path::Path, process::Command, time::Duration};

use ciliate_apiserver::server::{Options, new_state, serve};
use serde_json::Value;

const OBJECTS: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {team: a}
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: demo
  labels: {app: web}
spec:
  nodeName: node1
  containers:
  - name: web
    image: busybox
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-web
  namespace: demo
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: client}
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
"#;

fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl runs (bootstrap installs it)");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn names(json: &str) -> Vec<String> {
    let v: Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("kubectl -o json: {e}: {json}"));
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!("{}/{}", i["kind"].as_str().unwrap(), i["metadata"]["name"].as_str().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_lists_labels_and_deletes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { serve(listener, new_state(Options::default())).await.unwrap() });
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, ciliate_apiserver::kubeconfig(&url)).unwrap();
    let objs = dir.path().join("objects.yaml");
    std::fs::write(&objs, OBJECTS).unwrap();
    let objs = objs.to_str().unwrap().to_string();
    let run = move |args: Vec<String>| {
        let kc = kc.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                kubectl(&kc, &args.iter().map(String::as_str).collect::<Vec<_>>())
            })
            .await
            .unwrap()
        }
    };
    let a = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();

    let (ok, out) = run([a("apply --validate=false -f"), vec![objs.clone()]].concat()).await;
    assert!(ok, "kubectl apply: {out}");
    for want in [
        "namespace/demo created",
        "pod/web created",
        "service/web created",
        "ciliumnetworkpolicy.cilium.io/allow-web created",
    ] {
        assert!(out.contains(want), "{want:?} not in: {out}");
    }
    let (ok, out) = run(a("get pods,services -n demo -o json")).await;
    assert!(ok, "{out}");
    assert_eq!(names(&out), ["Pod/web", "Service/web"]);
    // The short name comes from discovery; the policy is stored whole.
    let (ok, out) = run(a("get cnp allow-web -n demo -o json")).await;
    assert!(ok, "{out}");
    let cnp: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cnp["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"], "8080");
    assert_eq!(cnp["metadata"]["generation"], 1);
    // A second apply of the same files changes nothing.
    let (ok, out) = run([a("apply --validate=false -f"), vec![objs.clone()]].concat()).await;
    assert!(ok && out.contains("pod/web unchanged"), "{out}");
    let (ok, out) = run(a("label pod web -n demo tier=front")).await;
    assert!(ok, "{out}");
    let (ok, out) = run(a("get pods -n demo -l tier=front,app=web -o json")).await;
    assert!(ok, "{out}");
    assert_eq!(names(&out), ["Pod/web"]);
    let (ok, out) = run(a("get pods -n demo -l tier=back -o json")).await;
    assert!(ok, "{out}");
    assert!(names(&out).is_empty());
    // A name that is not there: kubectl's own NotFound.
    let (ok, out) = run(a("get pod nope -n demo")).await;
    assert!(!ok && out.contains("pods \"nope\" not found"), "{out}");

    let (ok, out) = run([a("delete -f"), vec![objs.clone()]].concat()).await;
    assert!(ok, "kubectl delete: {out}");
    for want in [
        "namespace \"demo\" deleted",
        "pod \"web\" deleted",
        "ciliumnetworkpolicy.cilium.io \"allow-web\" deleted",
    ] {
        assert!(out.contains(want), "{want:?} not in: {out}");
    }
    for _ in 0..50 {
        let (ok, out) = run(a("get namespaces -o json")).await;
        assert!(ok, "{out}");
        if !names(&out).contains(&"Namespace/demo".to_string()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the namespace never went");
}
