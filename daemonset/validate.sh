#!/usr/bin/env bash
# Offline validation of daemonset/ (no cluster needed):
#  1. `kubectl kustomize daemonset/` validates against the Kubernetes 1.32 OpenAPI schemas
#     (PyPI kubernetes-validate, --strict: unknown fields are errors);
#  2. the CRD's schema is *structural* (what the API server requires and cannot be checked here
#     by applying it): a type on every node, no $ref, no type inside anyOf/oneOf/allOf/not;
#  3. examples/*.yaml validate: built-in kinds with kubernetes-validate, AccessPolicies against
#     the CRD's openAPIV3Schema (python jsonschema), and the schema rejects known-bad specs;
#  4. with CRD_CMD set (e.g. CRD_CMD="target/release/gateway crd"), crd.yaml is what the Rust
#     types generate today.
# Needs: kubectl, python3 with `pip install kubernetes-validate jsonschema pyyaml`.
# The gateway's own parser (semantic checks: rule ids, CIDRs, one key per condition) runs on
# the examples in the gateway's tests.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
k8s_version="${K8S_VERSION:-1.32.0}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

for tool in kubectl python3 kubernetes-validate; do
    command -v "$tool" >/dev/null || {
        echo "validate.sh: $tool not found (pip install kubernetes-validate jsonschema pyyaml)" >&2
        exit 1
    }
done
python3 -c 'import jsonschema, yaml' 2>/dev/null || {
    echo "validate.sh: python modules missing: pip install jsonschema pyyaml" >&2
    exit 1
}

echo "== kustomize build | kubernetes-validate --strict -k $k8s_version"
kubectl kustomize "$here" >"$tmp/all.yaml"
kubernetes-validate --strict -k "$k8s_version" "$tmp/all.yaml"

echo "== examples (built-in kinds) | kubernetes-validate --strict"
python3 - "$here/examples" "$tmp/builtin.yaml" <<'EOF'
import glob, os, sys, yaml
docs = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.yaml"))):
    with open(path) as f:
        docs += [d for d in yaml.safe_load_all(f) if d and d.get("kind") != "AccessPolicy"]
with open(sys.argv[2], "w") as f:
    yaml.safe_dump_all(docs, f)
EOF
kubernetes-validate --strict -k "$k8s_version" "$tmp/builtin.yaml"

echo "== CRD schema and AccessPolicy examples"
python3 - "$here/crd.yaml" "$here/examples" <<'EOF'
import glob, os, sys, yaml, jsonschema

crd = yaml.safe_load(open(sys.argv[1]))
versions = {v["name"]: v for v in crd["spec"]["versions"]}
schema = versions["v1alpha1"]["schema"]["openAPIV3Schema"]
problems = []

def structural(node, path):
    """The API server's structural-schema rules, for the parts this CRD uses."""
    if not isinstance(node, dict):
        return
    if "$ref" in node:
        problems.append(f"{path}: $ref is not allowed in a CRD schema")
    untyped_ok = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    if "type" not in node and not untyped_ok:
        problems.append(f"{path}: no type (and not x-kubernetes-preserve-unknown-fields)")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    for junctor in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(node.get(junctor, [])):
            for banned in ("type", "description", "default", "nullable", "additionalProperties"):
                if banned in sub:
                    problems.append(f"{path}.{junctor}[{i}]: `{banned}` inside a junctor")
    for name, sub in node.get("properties", {}).items():
        structural(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        structural(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        structural(node["additionalProperties"], f"{path}{{}}")

structural(schema, "openAPIV3Schema")

# OpenAPI 3.0 `nullable` is not JSON Schema: allow null where it is set.
def nullable(node):
    if isinstance(node, dict):
        if node.get("nullable") and "type" in node:
            node["type"] = [node["type"], "null"]
        for v in node.values():
            nullable(v)
    elif isinstance(node, list):
        for v in node:
            nullable(v)
nullable(schema)
validator = jsonschema.Draft7Validator(schema)

def check(doc, where):
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    for e in errors:
        problems.append(f"{where}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
    return not errors

count = 0
for path in sorted(glob.glob(os.path.join(sys.argv[2], "*.yaml"))):
    for i, doc in enumerate(yaml.safe_load_all(open(path))):
        if doc and doc.get("kind") == "AccessPolicy":
            assert doc.get("apiVersion") == "nodegate.io/v1alpha1", f"{path}[{i}]: apiVersion"
            check(doc, f"{os.path.basename(path)}[{i}] {doc['metadata']['name']}")
            count += 1
if count == 0:
    problems.append("examples: no AccessPolicy found")

# The schema must not be vacuous: these are refused by the API server already.
bad = {
    "no target": {"policy": {}},
    "empty target": {"target": {}, "policy": {}},
    "two targets": {"target": {"service": "a", "selector": {"matchLabels": {"a": "b"}}}, "policy": {}},
    "bad mode": {"target": {"service": "a"}, "mode": "permissive", "policy": {}},
    "two keys in a condition": {"target": {"service": "a"},
                                "policy": {"allow": [{"when": {"groups": "a", "email": "b@c"}}]}},
    "empty condition": {"target": {"service": "a"}, "policy": {"allow": [{"when": {}}]}},
    "rule without when": {"target": {"service": "a"}, "policy": {"allow": [{"id": "x"}]}},
}
for name, spec in bad.items():
    doc = {"apiVersion": "nodegate.io/v1alpha1", "kind": "AccessPolicy",
           "metadata": {"name": "bad"}, "spec": spec}
    if not list(validator.iter_errors(doc)):
        problems.append(f"schema accepts a bad spec ({name})")

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"structural schema ok; {count} AccessPolicy example(s) valid; {len(bad)} bad specs refused")
EOF

if [ -n "${CRD_CMD:-}" ]; then
    echo "== crd.yaml is current ($CRD_CMD)"
    # shellcheck disable=SC2086 # CRD_CMD is a command line
    $CRD_CMD >"$tmp/crd.yaml"
    diff -u "$here/crd.yaml" "$tmp/crd.yaml" || {
        echo "validate.sh: crd.yaml is stale: regenerate it with \`$CRD_CMD > daemonset/crd.yaml\`" >&2
        exit 1
    }
else
    echo "== crd.yaml freshness NOT checked: set CRD_CMD (e.g. CRD_CMD=\"target/release/gateway crd\")"
fi
echo "daemonset/: valid"
