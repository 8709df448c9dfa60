#!/usr/bin/env python3
"""Seed the fuzz corpora from the project's own test files: every Rust
string literal in them that looks like an input of a target (a policy
document, a CNI configuration, an API body, a store record, a services
file, a config file, a flow filter) becomes a seed file named by its hash.
Run from the repository root; idempotent."""

import hashlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"

# Rust string literals: "..." (with escapes) and r#"..."# raw strings.
PLAIN = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)
RAW = re.compile(r'r#"(.*?)"#', re.S)


def unescape(s):
    s = re.sub(r"\\\n\s*", "", s)  # line continuations
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            n = s[i + 1]
            out.append({"n": "\n", "t": "\t", '"': '"', "\\": "\\", "0": "\0", "r": "\r"}.get(n, n))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def literals(path):
    text = path.read_text(errors="replace")
    for m in RAW.finditer(text):
        yield m.group(1)
    for m in PLAIN.finditer(text):
        yield unescape(m.group(1))


def put(target, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)


def main():
    sources = [p for p in (ROOT / "crates").rglob("*.rs") if "target" not in p.parts]
    for path in sources:
        for lit in literals(path):
            if "apiVersion:" in lit or '"apiVersion"' in lit:
                put("policy", lit)
                put("api_bodies", b"\x02" + ('{"text": %s}' % __import__("json").dumps(lit)).encode())
            if '"cniVersion"' in lit:
                put("cni_input", "ADD\nK8S_POD_NAMESPACE=default;K8S_POD_NAME=p\neth0\n" + lit)
            if '"frontend"' in lit and '"backends"' in lit:
                put("api_bodies", b"\x01" + lit.encode())
                put("services_file", "[" + lit + "]")
            if '"container_id"' in lit and '"host_ifname"' in lit:
                put("api_bodies", b"\x00" + lit.encode())
            if '"pod_cidr"' in lit and '"routing"' in lit:
                put("kvstore_records", b"\x00" + lit.encode())
            if '"source_pod"' in lit or '"destination_pod"' in lit or '"verdict"' in lit:
                put("flow_filters", lit)
    # Shapes the tests build with json!() rather than literals.
    put("kvstore_records", b'\x00{"name":"b","ip":"192.168.200.3","pod_cidr":"10.200.1.0/24","routing":"tunnel"}')
    put("kvstore_records", b'\x01{"ip":"10.200.1.3","identity":257,"node":"b","host_ip":"192.168.200.3","pod":"default/x"}')
    put("agent_config", '{"node":"n1","pod_cidr":"10.200.0.0/24","devices":["eth0"],"kvstore":"local",'
        '"identity_gc_interval":"15m","hubble_export_allowlist":"{\\"source_pod\\":[\\"default/\\"]}"}')
    put("agent_config", '{"cluster_pool":"10.200.0.0/16","cluster_pool_mask":24,"routing":"native","masquerade":true}')
    put("services_file", "- id: 1\n  name: default/web\n  frontend: {ip: 10.96.0.1, port: 80}\n"
        "  backends: [{ip: 10.200.0.3, port: 8080}]\n")
    put("flow_filters", '[{"source_pod":["default/"],"verdict":["DROPPED"]},{"destination_port":["53"]}]')
    put("api_bodies", b'\x03{"owner":"c1"}')
    put("api_bodies", b'\x05{"debug":true}')
    put("cni_input", 'DEL\n\neth0\n{"cniVersion":"1.1.0","name":"ciliate","type":"ciliate-cni","mtu":1450,'
        '"args":{"labels":{"app":"x"},"namedPorts":{"http":{"port":80,"protocol":"TCP"}}}}')
    # Ring records: a header of each kind, short and long.
    for kind in range(0, 8):
        for n in (4, 16, 64, 200):
            put("ring_events", bytes([kind]) + bytes(range(1, n)))
    for target in ("policy", "cni_input", "api_bodies", "kvstore_records", "ring_events",
                   "services_file", "agent_config", "flow_filters"):
        print(f"{target}: {len(list((CORPUS / target).glob('*')))} seeds")


main()
