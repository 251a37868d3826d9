package xds

import (
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// A response's resources are the bulk of it: a first configuration at a
// thousand services is about a megabyte of them, and every stream of a
// shared generation is sent the same list. So the list is encoded once,
// as the wire bytes of the response's resources field, and a response
// carries those bytes as its unknown fields with its Resources left
// empty: a client parses them as the resources (protobuf accepts a
// message's fields in any order), grpc-go's proto codec copies them
// instead of marshaling each resource again, and serve's codec
// (internal/connlimit) sends them by reference, so that thousands of
// streams in flight hold one copy, not one each.

// encodeDeltaResources is the encoding of a DeltaDiscoveryResponse's
// resources field holding rs (nil: none, or it does not encode).
func encodeDeltaResources(rs []*discoveryv3.Resource) []byte {
	if len(rs) == 0 {
		return nil
	}
	return encode(&discoveryv3.DeltaDiscoveryResponse{Resources: rs})
}

// encodeResources is the encoding of a DiscoveryResponse's resources
// field holding as (nil: none, or it does not encode).
func encodeResources(as []*anypb.Any) []byte {
	if len(as) == 0 {
		return nil
	}
	return encode(&discoveryv3.DiscoveryResponse{Resources: as})
}

// encode returns nil if m does not encode (it always does: its
// resources were marshaled and checked when the generation was built):
// the response then carries its resources as they are, and the stream's
// codec reports the error.
func encode(m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		return nil
	}
	return b
}
