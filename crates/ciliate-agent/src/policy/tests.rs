use std::collections::BTreeMap;

use super::*;

const WEB_ALLOWS_FRONTEND: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web
  namespace: shop
  labels: {team: a}
spec:
  endpointSelector:
    matchLabels: {app: web}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: frontend}
    toPorts:
    - ports:
      - {port: "80", protocol: TCP}
      - {port: 8000, endPort: 8003, protocol: TCP}
"#;

fn labels(app: &str, ns: &str) -> Vec<String> {
    let mut l = vec![format!("k8s:app={app}"), format!("k8s:{NAMESPACE_LABEL}={ns}")];
    l.sort();
    l
}

fn identities() -> IdView {
    identity_map().into()
}

fn identity_map() -> BTreeMap<u32, Vec<String>> {
    let mut ids: BTreeMap<u32, Vec<String>> = (1..=8)
        .filter_map(|id| reserved::reserved_name(id).map(|n| (id, vec![format!("reserved:{n}")])))
        .collect();
    ids.insert(256, labels("web", "shop"));
    ids.insert(257, labels("frontend", "shop"));
    ids.insert(258, labels("frontend", "other"));
    ids
}

#[test]
fn a_namespaced_policy_resolves_to_identities_of_its_namespace_and_ports() {
    let rules = parse(WEB_ALLOWS_FRONTEND).unwrap();
    assert_eq!(rules.len(), 1);
    assert!(rules[0].labels.contains(&"k8s:team=a".to_string()));
    let r = resolve(&rules, 7, &labels("web", "shop"), &identities());
    assert!(r.ingress_enforced && !r.egress_enforced);
    // frontend of namespace shop only (257, not 258); port 80 and 8000-8003;
    // and the host, always (allow-localhost).
    let ids: BTreeSet<u32> = r.rules.iter().map(|x| x.identity).collect();
    assert_eq!(ids, [reserved::HOST, 257].into());
    let ports: Vec<Option<(u16, u16)>> =
        r.rules.iter().filter(|x| x.identity == 257).map(|x| x.ports).collect();
    assert_eq!(ports, vec![Some((80, 80)), Some((8000, 8003))]);
    // The same policy does not select web of another namespace.
    let other = resolve(&rules, 8, &labels("web", "other"), &identities());
    assert_eq!(other, Resolved::default());
}

#[test]
fn entities_empty_rules_and_l4_only_rules() {
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: cw}
specs:
- endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEntities: [host, world]
  - toPorts: [{ports: [{port: "53", protocol: UDP}]}]
  egress:
  - {}
"#;
    let rules = parse(text).unwrap();
    let r = resolve(&rules, 1, &labels("web", "shop"), &identities());
    assert!(r.ingress_enforced && r.egress_enforced, "egress: [{{}}] denies all");
    let ingress: Vec<(u32, u8)> = r.rules.iter().map(|x| (x.identity, x.proto)).collect();
    assert_eq!(
        ingress,
        vec![(ANY_IDENTITY, 17), (reserved::HOST, ANY_PROTO), (reserved::WORLD, ANY_PROTO)]
    );
    assert!(r.rules.iter().all(|x| x.dir == DIR_INGRESS));
}

#[test]
fn a_deny_removes_the_allows_it_covers() {
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: d, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}, {port: "443", protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "0", endPort: 100, protocol: TCP}]}]
"#;
    let r = resolve(&parse(text).unwrap(), 1, &labels("web", "shop"), &identities());
    let allows: Vec<_> =
        r.rules.iter().filter(|x| !x.deny && x.identity == 257).map(|x| x.ports).collect();
    assert_eq!(allows, vec![Some((443, 443))], "the allow of 80 is covered by the deny of 0-100");
    assert!(r.rules.iter().any(|x| x.deny));
}

#[test]
fn selectors_match_expressions_and_sources() {
    let l = labels("web", "shop");
    let sel = |yaml: &str| serde_yaml_ng::from_str::<Selector>(yaml).unwrap();
    assert!(sel("matchLabels: {k8s:app: web}").matches(&l, None));
    assert!(!sel("matchLabels: {reserved:app: web}").matches(&l, None));
    assert!(
        sel("matchExpressions: [{key: app, operator: In, values: [db, web]}]").matches(&l, None)
    );
    assert!(
        !sel("matchExpressions: [{key: app, operator: NotIn, values: [web]}]").matches(&l, None)
    );
    assert!(sel("matchExpressions: [{key: tier, operator: DoesNotExist}]").matches(&l, None));
    assert!(sel("matchExpressions: [{key: app, operator: Exists}]").matches(&l, None));
    assert!(!sel("{}").matches(&l, Some("other")), "namespaced: implicit namespace");
    assert!(sel(&format!("matchLabels: {{{NAMESPACE_LABEL}: shop}}")).matches(&l, Some("other")));
}

/// Malformed files: each refused with a message naming the problem.
#[test]
fn bad_policies_are_refused_with_a_clear_message() {
    let base = |spec: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspec:\n{spec}"
        )
    };
    let cases: Vec<(String, &str)> = vec![
        ("".into(), "no policy"),
        ("{{{".into(), "not YAML"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {}".into(), "apiVersion v1"),
        ("apiVersion: cilium.io/v2\nkind: Pod\nmetadata: {name: x}\nspec: {}".into(), "kind Pod"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {}\nspec: {}".into(), "metadata.name"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: x}".into(), "spec is missing"),
        ("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: x, namespace: a}\nspec: {}".into(), "clusterwide"),
        (base("  ingress: []"), "endpointSelector is missing"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingres: []"), "field ingres"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{toEndpoints: [{}]}]"), "toEndpoints does not belong"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  egress: [{fromEntities: [world]}]"), "fromEntities does not belong"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{fromEntities: [moon]}]"), "entity \"moon\""),
        (base("  endpointSelector: {matchExpressions: [{key: a, operator: Near}]}"), "operator Near"),
        (base("  endpointSelector: {matchExpressions: [{key: a, operator: In}]}"), "needs values"),
        (base("  endpointSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}"), "takes no values"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{toPorts: [{ports: [{port: \"Http_X\"}]}]}]"), "neither a number nor a port name"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{toPorts: [{ports: [{port: \"http\", endPort: 90}]}]}]"), "takes no endPort"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{toPorts: [{ports: [{port: 70000}]}]}]"), "over 65535"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{toPorts: [{ports: [{port: 90, endPort: 80}]}]}]"), "endPort 80"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{toPorts: [{ports: [{port: 80, protocol: SCTPX}]}]}]"), "protocol SCTPX"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{fromCIDR: [10.0.0.1/8]}]"), "host bits set"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{fromCIDR: [10.0.0.0/40]}]"), "bad prefix length"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{toCIDR: [10.0.0.0/8]}]"), "toCIDR/toCIDRSet does not belong"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  egress: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}]}]"), "not inside"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{icmps: [{fields: [{type: 300}]}]}]"), "ICMP type 300"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{icmps: [{fields: [{type: 8, family: IPv6}]}]}]"), "only IPv4"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{icmps: [{fields: [{type: Ping}]}]}]"), "not a known ICMPv4 type"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{toPorts: [{ports: [{port: 80}], rules: {}}]}]"), "toPorts[0].rules: L7 policy is not enforced yet"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  ingress: [{toPorts: [{ports: [{port: [1]}]}]}]"), "is not a number"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  enableDefaultDeny: {ingress: maybe}"), "spec.enableDefaultDeny.ingress: invalid type"),
        (base("  endpointSelector: {matchLabels: {a: b}}\n  enableDefaultDeny: {sideways: true}"), "field sideways"),
        (format!("{}\n---\nnot: a policy", WEB_ALLOWS_FRONTEND), "document 2"),
    ];
    assert!(cases.len() >= 20);
    for (text, needle) in cases {
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains(needle), "input:\n{text}\nerror: {e}\nwanted: {needle}");
    }
}

#[test]
fn cidr_rules_select_the_local_identities_inside_them_but_not_their_excepts() {
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: c, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]
  - toCIDR: [0.0.0.0/0]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
"#;
    let rules = parse(text).unwrap();
    let cidrs = referenced_cidrs(&rules);
    let want: BTreeSet<Prefix> =
        [parse_cidr("10.0.0.0/8").unwrap(), parse_cidr("10.1.0.0/16").unwrap()].into();
    assert_eq!(cidrs, want, "0.0.0.0/0 is the world, not a CIDR identity");
    let mut ids = identity_map();
    let (eight, sixteen, other) =
        (reserved::LOCAL_FLAG | 1, reserved::LOCAL_FLAG | 2, reserved::LOCAL_FLAG | 3);
    ids.insert(eight, cidr_labels(parse_cidr("10.0.0.0/8").unwrap(), false));
    ids.insert(sixteen, cidr_labels(parse_cidr("10.1.0.0/16").unwrap(), false));
    // Another policy's CIDR inside the /8: selected too.
    ids.insert(other, cidr_labels(parse_cidr("10.2.3.0/24").unwrap(), false));
    let ids = IdView::new(ids);
    let r = resolve(&rules, 1, &labels("web", "shop"), &ids);
    let l3: BTreeSet<u32> =
        r.rules.iter().filter(|x| x.proto == ANY_PROTO).map(|x| x.identity).collect();
    assert_eq!(l3, [eight, other].into(), "the except's identity is not allowed");
    let dns: BTreeSet<u32> = r.rules.iter().filter(|x| x.proto == 17).map(|x| x.identity).collect();
    assert!(dns.contains(&reserved::WORLD) && dns.contains(&sixteen), "{dns:?}");
    // The cluster entity never means CIDR identities.
    let cluster = parse(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: k, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress: [{toEntities: [cluster]}]\n",
    )
    .unwrap();
    let r = resolve(&cluster, 1, &labels("web", "shop"), &ids);
    assert!(r.rules.iter().all(|x| x.identity & reserved::LOCAL_FLAG == 0));
}

#[test]
fn trace_says_what_decides_and_why() {
    let rules = parse(WEB_ALLOWS_FRONTEND).unwrap();
    let ids = identities();
    let (web, fe, fe_other) = (
        ids.get(256).unwrap().clone(),
        ids.get(257).unwrap().clone(),
        ids.get(258).unwrap().clone(),
    );
    let t = trace(
        &rules,
        (257, &fe),
        (256, &web),
        6,
        80,
        &ids,
        (&NamedPorts::default(), &NamedPorts::default()),
    );
    assert_eq!(t.verdict, "ALLOWED");
    assert_eq!(t.ingress.rules, ["CiliumNetworkPolicy/shop/web"]);
    assert!(!t.egress.enforced);
    let t = trace(
        &rules,
        (257, &fe),
        (256, &web),
        6,
        81,
        &ids,
        (&NamedPorts::default(), &NamedPorts::default()),
    );
    assert_eq!((t.verdict.as_str(), t.ingress.reason.contains("default deny")), ("DENIED", true));
    let t = trace(
        &rules,
        (258, &fe_other),
        (256, &web),
        6,
        80,
        &ids,
        (&NamedPorts::default(), &NamedPorts::default()),
    );
    assert_eq!(t.verdict, "DENIED", "another namespace's frontend");
    let host = vec!["reserved:host".to_string()];
    let t = trace(
        &rules,
        (reserved::HOST, &host),
        (256, &web),
        6,
        9999,
        &ids,
        (&NamedPorts::default(), &NamedPorts::default()),
    );
    assert_eq!(
        (t.verdict.as_str(), t.ingress.rules.as_slice()),
        ("ALLOWED", &["allow-localhost".to_string()][..])
    );
}

#[test]
fn kubernetes_network_policies_mean_what_kubernetes_says() {
    let text = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: frontend}}
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: other}}
      podSelector: {matchLabels: {app: frontend}}
    ports: [{port: 80}]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]
"#;
    let rules = parse(text).unwrap();
    assert_eq!(rules[0].source, "NetworkPolicy/shop/np");
    let r = resolve(&rules, 1, &labels("web", "shop"), &identities());
    assert!(r.ingress_enforced && r.egress_enforced);
    let ingress: BTreeSet<(u32, u8)> = r
        .rules
        .iter()
        .filter(|x| x.dir == DIR_INGRESS && x.identity != reserved::HOST)
        .map(|x| (x.identity, x.proto))
        .collect();
    assert_eq!(
        ingress,
        [(257, 6), (258, 6)].into(),
        "frontend here and in namespace other; TCP by default"
    );
    assert!(
        r.rules.iter().all(|x| x.dir != DIR_EGRESS
            || x.identity & reserved::LOCAL_FLAG != 0
            || x.identity == 0)
    );

    // A namespace selector on any label selects the pods whose namespace
    // has it (their endpoints carry it, Cilium's way); matchExpressions too.
    let mut ids = identity_map();
    let mut team_a = labels("frontend", "other");
    team_a.push(format!("k8s:{NAMESPACE_LABELS_PREFIX}team=a"));
    team_a.sort();
    ids.insert(259, team_a);
    let ids: IdView = ids.into();
    for from in [
        "{namespaceSelector: {matchLabels: {team: a}}}",
        "{namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [a, b]}]}}",
    ] {
        let np = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: t, namespace: shop}}\nspec:\n  podSelector: {{}}\n  ingress: [{{from: [{from}]}}]\n"
        );
        let r = resolve(&parse(&np).unwrap(), 1, &labels("web", "shop"), &ids);
        let peers: BTreeSet<u32> =
            r.rules.iter().filter(|x| x.identity != reserved::HOST).map(|x| x.identity).collect();
        assert_eq!(peers, [259].into(), "{from}");
    }

    // No policyTypes: Ingress only; an empty ingress denies all; `from`
    // missing means every source.
    let deny_all = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: d, namespace: shop}\nspec:\n  podSelector: {}\n";
    let r = resolve(&parse(deny_all).unwrap(), 1, &labels("web", "shop"), &identities());
    assert!(r.ingress_enforced && !r.egress_enforced);
    assert!(r.rules.iter().all(|x| x.identity == reserved::HOST), "only allow-localhost");
    let allow_all = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  podSelector: {}\n  ingress: [{}]\n";
    let r = resolve(&parse(allow_all).unwrap(), 1, &labels("web", "shop"), &identities());
    assert!(r.rules.iter().any(|x| x.identity == ANY_IDENTITY && x.proto == ANY_PROTO));

    for (bad, needle) in [
        (
            deny_all.replace("podSelector: {}", "podSelector: {}\n  policyTypes: [Sideways]"),
            "Sideways",
        ),
        (allow_all.replace("ingress: [{}]", "ingress: [{from: [{}]}]"), "empty peer"),
        (
            allow_all.replace("ingress: [{}]", "ingress: [{ports: [{port: Http_X}]}]"),
            "neither a number nor a port name",
        ),
        (allow_all.replace("podSelector: {}", "podSelectr: {}"), "field podSelectr"),
    ] {
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains(needle), "{bad}\n{e}");
    }
}

#[test]
fn icmp_rules_allow_their_types() {
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: i, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - icmps: [{fields: [{type: 8, family: IPv4}, {type: EchoReply}]}]
"#;
    let r = resolve(&parse(text).unwrap(), 1, &labels("web", "shop"), &identities());
    let icmp: Vec<(u32, u8, Ports)> =
        r.rules.iter().filter(|x| x.proto == 1).map(|x| (x.identity, x.proto, x.ports)).collect();
    assert_eq!(icmp, vec![(ANY_IDENTITY, 1, Some((0, 0))), (ANY_IDENTITY, 1, Some((8, 8)))]);
}

#[test]
fn selectors_list_what_each_selects_now() {
    let rules = parse(WEB_ALLOWS_FRONTEND).unwrap();
    let sels = selectors(&rules, &identities());
    let roles: Vec<(&str, Vec<u32>)> =
        sels.iter().map(|s| (s.role.as_str(), s.identities.clone())).collect();
    assert_eq!(roles, vec![("endpointSelector", vec![256]), ("fromEndpoints", vec![257])]);
}

#[test]
fn named_ports_resolve_to_the_endpoints_own_ports_and_the_peers_ports() {
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: n, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: http, protocol: TCP}]}]
  egress:
  - toEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: dns}]}]
"#;
    let rules = parse(text).unwrap();
    let named = NamedPorts {
        own: [("http".to_string(), vec![(8080, 6)])].into(),
        by_identity: std::sync::Arc::new(
            [(257, [("dns".to_string(), vec![(53, 17)])].into())].into(),
        ),
    };
    let r = resolve_named(&rules, 1, &labels("web", "shop"), &identities(), &named);
    let got: BTreeSet<(u8, u32, u8, Ports)> = r
        .rules
        .iter()
        .filter(|x| x.identity == 257)
        .map(|x| (x.dir, x.identity, x.proto, x.ports))
        .collect();
    assert_eq!(
        got,
        [(DIR_INGRESS, 257, 6, Some((8080, 8080))), (DIR_EGRESS, 257, 17, Some((53, 53)))].into()
    );
    // Without the endpoint's named ports the rule allows nothing.
    let r = resolve(&rules, 1, &labels("web", "shop"), &identities());
    assert!(r.rules.iter().all(|x| x.identity != 257));
}

/// Cilium's lockdown example: deny ingress from the world cluster-wide,
/// allow from everything else.
const LOCKDOWN: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: external-lockdown}
spec:
  endpointSelector: {}
  ingressDeny:
  - fromEntities: [world]
  ingress:
  - fromEntities: [all]
"#;

/// The identities plus the CIDR identity some other policy gave
/// 192.0.2.10/32 (outside the cluster) and one of 10.9.0.0/16 (inside it).
fn with_cidr_identities() -> (IdView, u32, u32) {
    let mut ids = identity_map();
    let (ext, inside) = (reserved::LOCAL_FLAG | 1, reserved::LOCAL_FLAG | 2);
    ids.insert(ext, cidr_labels(parse_cidr("192.0.2.10/32").unwrap(), false));
    ids.insert(inside, cidr_labels(parse_cidr("10.9.0.0/16").unwrap(), true));
    (IdView::new(ids), ext, inside)
}

#[test]
fn a_cidr_identity_outside_the_cluster_is_still_the_world() {
    let labels_of = cidr_labels(parse_cidr("192.0.2.10/32").unwrap(), false);
    assert_eq!(labels_of.len(), 34, "33 prefixes and reserved:world: {labels_of:?}");
    assert!(labels_of.contains(&"cidr:192.0.2.0/24".to_string()));
    assert!(labels_of.contains(&"cidr:0.0.0.0/0".to_string()));
    assert!(labels_of.contains(&WORLD_LABEL.to_string()));
    assert!(!cidr_labels(parse_cidr("10.9.0.0/16").unwrap(), true).contains(&WORLD_LABEL.into()));

    let (ids, ext, inside) = with_cidr_identities();
    let r = resolve(&parse(LOCKDOWN).unwrap(), 1, &labels("web", "shop"), &ids);
    let denied: BTreeSet<u32> = r.rules.iter().filter(|x| x.deny).map(|x| x.identity).collect();
    assert_eq!(denied, [reserved::WORLD, ext].into(), "the world deny covers the CIDR identity");
    // And trace agrees: the external address is denied, named by the deny.
    let ext_labels = ids.get(ext).unwrap().clone();
    let t = trace(
        &parse(LOCKDOWN).unwrap(),
        (ext, &ext_labels),
        (256, &labels("web", "shop")),
        6,
        80,
        &ids,
        (&NamedPorts::default(), &NamedPorts::default()),
    );
    assert_eq!(t.verdict, "DENIED");
    assert_eq!(t.ingress.rules, ["CiliumClusterwideNetworkPolicy/-/external-lockdown"]);

    // An allow from the world allows the CIDR identity too, not the
    // in-cluster one.
    let allow = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: w, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress: [{fromEntities: [world]}]\n";
    let r = resolve(&parse(allow).unwrap(), 1, &labels("web", "shop"), &ids);
    let allowed: BTreeSet<u32> = r.rules.iter().map(|x| x.identity).collect();
    assert!(allowed.contains(&ext) && allowed.contains(&reserved::WORLD), "{allowed:?}");
    assert!(!allowed.contains(&inside), "{allowed:?}");
}

#[test]
fn cidr_selectors_match_by_every_containing_prefix() {
    let (ids, ext, _) = with_cidr_identities();
    for (cidr, selected) in [
        ("192.0.2.0/24", true),
        ("192.0.0.0/8", true),
        ("192.0.2.10/32", true),
        ("192.0.3.0/24", false),
    ] {
        let text = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: c, namespace: shop}}\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  egress: [{{toCIDR: [{cidr}]}}]\n"
        );
        let r = resolve(&parse(&text).unwrap(), 1, &labels("web", "shop"), &ids);
        assert_eq!(r.rules.iter().any(|x| x.identity == ext), selected, "toCIDR {cidr}");
    }
    // An except names the more specific identity out.
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: c, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress: [{toCIDRSet: [{cidr: 192.0.0.0/8, except: [192.0.2.0/24]}]}]\n";
    let r = resolve(&parse(text).unwrap(), 1, &labels("web", "shop"), &ids);
    assert!(r.rules.iter().all(|x| x.identity != ext));
    // A `cidr:` label on an identity that is not a CIDR identity selects
    // nothing (a pod cannot pose as an address).
    let mut m = identity_map();
    m.insert(300, vec!["cidr:192.0.2.10/32".into()]);
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: c, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress: [{toCIDR: [192.0.2.0/24]}]\n";
    let r = resolve(&parse(text).unwrap(), 1, &labels("web", "shop"), &IdView::new(m));
    assert!(r.rules.iter().all(|x| x.identity != 300));
}

#[test]
fn enable_default_deny_false_enforces_only_denies() {
    let text = |dd: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: nd, namespace: shop}}\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  enableDefaultDeny: {dd}\n  ingress: [{{fromEndpoints: [{{matchLabels: {{app: frontend}}}}], toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]}}]\n  ingressDeny: [{{fromEndpoints: [{{matchLabels: {{app: frontend}}}}], toPorts: [{{ports: [{{port: \"22\", protocol: TCP}}]}}]}}]\n  egress: [{{toEndpoints: [{{matchLabels: {{app: frontend}}}}]}}]\n"
        )
    };
    let rules = parse(&text("{ingress: false, egress: false}")).unwrap();
    let r = resolve(&rules, 1, &labels("web", "shop"), &identities());
    assert!(r.ingress_enforced && r.egress_enforced, "denies still apply");
    let any_allows: Vec<u8> = r
        .rules
        .iter()
        .filter(|x| x.identity == ANY_IDENTITY && !x.deny && x.proto == ANY_PROTO)
        .map(|x| x.dir)
        .collect();
    assert_eq!(any_allows, vec![DIR_INGRESS, DIR_EGRESS], "everything else passes");
    assert!(r.rules.iter().any(|x| x.deny && x.identity == 257 && x.ports == Some((22, 22))));
    let ids = identities();
    let (web, fe) = (labels("web", "shop"), ids.get(257).unwrap().clone());
    let tr = |port, rules: &[Rule]| {
        trace(
            rules,
            (258, ids.get(258).unwrap()),
            (256, &web),
            6,
            port,
            &ids,
            (&NamedPorts::default(), &NamedPorts::default()),
        )
    };
    let t = tr(9999, &rules);
    assert_eq!(t.verdict, "ALLOWED", "{t:?}");
    assert!(t.ingress.reason.contains("enableDefaultDeny"), "{}", t.ingress.reason);
    let deny = trace(
        &rules,
        (257, &fe),
        (256, &web),
        6,
        22,
        &ids,
        (&NamedPorts::default(), &NamedPorts::default()),
    );
    assert_eq!(deny.verdict, "DENIED");

    // Only ingress off: egress is default deny as usual.
    let r = resolve(
        &parse(&text("{ingress: false}")).unwrap(),
        1,
        &labels("web", "shop"),
        &identities(),
    );
    assert!(!r.rules.iter().any(|x| x.dir == DIR_EGRESS && x.identity == ANY_IDENTITY));

    // Another policy with default deny on the same endpoint wins: no
    // allow-all, and port 9999 from another namespace's frontend is denied.
    let mut both = rules.clone();
    both.extend(parse(WEB_ALLOWS_FRONTEND).unwrap());
    let r = resolve(&both, 1, &labels("web", "shop"), &identities());
    assert!(!r.rules.iter().any(|x| x.dir == DIR_INGRESS && x.identity == ANY_IDENTITY));
    assert_eq!(tr(9999, &both).verdict, "DENIED");
    // A bad value is refused by name.
}

#[test]
fn empty_sections_are_no_rules_as_in_cilium() {
    let doc = |body: &str| {
        parse(&format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: e, namespace: shop}}\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n{body}"
        ))
        .unwrap()
    };
    let r =
        resolve(&doc("  ingress: []\n  egress: []\n"), 1, &labels("web", "shop"), &identities());
    assert!(!r.ingress_enforced && !r.egress_enforced && r.rules.is_empty(), "{r:?}");
    let r = resolve(&doc("  ingress: [{}]\n"), 1, &labels("web", "shop"), &identities());
    assert!(r.ingress_enforced, "one empty rule puts ingress into default deny");
    let r = resolve(
        &doc("  ingress: []\n  ingressDeny: [{fromEntities: [world]}]\n"),
        1,
        &labels("web", "shop"),
        &identities(),
    );
    assert!(r.ingress_enforced, "a deny list counts");
    // A Kubernetes policy type without rules still isolates.
    let np = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all, namespace: shop}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: []\n";
    let r = resolve(&parse(np).unwrap(), 1, &labels("web", "shop"), &identities());
    assert!(r.ingress_enforced && r.egress_enforced);
    assert!(r.rules.iter().all(|x| x.identity == reserved::HOST), "{r:?}");
}

/// Trace with no named ports.
fn trace_of(
    rules: &[Rule],
    src: (u32, &[String]),
    dst: (u32, &[String]),
    proto: u8,
    port: u16,
    ids: &IdView,
) -> Trace {
    trace(rules, src, dst, proto, port, ids, (&NamedPorts::default(), &NamedPorts::default()))
}

/// `rules` with the documents of `yaml` added.
fn with(rules: &[Rule], yaml: &str) -> Vec<Rule> {
    let mut all = rules.to_vec();
    all.extend(
        parse(yaml).unwrap_or_else(|e| panic!("the suggested policy does not parse: {e}\n{yaml}")),
    );
    all
}

#[test]
fn a_default_deny_drop_is_explained_with_a_policy_that_allows_just_it() {
    let mut ids = identity_map();
    // Two kinds of web in the namespace: the selector must tell them apart.
    let mut canary = labels("web", "shop");
    canary.push("k8s:track=canary".into());
    canary.sort();
    ids.insert(259, canary.clone());
    let ids: IdView = ids.into();
    let egress_lockdown = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: fe-out, namespace: shop}\n\
        spec:\n  endpointSelector: {matchLabels: {app: frontend}}\n  egress: [{toEntities: [world]}]\n";
    let rules = with(&parse(WEB_ALLOWS_FRONTEND).unwrap(), egress_lockdown);
    let (fe, web) = (ids.get(257).unwrap().clone(), ids.get(256).unwrap().clone());

    // frontend → web TCP 81: denied at both ends by default deny.
    let t = trace_of(&rules, (257, &fe), (256, &web), 6, 81, &ids);
    assert_eq!(t.verdict, "DENIED");
    let x = t.explanation.clone().expect("a denied trace is explained");
    assert_eq!(
        (x.denied_at.as_str(), x.decided_by.as_str()),
        ("egress and ingress", "default deny")
    );
    assert_eq!(x.because.len(), 2, "{x:?}");
    let yaml = x.allow_with.expect("default deny can be allowed");
    assert!(yaml.contains("port: '81'") || yaml.contains("port: \"81\""), "{yaml}");
    let fixed = with(&rules, &yaml);
    assert_eq!(trace_of(&fixed, (257, &fe), (256, &web), 6, 81, &ids).verdict, "ALLOWED", "{yaml}");
    // Just that: not another port, not another peer, not the canary.
    assert_eq!(trace_of(&fixed, (257, &fe), (256, &web), 6, 82, &ids).verdict, "DENIED");
    assert_eq!(
        trace_of(&fixed, (257, &fe), (259, &canary), 6, 81, &ids).verdict,
        "DENIED",
        "{yaml}"
    );
    let other = ids.get(258).unwrap().clone();
    assert_eq!(trace_of(&fixed, (258, &other), (256, &web), 6, 81, &ids).verdict, "DENIED");

    // An ICMP echo to the world from frontend: an egress rule with an icmps
    // field and the world entity.
    let world = vec!["reserved:world".to_string()];
    let t = trace_of(&rules, (257, &fe), (reserved::WORLD, &world), 1, 8, &ids);
    assert_eq!(t.verdict, "ALLOWED", "toEntities world allows all of it");
    let t = trace_of(&rules, (257, &fe), (256, &web), 1, 8, &ids);
    let x = t.explanation.unwrap();
    assert_eq!(x.denied_at, "egress and ingress");
    let yaml = x.allow_with.unwrap();
    assert_eq!(yaml.matches("icmps").count(), 2, "{yaml}");
    let fixed = with(&rules, &yaml);
    assert_eq!(trace_of(&fixed, (257, &fe), (256, &web), 1, 8, &ids).verdict, "ALLOWED");
    assert_eq!(trace_of(&fixed, (257, &fe), (256, &web), 1, 13, &ids).verdict, "DENIED");
}

#[test]
fn a_deny_rule_drop_names_the_rule_and_offers_no_allow() {
    let deny = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: no-fe, namespace: shop}\n\
        spec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingressDeny: [{fromEndpoints: [{matchLabels: {app: frontend}}]}]\n";
    let rules = with(&parse(WEB_ALLOWS_FRONTEND).unwrap(), deny);
    let ids = identities();
    let (fe, web) = (ids.get(257).unwrap().clone(), ids.get(256).unwrap().clone());
    let t = trace_of(&rules, (257, &fe), (256, &web), 6, 80, &ids);
    let x = t.explanation.expect("explained");
    assert_eq!((x.denied_at.as_str(), x.decided_by.as_str()), ("ingress", "deny rule"));
    assert!(x.because[0].contains("CiliumNetworkPolicy/shop/no-fe"), "{x:?}");
    assert_eq!(x.allow_with, None, "no allow wins over a deny rule");
    assert!(trace_of(&rules, (257, &fe), (256, &web), 6, 80, &ids).explanation.is_some());
    let allowed =
        trace_of(&parse(WEB_ALLOWS_FRONTEND).unwrap(), (257, &fe), (256, &web), 6, 80, &ids);
    assert_eq!(allowed.explanation, None, "an allowed trace has nothing to explain");
}

#[test]
fn objects_as_the_api_returns_them_parse_and_typos_do_not() {
    let from_api = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web
  namespace: shop
  annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
  uid: 0b6f6a36-1f0e-4b43-9a39-6f5f0c2b1e11
  resourceVersion: "42"
  generation: 3
  creationTimestamp: "2026-12-01T00:00:00Z"
  managedFields: [{manager: kubectl}]
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]
status:
  nodes: {node1: {ok: true, enforcing: true}}
"#;
    let rules = parse(from_api).unwrap();
    assert_eq!(rules[0].source, "CiliumNetworkPolicy/shop/web");
    let typo = from_api.replace("  uid:", "  lables: {a: b}\n  uid:");
    let e = parse(&typo).unwrap_err().to_string();
    assert!(e.contains("lables"), "{e}");
}

#[test]
fn l7_rules_are_checked_then_refused_until_the_redirect_is_built() {
    let doc = |egress: &str| {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: l7, namespace: shop}}\nspec:\n  endpointSelector: {{matchLabels: {{app: client}}}}\n  egress:\n{egress}"
        )
    };
    let refused = |egress: &str, needle: &str| {
        let e = parse(&doc(egress)).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    };
    // Well-formed L7 rules parse, and are refused as not enforced yet
    // (never enforced at L4 only: GET /private would get through).
    let http = "  - toEndpoints: [{matchLabels: {app: api}}]\n    toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules:\n        http:\n        - {method: GET, path: /public}\n        - {method: POST, path: /upload, headers: [X-Token], headerMatches: [{name: X-Team, value: a, mismatch: LOG}]}\n";
    refused(http, "egress[0]: toPorts[0].rules: L7 policy is not enforced yet");
    let dns = "  - toEndpoints: [{matchLabels: {k8s-app: kube-dns}}]\n    toPorts:\n    - ports: [{port: \"53\", protocol: ANY}]\n      rules:\n        dns: [{matchPattern: \"*.example.test\"}, {matchName: api.example.test}]\n";
    refused(dns, "toPorts[0].rules: L7 policy is not enforced yet");
    refused(
        "  - toFQDNs: [{matchName: api.example.test}]\n",
        "toFQDNs: L7 policy is not enforced yet",
    );
    // Malformed ones are refused for what is wrong, by field.
    refused(&http.replace("/public", "/pub(lic"), "toPorts[0].rules.http[0]: path");
    refused(&http.replace("mismatch: LOG", "mismatch: DROP"), "http[1]: headerMatches");
    refused(&dns.replace("*.example.test", "bad name!"), "rules.dns[0]: matchPattern");
    refused("  - toFQDNs: [{matchName: a, matchPattern: b}]\n", "toFQDNs[0]: one of matchName");
    refused(
        "  - toPorts: [{ports: [{port: \"80\"}], rules: {kafka: [{topic: x}]}}]\n",
        "field kafka is not supported",
    );
    let ingress = doc("  - toEndpoints: [{}]\n").replace(
        "  egress:\n  - toEndpoints: [{}]\n",
        "  ingress:\n  - toFQDNs: [{matchName: a.b}]\n",
    );
    let e = parse(&ingress).unwrap_err().to_string();
    assert!(e.contains("toFQDNs does not belong in this direction"), "{e}");
}
