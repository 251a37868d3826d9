# An opa-envoy-plugin policy in that project's documented style, shipped as
# the example Rego bundle: it reads input.attributes, input.parsed_path and
# input.parsed_query exactly as under opa-envoy-plugin. The CUSTOM policy
# examples/policies/00-mesh-ext-authz.yaml sends requests to it, and
# examples/policies/bundles.txt names it, so `--policies examples/policies`
# loads it; elsewhere, load it with `--bundle policies/envoy`.
package envoy.authz

import rego.v1

import input.attributes.request.http as http_request

default allow := false

# Health checks are always allowed.
allow if {
	http_request.method == "GET"
	input.parsed_path == ["healthz"]
}

# Reads are allowed for known users.
allow if {
	http_request.method in {"GET", "HEAD"}
	http_request.headers["x-user"] in data.envoy.users
}

# Writes need the writer role.
allow if {
	http_request.method in {"POST", "PUT", "DELETE"}
	"writer" in data.envoy.roles[http_request.headers["x-user"]]
}

# TCP connections are allowed from inside the cluster network.
allow if {
	not input.attributes.request.http
	startswith(input.attributes.source.address.socketAddress.address, "10.")
}
