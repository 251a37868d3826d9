package envoy.authz_test

import rego.v1

import data.envoy.authz

req(method, path, user) := {
	"attributes": {"request": {"http": {"method": method, "path": path, "headers": {"x-user": user}}}},
	"parsed_path": split(trim_left(path, "/"), "/"),
	"parsed_query": {},
}

test_healthz_allowed if {
	authz.allow with input as req("GET", "/healthz", "")
}

test_known_user_reads if {
	authz.allow with input as req("GET", "/books", "bob")
}

test_unknown_user_denied if {
	not authz.allow with input as req("GET", "/books", "mallory")
}

test_writer_writes if {
	authz.allow with input as req("POST", "/books", "alice")
}

test_reader_cannot_write if {
	not authz.allow with input as req("DELETE", "/books/1", "bob")
}

test_tcp_from_cluster if {
	authz.allow with input as {"attributes": {"source": {"address": {"socketAddress": {"address": "10.2.3.4"}}}}}
}

test_tcp_from_outside_denied if {
	not authz.allow with input as {"attributes": {"source": {"address": {"socketAddress": {"address": "192.0.2.1"}}}}}
}
