//! Kubernetes end to end on the lab: the agent follows a Kubernetes API
//! (ciliate-apiserver in the node's namespace, objects written with
//! kubectl): a pod's endpoint takes its labels, its namespace's labels and
//! its service account from the API; policy selects on them (a
//! NetworkPolicy's namespaceSelector on any namespace label); relabelling a
//! pod or its namespace in the API flips verdicts on real traffic, also
//! when the agent's watch had to relist after a 410. Needs root; CI runs as
//! root.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use ciliate_api::{
    client::method,
    models::{Endpoint, PolicyChange, PolicyImport},
};
use ciliate_lab::{
    Netns,
    names::token,
    netns,
    node::{Binaries, ECHO_PORT, NodeLab, NodeLabConfig},
};

const API: &str = "127.0.0.1:6443";

struct K8sLab {
    lab: NodeLab,
    kubeconfig: PathBuf,
    /// The API server's state file (it can be restarted).
    state: PathBuf,
    apiserver: Option<std::process::Child>,
}

impl K8sLab {
    fn up() -> Self {
        let bins = Binaries::beside_current_exe().unwrap();
        let name = format!("k8s{}", token());
        // The agent reads the kubeconfig at start; its watchers retry until
        // the API server (started in the node's namespace below) answers.
        let kubeconfig = std::env::temp_dir().join(format!("{name}.kubeconfig"));
        std::fs::write(&kubeconfig, ciliate_apiserver::kubeconfig(&format!("http://{API}")))
            .unwrap();
        let mut cfg = NodeLabConfig::new(&name, 0, bins);
        cfg.agent_args = vec!["--k8s-kubeconfig-path".into(), kubeconfig.clone().into()];
        let lab = NodeLab::up(cfg).unwrap();
        let state = std::env::temp_dir().join(format!("{name}.apiserver.json"));
        let mut me = Self { lab, kubeconfig, state, apiserver: None };
        me.start_apiserver();
        // The agent watches pods and namespaces.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stats = me.stats();
            if stats["watches"]["pods"].as_u64() >= Some(1)
                && stats["watches"]["namespaces"].as_u64() >= Some(1)
            {
                break;
            }
            assert!(Instant::now() < deadline, "the agent never watched the API: {stats}");
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }

    /// Start the API server in the node's namespace (from its state file
    /// when there is one: a restart).
    fn start_apiserver(&mut self) {
        let bin = Binaries::beside_current_exe().unwrap().agent.with_file_name("ciliate-apiserver");
        let state = self.state.display().to_string();
        let args =
            [bin.to_str().unwrap(), "--listen", API, "--bookmark-interval", "1", "--state", &state];
        self.apiserver = Some(self.lab.node.spawn_detached(&args).unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.stats().is_null() {
            assert!(Instant::now() < deadline, "the API server did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill the API server (SIGKILL: no goodbye to the watchers).
    fn kill_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn node_name(&self) -> &str {
        self.lab.node.name()
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut cmd = self.lab.node.command("kubectl");
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        match stdin {
            None => netns::run(&mut cmd).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}")),
            Some(text) => {
                let f =
                    std::env::temp_dir().join(format!("{}-{}.yaml", self.lab.config.lab, token()));
                std::fs::write(&f, text).unwrap();
                cmd.arg("-f").arg(&f);
                let out = netns::run(&mut cmd);
                let _ = std::fs::remove_file(&f);
                out.unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
            }
        }
    }

    fn api(&self, method: &str, path: &str) -> serde_json::Value {
        let out = netns::run(self.lab.node.command("curl").args([
            "-sf",
            "-X",
            method,
            &format!("http://{API}{path}"),
        ]))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
    }

    fn stats(&self) -> serde_json::Value {
        netns::run(
            self.lab.node.command("curl").args(["-s", &format!("http://{API}/ciliate-test/stats")]),
        )
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
    }

    fn pod_yaml(&self, name: &str, namespace: &str, labels: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}-{name}\n  namespace: {namespace}\n  labels: {labels}\nspec:\n  nodeName: {}\n  serviceAccountName: sa-{name}\n  containers: [{{name: c, image: busybox}}]\n",
            self.lab.config.lab,
            self.node_name()
        )
    }

    /// Namespace `shop` and pods `names` in it (label app=<name>), in the
    /// API and added through the CNI.
    fn shop_pods<const N: usize>(&self, names: [&str; N]) -> [ciliate_lab::node::Pod; N] {
        let mut yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n".to_string();
        for n in names {
            yaml.push_str("---\n");
            yaml.push_str(&self.pod_yaml(n, "shop", &format!("{{app: {n}}}")));
        }
        self.kubectl(&["apply", "--validate=false"], Some(&yaml));
        names.map(|n| self.lab.add_pod_in(n, "shop", &[]).unwrap())
    }

    fn endpoint(&self, ip: Ipv4Addr) -> Endpoint {
        let eps: Vec<Endpoint> = self.lab.client().get("/v1/endpoint").unwrap();
        eps.into_iter().find(|e| e.ip == ip).unwrap()
    }
}

impl Drop for K8sLab {
    fn drop(&mut self) {
        self.kill_apiserver();
        let _ = std::fs::remove_file(&self.kubeconfig);
        let _ = std::fs::remove_file(&self.state);
    }
}

fn reaches(lab: &NodeLab, from: &Netns, to: Ipv4Addr) -> bool {
    lab.reaches(from, "tcp", to, ECHO_PORT, Some(500))
}

/// Wait (up to 10 s) until `from` reaching `to` is `want`.
fn eventually(lab: &NodeLab, from: &Netns, to: Ipv4Addr, want: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while reaches(lab, from, to) != want {
        assert!(
            Instant::now() < deadline,
            "{what}: still {} after 10 s",
            if want { "denied" } else { "allowed" }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-team-a-clients, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: a}}
      podSelector: {matchLabels: {app: client}}
"#;

#[test]
fn pod_and_namespace_labels_come_from_the_api_and_relabels_flip_verdicts() {
    let k = K8sLab::up();
    let lab = &k.lab;
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{team: a}}}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: other, labels: {{team: b}}}}\n---\n{}---\n{}---\n{}",
        k.pod_yaml("web", "shop", "{app: web, pod-template-hash: abc123}"),
        k.pod_yaml("client", "shop", "{app: client}"),
        k.pod_yaml("stranger", "other", "{app: client}"),
    );
    k.kubectl(&["apply", "--validate=false"], Some(&yaml));
    // The CNI gives no labels: the agent takes them from the API.
    let web = lab.add_pod_in("web", "shop", &[]).unwrap();
    let client = lab.add_pod_in("client", "shop", &[]).unwrap();
    let stranger = lab.add_pod_in("stranger", "other", &[]).unwrap();
    let ep = k.endpoint(web.state.ip);
    let want: std::collections::BTreeMap<String, String> = [
        ("app", "web"),
        ("io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name", "shop"),
        ("io.cilium.k8s.namespace.labels.team", "a"),
        ("io.cilium.k8s.policy.serviceaccount", "sa-web"),
        ("io.kubernetes.pod.namespace", "shop"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(ep.labels, want, "pod-template-hash is left out of the identity, as Cilium does");
    assert_eq!(ep.pod_name, format!("shop/{}-web", lab.config.lab));
    // A pod the API does not know is refused with a CNI error naming it.
    let Err(err) = lab.add_pod_in("ghost", "shop", &[]).map(|_| ()) else {
        panic!("a pod the API does not know got an endpoint");
    };
    let err = err.to_string();
    assert!(err.contains("is not in the Kubernetes API"), "{err}");

    std::thread::sleep(Duration::from_millis(300)); // echo servers listening
    let change: PolicyChange = lab
        .client()
        .call(method::PUT, "/v1/policy", Some(&PolicyImport { text: POLICY.into() }))
        .unwrap();
    assert_eq!(change.rules, 1);
    assert!(reaches(lab, &client.ns, web.state.ip), "client in team a's namespace: allowed");
    assert!(!reaches(lab, &stranger.ns, web.state.ip), "client in team b's namespace: denied");

    // A pod relabel moves its identity; the verdict follows.
    let before = k.endpoint(client.state.ip).identity;
    let pod = format!("{}-client", lab.config.lab);
    k.kubectl(&["label", "pod", &pod, "-n", "shop", "app=other", "--overwrite"], None);
    eventually(lab, &client.ns, web.state.ip, false, "client relabelled app=other");
    assert_ne!(k.endpoint(client.state.ip).identity, before);
    k.kubectl(&["label", "pod", &pod, "-n", "shop", "app=client", "--overwrite"], None);
    eventually(lab, &client.ns, web.state.ip, true, "client relabelled back");
    assert_eq!(k.endpoint(client.state.ip).identity, before, "the same labels, the same identity");

    // A namespace relabel moves every pod in it.
    k.kubectl(&["label", "namespace", "other", "team=a", "--overwrite"], None);
    eventually(lab, &stranger.ns, web.state.ip, true, "namespace other relabelled team=a");

    // A change the agent's watch misses (the watch cut, the history behind
    // it compacted away: its next watch gets 410 Gone) is found by the
    // relist.
    let expired = k.stats()["expired"].as_u64().unwrap_or(0);
    k.api("POST", "/ciliate-test/hold-watches?on=true");
    k.api("POST", "/ciliate-test/compact?close-watches=true");
    k.kubectl(&["label", "pod", &pod, "-n", "shop", "app=other", "--overwrite"], None);
    k.api("POST", "/ciliate-test/compact");
    k.api("POST", "/ciliate-test/hold-watches?on=false");
    eventually(lab, &client.ns, web.state.ip, false, "client relabelled while the watch was down");
    assert!(
        k.stats()["expired"].as_u64().unwrap_or(0) > expired,
        "the agent's watch met a 410 and relisted"
    );

    // An agent restart (kill -9): the endpoints keep their identities —
    // the restarted agent relabels nothing (its pods' labels did not
    // change) — and the verdicts stay.
    let ids: Vec<u32> =
        [&web, &client, &stranger].iter().map(|p| k.endpoint(p.state.ip).identity).collect();
    let relabels = |lab: &NodeLab| {
        std::fs::read_to_string(lab.agent_log())
            .unwrap_or_default()
            .matches("endpoint relabelled")
            .count()
    };
    let before = relabels(lab);
    let pids = lab.agent_pids();
    // SAFETY: kill(2) on the lab's own agent.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(500));
    lab.start_agent().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while k.stats()["watches"]["pods"].as_u64() < Some(1) {
        assert!(Instant::now() < deadline, "the restarted agent never watched pods");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let after: Vec<u32> =
        [&web, &client, &stranger].iter().map(|p| k.endpoint(p.state.ip).identity).collect();
    assert_eq!(after, ids, "identities kept across the restart");
    assert_eq!(relabels(lab), before, "the restarted agent relabelled nothing");
    assert!(!reaches(lab, &client.ns, web.state.ip), "client (app=other) still denied");
    assert!(reaches(lab, &stranger.ns, web.state.ip), "stranger (team=a) still allowed");
}

fn cnp(port: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web\n  namespace: shop\n  annotations: {{team: a}}\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: [{{ports: [{{port: \"{port}\", protocol: TCP}}]}}]\n"
    )
}

const CCNP: &str = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: no-client}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingressDeny: [{fromEndpoints: [{matchLabels: {app: client}}]}]\n";

#[test]
fn policies_applied_in_the_api_are_enforced_reported_and_lifted() {
    let k = K8sLab::up();
    let lab = &k.lab;
    let [web, client, other] = k.shop_pods(["web", "client", "other"]);
    std::thread::sleep(Duration::from_millis(300)); // echo servers listening
    assert!(reaches(lab, &other.ns, web.state.ip), "open before any policy");

    // A CNP applied with kubectl is enforced, and says so in its status.
    k.kubectl(&["apply", "--validate=false"], Some(&cnp(&ECHO_PORT.to_string())));
    eventually(lab, &other.ns, web.state.ip, false, "CNP applied: other -> web");
    assert!(reaches(lab, &client.ns, web.state.ip), "client -> web allowed by the CNP");
    let node = k.node_name().to_string();
    let status = |k: &K8sLab| -> serde_json::Value {
        let out = k.kubectl(&["get", "cnp", "web", "-n", "shop", "-o", "json"], None);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["status"]["nodes"][&node].clone()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&k)["ok"] != true {
        assert!(Instant::now() < deadline, "no ok status for this node: {}", status(&k));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status(&k)["enforcing"], true);
    let rules = lab.client().get::<serde_json::Value>("/v1/policy").unwrap().to_string();
    assert!(
        rules.contains("CiliumNetworkPolicy/shop/web")
            && rules.contains("io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy"),
        "the rules carry their object: {rules}"
    );

    // A refused update (port 99999) leaves the policy in force whole and is
    // reported: the status names the error, a Warning event the object.
    k.kubectl(&["apply", "--validate=false"], Some(&cnp("99999")));
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&k)["ok"] != false {
        assert!(Instant::now() < deadline, "the refusal is not in the status: {}", status(&k));
        std::thread::sleep(Duration::from_millis(100));
    }
    let error = status(&k)["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("99999"), "the error names the bad port: {error}");
    let events = k.kubectl(&["get", "events", "-n", "shop", "-o", "json"], None);
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    assert!(
        events["items"].as_array().unwrap().iter().any(|e| e["reason"] == "PolicyRejected"
            && e["involvedObject"]["name"] == "web"
            && e["type"] == "Warning"),
        "no PolicyRejected event: {events}"
    );
    assert!(!reaches(lab, &other.ns, web.state.ip), "the policy in force still denies other");
    assert!(reaches(lab, &client.ns, web.state.ip), "and still allows client");

    // A clusterwide deny on top.
    k.kubectl(&["apply", "--validate=false"], Some(CCNP));
    eventually(lab, &client.ns, web.state.ip, false, "CCNP deny: client -> web");
    k.kubectl(&["delete", "ciliumclusterwidenetworkpolicy", "no-client"], None);
    eventually(lab, &client.ns, web.state.ip, true, "CCNP deleted: client -> web");

    // Deleted while the agent's watch was down (cut, history compacted):
    // the relist finds it gone and its rules go.
    k.api("POST", "/ciliate-test/hold-watches?on=true");
    k.api("POST", "/ciliate-test/compact?close-watches=true");
    k.kubectl(&["delete", "cnp", "web", "-n", "shop"], None);
    k.api("POST", "/ciliate-test/compact");
    k.api("POST", "/ciliate-test/hold-watches?on=false");
    eventually(
        lab,
        &other.ns,
        web.state.ip,
        true,
        "CNP deleted while the watch was down: other -> web",
    );
    let rules: serde_json::Value = lab.client().get("/v1/policy").unwrap();
    assert!(
        !rules.to_string().contains("CiliumNetworkPolicy/shop/web"),
        "its rules are gone: {rules}"
    );
}

#[test]
fn services_and_endpoint_slices_in_the_api_are_served() {
    let k = K8sLab::up();
    let lab = &k.lab;
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n{}---\n{}---\n{}",
        k.pod_yaml("web1", "shop", "{app: web}"),
        k.pod_yaml("web2", "shop", "{app: web}"),
        k.pod_yaml("client", "shop", "{app: client}"),
    );
    k.kubectl(&["apply", "--validate=false"], Some(&yaml));
    let web1 = lab.add_pod_in("web1", "shop", &[]).unwrap();
    let web2 = lab.add_pod_in("web2", "shop", &[]).unwrap();
    let client = lab.add_pod_in("client", "shop", &[]).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // echo servers listening
    let vip: Ipv4Addr = "10.96.50.10".parse().unwrap();
    let slice = |ready: &[Ipv4Addr]| {
        let eps: Vec<String> = ready
            .iter()
            .map(|ip| format!("  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n"))
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  namespace: shop\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: {ECHO_PORT}, protocol: TCP}}]\nendpoints:\n{}",
            eps.concat()
        )
    };
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  type: NodePort\n  clusterIP: 10.96.50.10\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: http, nodePort: 30090}]\n";
    let both = slice(&[web1.state.ip, web2.state.ip]);
    let t = Instant::now();
    k.kubectl(&["apply", "--validate=false"], Some(&format!("{service}---\n{both}")));
    let written = t.elapsed();
    while !lab.reaches(&client.ns, "tcp", vip, 80, Some(200)) {
        assert!(t.elapsed() < Duration::from_secs(10), "the ClusterIP never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    let served = t.elapsed();
    assert!(
        served - written < Duration::from_secs(1),
        "served {:?} after kubectl returned (goal < 1 s)",
        served - written
    );
    // The agent's own view: two frontends (ClusterIP and NodePort) of
    // source k8s, both backends, and nobody else may replace them.
    let svcs: Vec<ciliate_api::models::Service> = lab.client().get("/v1/service").unwrap();
    let mine: Vec<_> = svcs.iter().filter(|s| s.spec.name == "shop/web").collect();
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert!(mine.iter().all(|s| s.spec.source == "k8s" && s.backends.len() == 2), "{mine:?}");
    let mut replace = mine[0].spec.clone();
    replace.source = String::new();
    let e = lab
        .client()
        .call::<serde_json::Value>(method::PUT, "/v1/service", Some(&replace))
        .unwrap_err()
        .to_string();
    assert!(e.contains("comes from the Kubernetes API"), "{e}");

    // web1 leaves the slice, then goes away: no new connection goes to it.
    k.kubectl(&["apply", "--validate=false"], Some(&slice(&[web2.state.ip])));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let svcs: Vec<ciliate_api::models::Service> = lab.client().get("/v1/service").unwrap();
        if svcs.iter().filter(|s| s.spec.name == "shop/web").all(|s| s.backends.len() == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "web1 never left the service");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(web1);
    for i in 0..20 {
        assert!(
            lab.reaches(&client.ns, "tcp", vip, 80, Some(1000)),
            "connection {i} went to a gone backend"
        );
    }
    // The Service deleted: its frontends go.
    k.kubectl(&["delete", "service", "web", "-n", "shop"], None);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let svcs: Vec<ciliate_api::models::Service> = lab.client().get("/v1/service").unwrap();
        if !svcs.iter().any(|s| s.spec.name == "shop/web") {
            break;
        }
        assert!(Instant::now() < deadline, "the Service's frontends stayed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!lab.reaches(&client.ns, "tcp", vip, 80, Some(500)), "the ClusterIP still answers");
}

/// Wait (up to 10 s) until `f` holds.
fn until(what: &str, mut f: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f() {
            None => return,
            Some(why) if Instant::now() > deadline => panic!("{what}: {why}"),
            Some(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn cilium_endpoints_and_the_cilium_node_are_published() {
    let k = K8sLab::up();
    let lab = &k.lab;
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n{}",
        k.pod_yaml("web", "shop", "{app: web}")
    );
    k.kubectl(&["apply", "--validate=false"], Some(&yaml));
    let web = lab.add_pod_in("web", "shop", &[]).unwrap();
    let pod = format!("{}-web", lab.config.lab);
    let cep = |k: &K8sLab| -> serde_json::Value {
        let out = k.kubectl(&["get", "ciliumendpoints", "-n", "shop", "-o", "json"], None);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == pod.as_str())
            .cloned()
            .unwrap_or_default()
    };
    until("the CiliumEndpoint of web", || {
        let c = cep(&k);
        let ep = k.endpoint(web.state.ip);
        (c["status"]["identity"]["id"] != ep.identity || c["status"]["id"] != ep.id)
            .then(|| c.to_string())
    });
    let c = cep(&k);
    assert_eq!(c["status"]["networking"]["addressing"][0]["ipv4"], web.state.ip.to_string());
    assert_eq!(c["status"]["state"], "ready");
    assert!(c["status"]["identity"]["labels"].to_string().contains("k8s:app=web"), "{c}");
    // A relabel: the CiliumEndpoint follows the identity.
    k.kubectl(&["label", "pod", &pod, "-n", "shop", "app=api", "--overwrite"], None);
    until("the CiliumEndpoint after a relabel", || {
        let c = cep(&k);
        (!c["status"]["identity"]["labels"].to_string().contains("k8s:app=api"))
            .then(|| c.to_string())
    });
    assert_eq!(cep(&k)["status"]["identity"]["id"], k.endpoint(web.state.ip).identity);
    // The node's CiliumNode (written once the API answers: the agent
    // started before the API server here).
    let node_of = |k: &K8sLab| -> serde_json::Value {
        let out = k.kubectl(&["get", "ciliumnodes", "-o", "json"], None);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == k.node_name())
            .cloned()
            .unwrap_or_default()
    };
    until("the CiliumNode", || node_of(&k).is_null().then(|| "not there".to_string()));
    let node = node_of(&k);
    assert_eq!(node["spec"]["ipam"]["podCIDRs"][0], "10.200.0.0/24", "{node}");
    assert_eq!(node["spec"]["addresses"][0]["type"], "InternalIP", "{node}");
    // The pod's endpoint deleted (CNI DEL): its CiliumEndpoint goes.
    let netns = web.ns.path().display().to_string();
    let (out, ok) = lab.cni_in("DEL", &pod, &netns, &lab.cni_config(&[]), "shop").unwrap();
    assert!(ok, "CNI DEL: {out}");
    until("the CiliumEndpoint removed", || (!cep(&k).is_null()).then(|| cep(&k).to_string()));
}

#[test]
fn the_agent_rides_out_an_api_server_restart() {
    let mut k = K8sLab::up();
    let [web, client, other] = k.shop_pods(["web", "client", "other"]);
    std::thread::sleep(Duration::from_millis(300)); // echo servers listening
    k.kubectl(&["apply", "--validate=false"], Some(&cnp(&ECHO_PORT.to_string())));
    eventually(&k.lab, &other.ns, web.state.ip, false, "CNP applied: other -> web");
    assert!(reaches(&k.lab, &client.ns, web.state.ip), "client -> web allowed by the CNP");
    let rules = |k: &K8sLab| k.lab.client().get::<serde_json::Value>("/v1/policy").unwrap();
    let ids = |k: &K8sLab| -> Vec<u32> {
        [&web, &client, &other].iter().map(|p| k.endpoint(p.state.ip).identity).collect()
    };
    let (rules_before, ids_before) = (rules(&k), ids(&k));

    // The API server dies: the agent keeps what it has, and enforces it.
    k.kill_apiserver();
    std::thread::sleep(Duration::from_secs(2));
    assert!(!reaches(&k.lab, &other.ns, web.state.ip), "API down: other -> web still denied");
    assert!(reaches(&k.lab, &client.ns, web.state.ip), "API down: client -> web still allowed");
    assert_eq!(rules(&k), rules_before, "API down: the policy stays");

    // Back (same objects, same version, no history): the agent's watches
    // return and nothing it had is dropped or redone.
    k.start_apiserver();
    let deadline = Instant::now() + Duration::from_secs(30);
    while k.stats()["watches"]["pods"].as_u64() < Some(1)
        || k.stats()["watches"]["ciliumnetworkpolicies.cilium.io"].as_u64() < Some(1)
    {
        assert!(Instant::now() < deadline, "the agent never watched again: {}", k.stats());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(rules(&k), rules_before, "the policy is the same after the restart");
    assert_eq!(ids(&k), ids_before, "the identities are the same");
    assert!(!reaches(&k.lab, &other.ns, web.state.ip), "after: other -> web denied");
    assert!(reaches(&k.lab, &client.ns, web.state.ip), "after: client -> web allowed");
    // And what changes in the API now is followed: a relabel and the
    // policy's deletion.
    let pod = format!("{}-client", k.lab.config.lab);
    k.kubectl(&["label", "pod", &pod, "-n", "shop", "app=other", "--overwrite"], None);
    eventually(&k.lab, &client.ns, web.state.ip, false, "client relabelled after the restart");
    k.kubectl(&["delete", "cnp", "web", "-n", "shop"], None);
    eventually(&k.lab, &other.ns, web.state.ip, true, "CNP deleted after the restart");
}

#[test]
fn a_burst_of_policies_is_one_change_and_a_bad_one_is_refused_alone() {
    let k = K8sLab::up();
    let [web, client] = k.shop_pods(["web", "client"]);
    std::thread::sleep(Duration::from_millis(300)); // echo servers listening
    // 20 policies written while the agent's watches are cut and held, the
    // history compacted after them: its watch gets 410 and its relist
    // brings them all at once. One has a bad port.
    let repo = |k: &K8sLab| k.lab.client().get::<serde_json::Value>("/v1/policy").unwrap();
    let rev0 = repo(&k)["revision"].as_u64().unwrap();
    k.api("POST", "/ciliate-test/hold-watches?on=true");
    k.api("POST", "/ciliate-test/compact?close-watches=true");
    let docs: Vec<String> = (0..20)
        .map(|i| {
            let port = if i == 7 { "99999".to_string() } else { (20000 + i).to_string() };
            cnp(&port).replace("name: web\n", &format!("name: web-{i}\n"))
        })
        .collect();
    k.kubectl(&["apply", "--validate=false"], Some(&docs.join("---\n")));
    k.api("POST", "/ciliate-test/compact");
    k.api("POST", "/ciliate-test/hold-watches?on=false");
    let in_force = |k: &K8sLab| {
        repo(k)["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r["source"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("CiliumNetworkPolicy/shop/web-")
            })
            .count()
    };
    until("19 policies in force", || {
        (in_force(&k) != 19).then(|| format!("{} in force", in_force(&k)))
    });
    let rev = repo(&k)["revision"].as_u64().unwrap();
    assert!(
        rev - rev0 <= 2,
        "one policy change for the burst, not one per object: {rev0} -> {rev}"
    );
    // The bad one is refused and says so; the others say they are in force.
    let status = |name: &str| {
        let out = k.kubectl(&["get", "cnp", name, "-n", "shop", "-o", "json"], None);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["status"]["nodes"][k.node_name()]
            .clone()
    };
    until("the bad one's status", || {
        (status("web-7")["ok"] != false).then(|| status("web-7").to_string())
    });
    assert!(status("web-7")["error"].as_str().unwrap_or_default().contains("99999"));
    until("a good one's status", || {
        (status("web-3")["ok"] != true).then(|| status("web-3").to_string())
    });
    // They are enforced: web now only takes client on ports 20000+.
    eventually(&k.lab, &client.ns, web.state.ip, false, "echo port not in any of the 19");
}
